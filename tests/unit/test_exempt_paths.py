"""Upload paths skip the API's body limit and timeout, at the root and behind a route
prefix (a second application deployed under ``/local``, say)."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.middleware import LONG_PATHS, Exempt


def recorder(name: str, seen: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(name)

    return app


@pytest.mark.parametrize(("path", "root", "expected"), [
    ("/v1/uploads/k/a.png", "", "raw"),
    ("/local/v1/uploads/k/a.png", "/local", "raw"),   # path carries the prefix
    ("/v1/uploads/k/a.png", "/local", "raw"),         # path already relative
    ("/v1/chats", "", "guarded"),
    ("/local/v1/chats", "/local", "guarded"),
    ("/other/v1/uploads/k", "", "guarded"),           # not an upload path of this app
])
async def test_upload_paths_bypass_the_guard_with_or_without_a_route_prefix(
        path: str, root: str, expected: str) -> None:
    seen: list[str] = []
    app = Exempt(recorder("guarded", seen), recorder("raw", seen), LONG_PATHS)
    await app({"type": "http", "path": path, "root_path": root}, None, None)
    assert seen == [expected]


async def test_attachment_checks_get_their_longer_timeout_and_other_paths_the_default() -> None:
    import asyncio

    from deployments.middleware import Timeout

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"checked"})

    app = Timeout(slow, 0.05, longer={"/v1/storage/events": 5.0, "/v1/attachments/": 5.0})

    async def call(path: str, root: str = "") -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({"type": "http", "method": "POST", "path": path, "root_path": root,
                   "headers": []}, None, send)
        return int(sent[0]["status"])

    assert await call("/v1/chats") == 504
    assert await call("/v1/storage/events") == 200
    assert await call("/local/v1/attachments/a1/complete", "/local") == 200
    assert app.limit_for({"type": "http", "path": "/v1/notifications"}) == 0.05
