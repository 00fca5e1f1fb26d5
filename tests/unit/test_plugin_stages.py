"""Stages named ``module:Name`` in pipelines.yaml: added without touching Conveyor's code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from stages.builtin import default_registry
from stages.model import Envelope, Outcome
from stages.ports import Ports
from stages.resolver import ConfigError, Resolver
from tests.fakes import FakeDirectory


class Shout:
    """A stage of "someone else's" package: upper-cases chat bodies."""

    name = "shout"

    def __init__(self, suffix: str, directory: Any) -> None:
        self.suffix = suffix
        self.directory = directory

    @classmethod
    def from_config(cls, options: Mapping[str, Any], ports: Ports) -> Shout:
        return cls(str(options.get("suffix", "!")), ports.directory)

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        for env in batch:
            env.fields["body"] = env.fields["body"].upper() + self.suffix
        return [Outcome.ok(e) for e in batch]


def count_words(options: Mapping[str, Any], ports: Ports) -> Any:
    """A plain factory function works too."""

    class Count:
        name = "count_words"

        async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
            for env in batch:
                env.meta["words"] = len(env.fields["body"].split())
            return [Outcome.ok(e) for e in batch]

    return Count()


YAML = """
version: 1
types:
  chat:
    durable: true
    stages:
      - tests.unit.test_plugin_stages:Shout: {suffix: "!!"}
      - tests.unit.test_plugin_stages:count_words
"""


async def test_dotted_stage_names_are_imported_and_built_with_ports() -> None:
    registry = default_registry()
    resolver = Resolver.from_yaml(YAML, registry)
    pipe = resolver.pipeline("chat", registry, Ports(directory=FakeDirectory({})))
    env = Envelope(type="chat", id="1", sender="alice", fields={"body": "hello there"})
    (out,) = await pipe.run([env])
    assert out.envelope.fields["body"] == "HELLO THERE!!" and out.envelope.meta["words"] == 2
    assert "validate_chat" in registry  # the built-in names are still there


@pytest.mark.parametrize(("name", "error"), [
    ("no_such_module_here:Stage", "cannot import"),
    ("tests.unit.test_plugin_stages:Missing", "has no"),
    ("tests.unit.test_plugin_stages:YAML", "neither"),
    ("not_a_builtin", "unknown stage"),
])
def test_bad_stage_names_are_configuration_errors(name: str, error: str) -> None:
    text = f"types:\n  chat:\n    durable: true\n    stages: [\"{name}\"]\n"
    with pytest.raises(ConfigError, match=error):
        Resolver.from_yaml(text, default_registry())
