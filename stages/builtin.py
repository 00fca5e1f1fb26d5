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
from stages.cache import CacheChat
from stages.chat import Ack, ApplyReceipts, DeliverChat, DeliverLocal, PersistChat, ValidateChat
from stages.commands import PersistCommand, ValidateCommand
from stages.load import DebitCredits
from stages.notifications import register_notification_stages
from stages.pipeline import Stage
from stages.ports import Ports, need
from stages.presence import FanoutPresence
from stages.resolver import ConfigError, StageFactory, StageRegistry, StageSpec
from stages.signals import DedupSignal, ForwardSignal, ValidateSignal


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

    def build(self, spec: StageSpec, ports: Ports) -> Stage:
        if spec.name not in self:
            raise ConfigError(f"unknown stage {spec.name!r}")
        return super().build(spec, ports)


def _validate_signal(options: Mapping[str, Any], p: Ports) -> ValidateSignal:
    """``scope``: ``contacts`` (a signal only to a user sharing a chat with the sender, or
    to the sender) or ``anyone``; default: the ``signal_scope`` setting."""
    scope = str(options.get("scope", p.defaults.signals.scope))
    if scope not in ("contacts", "anyone"):
        raise ConfigError(f"validate_signal: scope must be contacts or anyone, not {scope!r}")
    return ValidateSignal(int(options.get("max_payload_bytes", 16_384)),
                          need(p.contacts, "contacts", "validate_signal")
                          if scope == "contacts" else None)


def default_registry() -> StageRegistry:
    reg = PluginRegistry()
    reg.register("validate_chat", lambda o, p: ValidateChat(
        need(p.directory, "directory", "validate_chat"), int(o.get("max_body_chars", 4000))))
    reg.register("persist_chat", lambda o, p: PersistChat(need(p.store, "store", "persist_chat")))
    reg.register("ack", lambda o, p: Ack(need(p.acks, "acks", "ack")))
    reg.register("cache_chat", lambda o, p: CacheChat(p.cache, p.outages))
    reg.register("deliver_chat", lambda o, p: DeliverChat(
        need(p.hub, "hub", "deliver_chat"), need(p.outbox, "outbox", "deliver_chat"),
        bool(o.get("local", False)), p.outages, bool(o.get("detached", False)),
        int(o.get("max_detached", 64))))
    reg.register("deliver_local", lambda o, p: DeliverLocal(
        need(p.local_delivery, "local_delivery", "deliver_local")))
    reg.register("apply_receipts", lambda o, p: ApplyReceipts(
        need(p.store, "store", "apply_receipts"),
        p.hub if o.get("announce", True) else None, p.directory,
        float(o.get("announce_ms", 0)) / 1000))
    reg.register("debit_credits", lambda o, p: DebitCredits(
        need(p.credits, "credits", "debit_credits"), need(p.notices, "notices", "debit_credits"),
        int(o.get("low_water", 5)), p.outages))
    reg.register("validate_signal", _validate_signal)
    reg.register("dedup_signal", lambda o, p: DedupSignal(
        need(p.dedup, "dedup", "dedup_signal"), p.outages))
    reg.register("forward_signal",
                 lambda o, p: ForwardSignal(need(p.hub, "hub", "forward_signal")))
    reg.register("fanout_presence", lambda o, p: FanoutPresence(
        need(p.contacts, "contacts", "fanout_presence"), need(p.hub, "hub", "fanout_presence")))
    reg.register("validate_command",
                 lambda o, p: ValidateCommand(int(o.get("max_body_chars", 4000))))
    reg.register("persist_command", lambda o, p: PersistCommand(
        need(p.store, "store", "persist_command"),
        need(p.directory, "directory", "persist_command")))
    reg.register("validate_attachment", lambda o, p: ValidateAttachment(
        need(p.directory, "directory", "validate_attachment"),
        int(o.get("max_bytes", p.defaults.attachments.max_bytes)),
        list(o.get("content_types", p.defaults.attachments.content_types))))
    reg.register("create_upload", lambda o, p: CreateUpload(
        need(p.attachments, "attachments", "create_upload"),
        need(p.objects, "objects", "create_upload"),
        int(o.get("ttl_s", p.defaults.attachments.upload_ttl_s))))
    reg.register("verify_upload", lambda o, p: VerifyUpload(
        need(p.attachments, "attachments", "verify_upload"),
        need(p.objects, "objects", "verify_upload"), need(p.hub, "hub", "verify_upload"),
        need(p.directory, "directory", "verify_upload"),
        float(o.get("claim_lease_s", p.defaults.attachments.claim_lease_s))))
    reg.register("scan_attachment", lambda o, p: ScanAttachment(
        need(p.attachments, "attachments", "scan_attachment"),
        need(p.objects, "objects", "scan_attachment"), need(p.hub, "hub", "scan_attachment"),
        p.scanner if o.get("antivirus", True) else None))
    reg.register("finalize_attachment", lambda o, p: FinalizeAttachment(
        need(p.attachments, "attachments", "finalize_attachment"),
        need(p.objects, "objects", "finalize_attachment")))
    reg.register("link_attachment", lambda o, p: LinkAttachment(
        need(p.attachments, "attachments", "link_attachment")))
    reg.register("track", lambda o, p: Track(need(p.analytics, "analytics", "track"),
                                             str(o.get("event", "accepted"))))
    register_notification_stages(reg)
    return reg
