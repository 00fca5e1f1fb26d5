"""``conveyor chat`` driven in pseudo-terminals, as two people would use it in two
terminals, against the session app: typing, live messages, read receipts, a dropped
connection with catch-up (each missed message shown once, in order), and the history
shown when the client starts again. The server's history is then checked: every message
stored once, seq gap-free, the receiver's pointer at the end."""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.client import user
from tests.conftest import App

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.e2e


def conveyor_exe() -> str:
    return shutil.which("conveyor") or str(Path(sys.executable).with_name("conveyor"))


def chat_terminal(app: App, me: str, ref: str | None) -> tuple[pexpect.spawn, io.StringIO]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    env.update(CONVEYOR_DATA_DIR=str(app.data_dir), PYTHONIOENCODING="utf-8", TERM="xterm")
    term = pexpect.spawn(conveyor_exe(), ["chat", "--as", me, "--url", app.base_url, *([ref] if ref else [])],
                         env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    transcript = io.StringIO()
    term.logfile_read = transcript
    return term, transcript


def message_lines(transcript: io.StringIO, sender: str, body: str) -> int:
    """How many times a message line ``#N sender: body`` was printed."""
    return len(re.findall(rf"#\d+ {re.escape(sender)}: {re.escape(body)}(?!\S)", transcript.getvalue()))


def test_two_terminals_chat_with_typing_receipts_and_catch_up_after_a_drop(conveyor: App) -> None:
    alice, bob = user("alice"), user("bob")
    a, a_log = chat_terminal(conveyor, alice, f"@{bob}")
    b, b_log = None, io.StringIO()
    try:
        a.expect("-- live")
        chat_id = re.search(r"-- chat (\S+) with", a_log.getvalue()).group(1)  # type: ignore[union-attr]
        b, b_log = chat_terminal(conveyor, bob, f"@{alice}")
        b.expect(f"-- chat {re.escape(chat_id)} with {re.escape(alice)}")
        b.expect("-- live")

        # Typing reaches the other terminal before the line is sent.
        a.send("hel")
        b.expect(f"… {re.escape(alice)} is typing")
        a.send("lo bob\r")
        a.expect(rf"#1 {re.escape(alice)}: hello bob ✓")
        b.expect(rf"#1 {re.escape(alice)}: hello bob")
        # Bob's screen showed it, so it is read: Alice sees the receipt.
        a.expect(f"✓✓ {re.escape(bob)} read #1")

        b.send("hi alice\r")
        b.expect(rf"#2 {re.escape(bob)}: hi alice ✓")
        a.expect(rf"#2 {re.escape(bob)}: hi alice")

        # Bob's connection drops; Alice goes on; Bob catches up on reconnect.
        b.send("/drop 300\r")
        b.expect("-- connection dropped")
        for i in range(1, 4):
            a.send(f"away {i}\r")
            a.expect(rf"#{i + 2} {re.escape(alice)}: away {i} ✓")
        b.send("/reconnect\r")
        b.expect(r"-- reconnected; caught up (\d+) missed event", timeout=60)
        assert b.match.group(1) == "3"
        for i in range(1, 4):
            b.expect(rf"#{i + 2} {re.escape(alice)}: away {i}")
        a.send("after\r")
        b.expect(rf"#6 {re.escape(alice)}: after")
        a.expect(f"✓✓ {re.escape(bob)} read #6")
        # The server pushes unreceipted messages again; the client shows each once.
        b.send("/who\r")
        b.expect(rf"\* {re.escape(alice)} online")
        for i in range(1, 4):
            assert message_lines(b_log, alice, f"away {i}") == 1
        assert message_lines(b_log, alice, "hello bob") == 1

        b.send("/quit\r")
        b.expect("-- bye")
        b.expect(pexpect.EOF)
        # Started again: the history is on the screen.
        b, b_log = chat_terminal(conveyor, bob, chat_id)
        b.expect(r"-- history \(#1\.\.#6\)")
        b.expect("-- live")
        for body, sender in [("hello bob", alice), ("hi alice", bob), ("away 1", alice),
                             ("away 2", alice), ("away 3", alice), ("after", alice)]:
            assert message_lines(b_log, sender, body) == 1, body
        b.sendcontrol("d")
        b.expect(pexpect.EOF)
    except (pexpect.TIMEOUT, pexpect.EOF) as exc:
        raise AssertionError(f"{type(exc).__name__}\n--- alice:\n{a_log.getvalue()[-3000:]}"
                             f"\n--- bob:\n{b_log.getvalue()[-3000:]}") from None
    finally:
        for term in (a, b):
            if term is not None and term.isalive():
                term.terminate(force=True)

    # Stored once each, seq gap-free, and Bob's receipts moved his pointer to the end.
    with httpx.Client(base_url=conveyor.base_url, timeout=30) as http:
        page = http.get(f"/v1/chats/{chat_id}/messages", params={"limit": 50},
                        headers=conveyor.auth(alice)).json()
        assert [m["seq"] for m in page["messages"]] == [1, 2, 3, 4, 5, 6]
        assert len({m["messageId"] for m in page["messages"]}) == 6
        assert [m["body"] for m in page["messages"]] == [
            "hello bob", "hi alice", "away 1", "away 2", "away 3", "after"]
        delivered = 0
        for _ in range(50):
            chats = http.get("/v1/chats", headers=conveyor.auth(bob)).json()["chats"]
            delivered = next(c for c in chats if c["chatId"] == chat_id)["deliveredSeq"]
            if delivered == 6:
                break
            time.sleep(0.2)
        assert delivered == 6


def test_chat_without_a_chat_lists_the_users_chats(conveyor: App) -> None:
    carol, dave = user("carol"), user("dave")
    t, log = chat_terminal(conveyor, carol, f"@{dave}")
    t.expect("-- live")
    t.sendcontrol("d")
    t.expect(pexpect.EOF)
    t, log = chat_terminal(conveyor, dave, None)
    t.expect(pexpect.EOF)
    t.close()
    assert f"members: {', '.join(sorted([carol, dave]))}" in log.getvalue()
