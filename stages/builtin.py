"""The stages that ship with Conveyor, by the names pipelines.yaml uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stages.chat import Ack, ApplyReceipts, DeliverChat, PersistChat, ValidateChat
from stages.resolver import ConfigError, StageRegistry


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
    return reg
