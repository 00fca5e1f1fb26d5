"""The stages that ship with Conveyor, by the names pipelines.yaml uses.

A stage that does not ship with Conveyor is named in pipelines.yaml as ``module:Name``
(``mycompany.stages:Translate``): ``Name`` is imported from the module (which must be
importable in every Serve process) and is either a class with a ``from_config(options,
ports)`` classmethod, or any callable ``(options, ports) -> Stage``. Stage hosts build it
like a built-in stage, with the same ports; nothing in Conveyor itself changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from stages.analytics import Track
from stages.attachments import (
    CreateUpload,
    FinalizeAttachment,
    LinkAttachment,
    ScanAttachment,
    ValidateAttachment,
    VerifyUpload,
)
from stages.chat import Ack, ApplyReceipts, DeliverChat, PersistChat, ValidateChat
from stages.commands import PersistCommand, ValidateCommand
from stages.load import DebitCredits
from stages.notifications import register_notification_stages
from stages.pipeline import Stage
from stages.presence import FanoutPresence
from stages.resolver import ConfigError, StageFactory, StageRegistry, StageSpec
from stages.signals import DedupSignal, ForwardSignal, ValidateSignal


def _port(ports: Mapping[str, Any], name: str, stage: str) -> Any:
    try:
        return ports[name]
    except KeyError:
        raise ConfigError(f"stage {stage!r} needs port {name!r}, which this host lacks") from None


def _is_dotted(name: object) -> bool:
    return isinstance(name, str) and name.count(":") == 1 and all(name.split(":"))


def load_factory(name: str) -> StageFactory:
    """The factory a ``module:Name`` stage name points at (ConfigError if there is none)."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"stage {name!r}: cannot import {module_name!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"stage {name!r}: {module_name!r} has no {attr!r}")
    from_config = getattr(target, "from_config", None)
    factory = from_config if callable(from_config) else target
    if not callable(factory):
        raise ConfigError(f"stage {name!r} is neither a stage class nor a factory")
    return factory  # type: ignore[no-any-return]


class PluginRegistry(StageRegistry):
    """The built-in stages, plus any ``module:Name`` stage, imported on first use."""

    def __contains__(self, name: object) -> bool:
        if super().__contains__(name):
            return True
        if not _is_dotted(name):
            return False
        assert isinstance(name, str)
        self.register(name, load_factory(name))
        return True

    def build(self, spec: StageSpec, ports: Mapping[str, Any]) -> Stage:
        if spec.name not in self:
            raise ConfigError(f"unknown stage {spec.name!r}")
        return super().build(spec, ports)


def default_registry() -> StageRegistry:
    reg = PluginRegistry()
    reg.register(
        "validate_chat",
        lambda o, p: ValidateChat(
            _port(p, "directory", "validate_chat"), int(o.get("max_body_chars", 4000))
        ),
    )
    reg.register("persist_chat", lambda o, p: PersistChat(_port(p, "store", "persist_chat")))
    reg.register("ack", lambda o, p: Ack(_port(p, "acks", "ack")))
    reg.register(
        "deliver_chat",
        lambda o, p: DeliverChat(_port(p, "hub", "deliver_chat"), _port(p, "store", "deliver_chat")),
    )
    reg.register("apply_receipts", lambda o, p: ApplyReceipts(_port(p, "store", "apply_receipts")))
    reg.register(
        "debit_credits",
        lambda o, p: DebitCredits(_port(p, "credits", "debit_credits"),
                                  _port(p, "notices", "debit_credits"), int(o.get("low_water", 5))),
    )
    reg.register("validate_signal",
                 lambda o, p: ValidateSignal(int(o.get("max_payload_bytes", 16_384))))
    reg.register("dedup_signal", lambda o, p: DedupSignal(_port(p, "dedup", "dedup_signal")))
    reg.register("forward_signal", lambda o, p: ForwardSignal(_port(p, "hub", "forward_signal")))
    reg.register(
        "fanout_presence",
        lambda o, p: FanoutPresence(_port(p, "contacts", "fanout_presence"),
                                    _port(p, "hub", "fanout_presence")),
    )
    reg.register("validate_command",
                 lambda o, p: ValidateCommand(int(o.get("max_body_chars", 4000))))
    reg.register(
        "persist_command",
        lambda o, p: PersistCommand(_port(p, "store", "persist_command"),
                                    _port(p, "directory", "persist_command")),
    )
    def limits(p: Mapping[str, Any]) -> Any:
        return _port(p, "settings", "attachments")

    reg.register("validate_attachment", lambda o, p: ValidateAttachment(
        _port(p, "directory", "validate_attachment"),
        int(o.get("max_bytes", limits(p).attachment_max_bytes)),
        list(o.get("content_types", limits(p).attachment_types))))
    reg.register("create_upload", lambda o, p: CreateUpload(
        _port(p, "attachments", "create_upload"), _port(p, "objects", "create_upload"),
        int(o.get("ttl_s", limits(p).attachment_upload_ttl_s))))
    reg.register("verify_upload", lambda o, p: VerifyUpload(
        _port(p, "attachments", "verify_upload"), _port(p, "objects", "verify_upload"),
        _port(p, "hub", "verify_upload"), _port(p, "directory", "verify_upload"),
        float(o.get("claim_lease_s", limits(p).attachment_claim_lease_s))))
    reg.register("scan_attachment", lambda o, p: ScanAttachment(
        _port(p, "attachments", "scan_attachment"), _port(p, "objects", "scan_attachment"),
        _port(p, "hub", "scan_attachment"),
        _port(p, "scanner", "scan_attachment") if o.get("antivirus", True) else None))
    reg.register("finalize_attachment", lambda o, p: FinalizeAttachment(
        _port(p, "attachments", "finalize_attachment"),
        _port(p, "objects", "finalize_attachment")))
    reg.register("link_attachment", lambda o, p: LinkAttachment(
        _port(p, "attachments", "link_attachment")))
    reg.register("track", lambda o, p: Track(_port(p, "analytics", "track"),
                                             str(o.get("event", "accepted"))))
    register_notification_stages(reg)
    return reg
