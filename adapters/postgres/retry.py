"""The one retry policy of the PostgreSQL adapter (``tenacity``): transactions that lost a
race or a deadlock are run again a few times with a short, jittered, growing wait."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_incrementing,
    wait_random,
)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def retried(*errors: type[BaseException], attempts: int = 5,
            step_s: float = 0.005) -> Callable[[F], F]:
    """Retry an async method on ``errors``; after ``attempts`` the last error is raised."""
    return retry(  # type: ignore[no-any-return]
        retry=retry_if_exception_type(errors),
        stop=stop_after_attempt(attempts),
        wait=wait_incrementing(start=step_s, increment=step_s) + wait_random(0, step_s),
        reraise=True,
    )
