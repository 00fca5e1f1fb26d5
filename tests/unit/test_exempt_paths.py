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
