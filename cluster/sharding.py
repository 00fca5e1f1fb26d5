"""Stable sharding and named-actor lookup shared by every cluster actor."""

from __future__ import annotations

import zlib
from typing import Any

NAMESPACE = "conveyor"


def shard_of(key: str, shards: int) -> int:
    """Same answer in every process (Python's hash() is salted per process)."""
    return zlib.crc32(key.encode()) % shards if shards > 1 else 0


def named_actor(cls: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """Get the named actor, creating it when it does not exist yet.

    Detached and restarted on failure: state held by these actors may be lost with a
    crash, and every user of them tolerates that (see each actor's docstring).
    """
    return cls.options(
        name=name,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=0,
        num_cpus=0,
    ).remote(*args, **kwargs)
