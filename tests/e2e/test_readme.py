"""The README's walkthrough, run as a newcomer would run it: its Python blocks are taken
from README.md verbatim (only the address changes to the session app's) and executed as
``walkthrough.py`` in a fresh process, with the chat and the tokens made as the README
makes them. The attachment block is spliced into ``main()`` where the README says it
continues. The session app keeps objects in a real S3 API (moto), which sends no bucket
notifications, so this test plays the storage's part: once the uploaded object exists it
posts MinIO's event to the webhook, as MinIO would."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from client import create_chat
from tests.conftest import App
from tests.e2e.test_attachments import PNG, webhook

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_walkthrough(ws_base: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    main, attachment = blocks[0], blocks[1]
    assert "asyncio.run(main())" in main
    assert attachment.startswith("# continuing inside main() above")
    script = main.replace("\nasyncio.run(main())",
                          "\n" + textwrap.indent(attachment, "    ") + "\nasyncio.run(main())")
    assert "ws://127.0.0.1:8000" in script
    return script.replace("ws://127.0.0.1:8000", ws_base)


async def act_as_storage(conveyor: App, app_db: Any, chat: str) -> dict[str, Any]:
    """Wait for the upload to land in S3, then post the bucket notification."""
    s3 = Minio(conveyor.settings["s3_endpoint"], access_key="test", secret_key="test-secret",
               secure=False)
    while True:
        key = await app_db.fetchval("SELECT object_key FROM attachments WHERE chat_id=$1", chat)
        if key is not None:
            with contextlib.suppress(Exception):
                stat = await asyncio.to_thread(s3.stat_object, "conveyor-attachments", key)
                r = await webhook(conveyor, key, int(stat.size or 0))
                assert r.status_code == 200, r.text
                return dict(r.json())
        await asyncio.sleep(0.2)


async def test_readme_walkthrough_runs_as_written(conveyor: App, app_db: Any, tmp_path: Path
                                                  ) -> None:
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    chat = await create_chat(conveyor.base_url, conveyor.token(alice), [bob], "hello")
    (tmp_path / "walkthrough.py").write_text(readme_walkthrough(conveyor.ws_url.removesuffix("/v1/ws")))
    (tmp_path / "cat.png").write_bytes(PNG)
    env = {**os.environ, "CHAT": chat, "ALICE": conveyor.token(alice), "BOB": conveyor.token(bob)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "walkthrough.py", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    storage = asyncio.create_task(act_as_storage(conveyor, app_db, chat))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        storage.cancel()
    assert proc.returncode == 0, err.decode()[-2000:]
    # The first two prints are raw frames (JSON text), the rest the parsed dicts.
    printed = [json.loads(line) if line.startswith('{"') else ast.literal_eval(line)
               for line in out.decode().splitlines()]
    # What the README's comments promise, in the order it prints them.
    assert [(f["type"], f.get("event")) for f in printed[:2]] == [("system", "connected")] * 2
    assert {f["data"]["userId"] for f in printed[:2]} == {alice, bob}
    ack, message, attachment = printed[2], printed[3], printed[4]
    assert (ack["type"], ack["id"], ack["status"], ack["seq"]) == ("ack", "c-1", "accepted", 1)
    assert (message["type"], message["senderId"], message["body"], message["seq"]) == (
        "message", alice, "hi Bob", 1)
    assert message["messageId"] == ack["messageId"]
    assert attachment["type"] == "message" and attachment["kind"] == "attachment"
    assert attachment["attachment"]["fileName"] == "cat.png"
    assert len(printed) == 5
    # The receipt the walkthrough sends reached the server.
    receipted = 0
    for _ in range(50):
        receipted = await app_db.fetchval(
            "SELECT read_seq FROM chat_members WHERE chat_id=$1 AND user_id=$2", chat, bob)
        if receipted:
            break
        await asyncio.sleep(0.1)
    assert receipted >= 1
