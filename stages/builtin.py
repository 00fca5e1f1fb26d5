"""The stages that ship with Conveyor, by the names pipelines.yaml uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stages.analytics import Track
from stages.attachments import (
    CreateUpload,
    FinalizeAttachment,
    ScanAttachment,
    ValidateAttachment,
    VerifyUpload,
)
from stages.chat import Ack, ApplyReceipts, DeliverChat, PersistChat, ValidateChat
from stages.commands import PersistCommand, ValidateCommand
from stages.load import DebitCredits
from stages.notifications import register_notification_stages
from stages.presence import FanoutPresence
from stages.resolver import ConfigError, StageRegistry
from stages.signals import DedupSignal, ForwardSignal, ValidateSignal


def _port(ports: Mapping[str, Any], name: str, stage: str) -> Any:
    try:
        return ports[name]
    except KeyError:
        raise ConfigError(f"stage {stage!r} needs port {name!r}, which this host lacks") from None


def default_registry() -> StageRegistry:
    reg = StageRegistry()
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
        _port(p, "hub", "verify_upload"), _port(p, "directory", "verify_upload")))
    reg.register("scan_attachment", lambda o, p: ScanAttachment(
        _port(p, "attachments", "scan_attachment"), _port(p, "objects", "scan_attachment"),
        _port(p, "hub", "scan_attachment"),
        _port(p, "scanner", "scan_attachment") if o.get("antivirus", True) else None,
        limits(p).attachment_max_bytes))
    reg.register("finalize_attachment", lambda o, p: FinalizeAttachment(
        _port(p, "attachments", "finalize_attachment")))
    reg.register("track", lambda o, p: Track(_port(p, "analytics", "track"),
                                             str(o.get("event", "accepted"))))
    register_notification_stages(reg)
    return reg
