"""Test-only helpers around the protocol client (``client/``): fresh users and a ready chat
of two on the session's application."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from client import WsClient, create_chat

if TYPE_CHECKING:
    from tests.conftest import App


def user(prefix: str = "u") -> str:
    """A fresh, unique user id."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def chat_of_two(app: App) -> tuple[str, str, str, WsClient, WsClient]:
    """Two fresh users, a chat Alice creates with Bob, and both connected (Alice first).

    Returns ``(chat, alice, bob, alice_client, bob_client)``; the caller closes the clients.
    """
    alice, bob = user(), user()
    chat = await create_chat(app.base_url, app.token(alice), [bob])
    a = await WsClient.connect(app.ws_url, app.token(alice))
    b = await WsClient.connect(app.ws_url, app.token(bob))
    return chat, alice, bob, a, b
