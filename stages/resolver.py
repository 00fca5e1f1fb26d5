"""The Resolver: builds each message type's pipeline from configuration.

``pipelines.yaml`` names, per message type, whether it is durable, what happens when a
buffer overflows, and the ordered stages with their options. Variants choose another
stage list from the envelope itself (business context: a group chat, a tenant's plan),
so a new type, a reordered or reused stage, or a new route is a YAML change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.model import Envelope
from stages.pipeline import Pipeline, Stage
from stages.ports import Ports


class ConfigError(ValueError):
    """pipelines.yaml is not valid."""


class UnknownType(KeyError):
    """No pipeline is configured for this message type."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    when: Mapping[str, Any]
    stages: tuple[StageSpec, ...]

    def matches(self, envelope: Envelope) -> bool:
        return all(_lookup(envelope, path) == value for path, value in self.when.items())


@dataclass(frozen=True)
class TypeSpec:
    name: str
    durable: bool
    overflow: str  # "block" (stop reading, never drop) | "drop" (drop with a metric)
    stages: tuple[StageSpec, ...]
    variants: tuple[Variant, ...] = ()
    cost: int = 1  # credits one message of this type costs
    client: bool = True  # False: only the server creates this type (clients get unknown_type)

    def route(self, envelope: Envelope) -> int:
        """Index of the first matching variant, or -1 for the default stage list."""
        for i, variant in enumerate(self.variants):
            if variant.matches(envelope):
                return i
        return -1

    def stages_for(self, route: int) -> tuple[StageSpec, ...]:
        return self.stages if route < 0 else self.variants[route].stages


StageFactory = Callable[[Mapping[str, Any], Ports], Stage]


class StageRegistry:
    """Stage names (as written in pipelines.yaml) → factories(options, ports) → Stage."""

    def __init__(self) -> None:
        self._factories: dict[str, StageFactory] = {}

    def register(self, name: str, factory: StageFactory) -> None:
        if name in self._factories:
            raise ConfigError(f"stage {name!r} is registered twice")
        self._factories[name] = factory

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def names(self) -> list[str]:
        return sorted(self._factories)

    def build(self, spec: StageSpec, ports: Ports) -> Stage:
        try:
            factory = self._factories[spec.name]
        except KeyError:
            raise ConfigError(f"unknown stage {spec.name!r}") from None
        return factory(spec.options, ports)


def _lookup(envelope: Envelope, path: str) -> Any:
    head, _, rest = path.partition(".")
    value: Any = getattr(envelope, head, None)
    for part in rest.split(".") if rest else []:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _stage_list(raw: Any, where: str) -> tuple[StageSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list")
    out: list[StageSpec] = []
    for item in raw:
        if isinstance(item, str):
            out.append(StageSpec(item))
        elif isinstance(item, dict) and len(item) == 1:
            ((name, options),) = item.items()
            if options is not None and not isinstance(options, dict):
                raise ConfigError(f"{where}: options of stage {name!r} must be a mapping")
            out.append(StageSpec(str(name), dict(options or {})))
        else:
            raise ConfigError(f"{where}: a stage is a name or a one-key mapping, got {item!r}")
    return tuple(out)


class Resolver:
    def __init__(self, types: Mapping[str, TypeSpec]) -> None:
        self._types = dict(types)

    @classmethod
    def from_yaml(cls, source: str | Path, registry: StageRegistry | None = None) -> Resolver:
        text = source.read_text() if isinstance(source, Path) else source
        data = yaml.safe_load(text)
        if not isinstance(data, dict) or not isinstance(data.get("types"), dict):
            raise ConfigError("pipelines.yaml needs a top-level 'types' mapping")
        types: dict[str, TypeSpec] = {}
        for name, raw in data["types"].items():
            where = f"types.{name}"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be a mapping")
            durable = bool(raw.get("durable", False))
            overflow = raw.get("overflow", "block" if durable else "drop")
            if overflow not in ("block", "drop"):
                raise ConfigError(f"{where}.overflow must be 'block' or 'drop'")
            if durable and overflow == "drop":
                raise ConfigError(f"{where}: a durable type is never dropped (overflow: block)")
            variants = []
            for j, v in enumerate(raw.get("variants") or []):
                if not isinstance(v, dict) or not isinstance(v.get("when"), dict):
                    raise ConfigError(f"{where}.variants[{j}] needs a 'when' mapping")
                variants.append(
                    Variant(dict(v["when"]), _stage_list(v.get("stages"), f"{where}.variants[{j}]"))
                )
            cost = raw.get("cost", 1)
            if not isinstance(cost, int) or cost < 0:
                raise ConfigError(f"{where}.cost must be a non-negative integer")
            spec = TypeSpec(
                name=str(name),
                durable=durable,
                overflow=overflow,
                stages=_stage_list(raw.get("stages"), where),
                variants=tuple(variants),
                cost=cost,
                client=bool(raw.get("client", True)),
            )
            if registry is not None:
                for stage in spec.stages + tuple(s for v in spec.variants for s in v.stages):
                    if stage.name not in registry:
                        raise ConfigError(f"{where}: unknown stage {stage.name!r}")
            types[str(name)] = spec
        return cls(types)

    @property
    def types(self) -> list[str]:
        return list(self._types)

    def spec(self, type_name: str) -> TypeSpec:
        try:
            return self._types[type_name]
        except KeyError:
            raise UnknownType(type_name) from None

    def pipeline(
        self, type_name: str, registry: StageRegistry, ports: Ports, route: int = -1
    ) -> Pipeline:
        specs: Sequence[StageSpec] = self.spec(type_name).stages_for(route)
        return Pipeline([registry.build(s, ports) for s in specs])
