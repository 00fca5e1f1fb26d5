"""``conveyor chat``: an interactive terminal client of the protocol (``PROTOCOL.md``).

One chat at a time, on one WebSocket (:class:`client.ws.WsClient`):

- **history**: the chat's last ``--history`` events are shown on start (``sync``), and
  ``/history N`` shows more;
- **live messages**: ``message`` and ``command`` frames of the chat as they arrive, each
  shown once (a redelivery of a message already shown is receipted again, not printed);
- **receipts**: every message shown is receipted ``read`` to the server (receipts are
  cumulative, so the server stops redelivering it); the server tells the chat's other
  members (a ``system`` ``receipt`` frame), so the sender's screen shows ``✓✓ bob read #5``;
- **typing**: the first keystroke of a line (then at most every few seconds) sends a
  ``signal`` ``{"kind": "typing"}`` to the other members, shown as ``… alice is typing``;
- **reconnect with catch-up**: when the socket drops the client reconnects with backoff,
  fetches what it missed (``WsClient.reconnect``: ``sync`` from the last seq seen), shows it
  once in seq order, and resends its unacknowledged messages under their original ids
  (the server's dedup answers ``duplicate``, so nothing is stored twice).

Line editing is the client's own (cbreak mode on a terminal, so keystrokes are seen before
Enter); on a pipe it reads whole lines. Commands start with ``/``: see :data:`HELP`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import time
import tty
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

import orjson
from websockets.exceptions import ConnectionClosed

from client.errors import ClientError, ServerError
from client.rest import HttpClient
from client.ws import Frame, TokenSource, WsClient

HELP = """commands:
  /history [N]   show the chat's last N events (default 20)
  /who           who is online in this chat
  /drop [S]      drop the connection (as a network outage would), reconnect after S seconds
  /reconnect     reconnect now (after /drop, or to move to another gateway)
  /help          this text
  /quit          leave (also Ctrl-D on an empty line, or Ctrl-C)"""
TYPING_EVERY_S = 3.0
RECONNECT_MAX_S = 5.0


def hhmmss(created_at: str | None) -> str:
    """The local wall-clock time of an RFC 3339 timestamp (now when there is none)."""
    if created_at:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(created_at.replace("Z", "+00:00")).astimezone().strftime(
                "%H:%M:%S")
    return datetime.now().strftime("%H:%M:%S")


class Screen:
    """Lines above, the input line at the bottom. A line printed while the user types is
    written above the prompt, which is redrawn with what was typed so far."""

    def __init__(self, out: TextIO, prompt: str, interactive: bool) -> None:
        self.out = out
        self.prompt = prompt
        self.interactive = interactive
        self.buffer = ""

    def line(self, text: str) -> None:
        if self.interactive:
            self.out.write(f"\r\x1b[K{text}\r\n{self.prompt}{self.buffer}")
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def redraw(self) -> None:
        if self.interactive:
            self.out.write(f"\r\x1b[K{self.prompt}{self.buffer}")
            self.out.flush()

    def echo(self, text: str) -> None:
        if self.interactive:
            self.out.write(text)
            self.out.flush()


class Keyboard:
    """Keystrokes from a terminal in cbreak mode (or whole lines from a pipe), handed to
    ``on_key`` / ``on_line`` from the event loop; ``None`` on end of input."""

    def __init__(self, fd: int, screen: Screen, on_line: Callable[[str | None], None],
                 on_key: Callable[[], None]) -> None:
        self.fd = fd
        self.screen = screen
        self.on_line = on_line
        self.on_key = on_key
        self._saved: list[Any] | None = None
        self._pending = b""
        self._escape = False

    def start(self) -> None:
        if self.screen.interactive:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)  # keep what was typed already
        asyncio.get_running_loop().add_reader(self.fd, self._readable)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except OSError:
            data = b""
        if not data:
            self.on_line(None)
            return
        if not self.screen.interactive:
            self._pending += data
            *lines, self._pending = self._pending.split(b"\n")
            for raw in lines:
                self.on_line(raw.decode("utf-8", "replace").rstrip("\r"))
            return
        for ch in data.decode("utf-8", "replace"):
            self._key(ch)

    def _key(self, ch: str) -> None:
        s = self.screen
        if self._escape:  # skip an escape sequence (arrows and the like): ESC [ ... letter
            if ch.isalpha() or ch == "~":
                self._escape = False
            return
        if ch == "\x1b":
            self._escape = True
        elif ch in ("\r", "\n"):
            line, s.buffer = s.buffer, ""
            s.redraw()
            self.on_line(line)
        elif ch in ("\x7f", "\x08"):
            if s.buffer:
                s.buffer = s.buffer[:-1]
                s.echo("\b \b")
        elif ch == "\x15":  # Ctrl-U: clear the line
            s.buffer = ""
            s.redraw()
        elif ch in ("\x03",) or (ch == "\x04" and not s.buffer):  # Ctrl-C, Ctrl-D on empty
            self.on_line(None)
        elif ch.isprintable():
            s.buffer += ch
            s.echo(ch)
            self.on_key()


class TerminalChat:
    """One user in one chat. ``run()`` returns when the user quits."""

    def __init__(self, base_url: str, user: str, token: TokenSource, chat_ref: str, *,
                 history: int = 20, out: TextIO = sys.stdout, fd_in: int | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.ws_url = (self.base_url.replace("http://", "ws://", 1)
                       .replace("https://", "wss://", 1) + "/v1/ws")
        self.user = user
        self.token = token
        self.chat_ref = chat_ref
        self.history_n = history
        self.fd_in = sys.stdin.fileno() if fd_in is None else fd_in
        interactive = os.isatty(self.fd_in)
        self.screen = Screen(out, f"{user}> ", interactive)
        self.chat_id = ""
        self.members: list[str] = []
        self.client: WsClient | None = None
        self.pending: dict[str, str] = {}  # client id -> body, sent and not acked yet
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.quit = asyncio.Event()
        self.connected = asyncio.Event()
        self._typing_sent = 0.0
        self._typing_shown: dict[str, float] = {}
        self._read_shown: dict[str, int] = {}
        self._drop_for: float | None = None
        self._wake = asyncio.Event()

    def _token(self) -> str:
        return self.token() if callable(self.token) else self.token

    @property
    def others(self) -> list[str]:
        return [m for m in self.members if m != self.user]

    # --- start ----------------------------------------------------------------------------
    async def open_chat(self) -> None:
        """Find the chat ``chat_ref`` names (an id, a title, or ``@bob[,@carol]``: the chat of
        exactly those members, created if there is none)."""
        async with HttpClient(self.base_url, self._token()) as http:
            chats = await http.chats()
            ref = self.chat_ref
            found = [c for c in chats if ref in (c["chatId"], c.get("title"))]
            if not found and ref.startswith("@"):
                wanted = {m.strip().lstrip("@") for m in ref.split(",") if m.strip()} - {""}
                everyone = sorted(wanted | {self.user})
                found = [c for c in chats if sorted(c["members"]) == everyone]
                if not found:
                    created = await http.create_chat(sorted(wanted))
                    found = [{**created, "lastSeq": 0}]
            if not found:
                raise ClientError(f"no chat {ref!r} (give a chat id, a title, or @user to start one)")
            chat = found[-1]
            self.chat_id, self.members = chat["chatId"], list(chat["members"])
            self._last_seq = int(chat.get("lastSeq") or 0)

    async def run(self) -> int:
        await self.open_chat()
        title = f"with {', '.join(self.others) or 'yourself'}"
        self.screen.line(f"-- chat {self.chat_id} {title} (/help for commands)")
        self.client = await WsClient.connect(self.ws_url, self.token)
        self.connected.set()
        await self.show_history(self.history_n, initial=True)
        keyboard = Keyboard(self.fd_in, self.screen, self.lines.put_nowait, self._keystroke)
        keyboard.start()
        self.screen.line("-- live")  # from here on, what is typed is read
        reader = asyncio.create_task(self._receive_loop())
        try:
            await self._input_loop()
        finally:
            keyboard.stop()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            with contextlib.suppress(Exception):
                await self.client.close()
            self.screen.buffer = ""
            self.screen.line("-- bye")
        return 0

    # --- what the user does ----------------------------------------------------------------
    async def _input_loop(self) -> None:
        while True:
            line = await self.lines.get()
            if line is None:
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if await self._command(text):
                    return
            else:
                await self._send_chat(text)

    async def _command(self, text: str) -> bool:
        """Run a ``/command``; True when the user quits."""
        name, _, arg = text.partition(" ")
        if name in ("/quit", "/exit"):
            return True
        if name == "/help":
            for row in HELP.splitlines():
                self.screen.line(row)
        elif name == "/history":
            await self._when_connected(self.show_history(int(arg) if arg.strip().isdigit() else 20))
        elif name == "/who":
            async with HttpClient(self.base_url, self._token()) as http:
                r = await http.http.get("/v1/presence", params=[("userId", m) for m in self.members])
            for u in r.json().get("users", []) if r.is_success else []:
                state = "online" if u.get("online") else f"offline (last seen {u.get('lastSeen')})"
                self.screen.line(f"* {u['userId']} {state}")
        elif name == "/drop":
            self._drop_for = float(arg) if arg.strip() else 0.0
            self._wake.clear()
            if self.client is not None:
                await self.client.ws.close()
        elif name == "/reconnect":
            if self._drop_for is not None:
                self._wake.set()  # cut the /drop pause short
            elif self.client is not None:
                await self.client.ws.close()
        else:
            self.screen.line(f"! unknown command {name} (/help)")
        return False

    async def _when_connected(self, coro: Any) -> None:
        await self.connected.wait()
        try:
            await coro
        except (ConnectionClosed, ClientError) as exc:
            self.screen.line(f"! {exc}")

    async def _send_chat(self, body: str) -> None:
        assert self.client is not None
        cid = self.client.new_id()
        self.pending[cid] = body
        with contextlib.suppress(ConnectionClosed):  # resent after the reconnect
            await self.client.send({"type": "chat", "id": cid, "chatId": self.chat_id, "body": body})

    def _keystroke(self) -> None:
        now = time.monotonic()
        if self.client is None or not self.others or now - self._typing_sent < TYPING_EVERY_S:
            return
        self._typing_sent = now
        asyncio.get_running_loop().create_task(self._signal_all({"kind": "typing"}))

    async def _signal_all(self, payload: dict[str, Any]) -> None:
        if self.client is None:
            return
        for other in self.others:
            with contextlib.suppress(ConnectionClosed):
                await self.client.signal(other, {**payload, "chatId": self.chat_id})

    # --- what arrives ----------------------------------------------------------------------
    async def show_history(self, n: int, initial: bool = False) -> None:
        """The chat's last ``n`` events, over HTTP (the socket is the receive loop's)."""
        assert self.client is not None
        last = self._last_seq if initial else max(self._last_seq, self.client.seqs.highest(self.chat_id))
        async with HttpClient(self.base_url, self._token()) as http:
            page = await http.history(self.chat_id, max(0, last - n), min(max(n, 1), 500))
        items = page["messages"]
        if items:
            self.screen.line(f"-- history (#{items[0]['seq']}..#{items[-1]['seq']})")
        for item in items:
            self._print_event(item)
        if initial:
            self.client.watch(self.chat_id, last)
            readable = [m for m in items if m.get("type") == "message" and m.get("senderId") != self.user]
            if readable:
                await self._receipt(readable[-1])

    async def _receive_loop(self) -> None:
        assert self.client is not None
        backoff = 0.5
        held, self.client.inbox = self.client.inbox, []
        for frame in held:
            await self._handle(frame)
        while True:
            try:
                raw = await self.client.ws.recv()
            except ConnectionClosed:
                self.connected.clear()
                backoff = await self._reconnect(backoff)
                continue
            backoff = 0.5
            try:
                frame = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            await self._handle(frame)

    async def _reconnect(self, backoff: float) -> float:
        """Reconnect until it works (or the user quits); shows what was missed, then
        resends unacknowledged messages under their original ids."""
        assert self.client is not None
        if self._drop_for is not None:
            self.screen.line(f"-- connection dropped; reconnecting in {self._drop_for:g} s "
                             "(/reconnect: now)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._drop_for)
            self._drop_for = None
        else:
            self.screen.line("-- connection lost; reconnecting")
        while True:
            try:
                caught = await self.client.reconnect(self.token)
                break
            except (OSError, ClientError, ConnectionClosed) as exc:
                self.screen.line(f"-- reconnect failed ({exc.__class__.__name__}); retrying in "
                                 f"{backoff:g} s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
        missed = caught.get(self.chat_id, [])
        self.screen.line(f"-- reconnected; caught up {len(missed)} missed event(s)")
        for item in missed:
            self._print_event(item)
        readable = [m for m in missed if m.get("type") == "message" and m.get("senderId") != self.user]
        if readable:
            await self._receipt(readable[-1])
        # Frames that arrived during catch-up (signals, presence, redeliveries of what was
        # just shown, acks of resent messages) wait in the client's inbox.
        held, self.client.inbox = self.client.inbox, []
        for frame in held:
            await self._handle(frame)
        self.connected.set()
        for cid, body in list(self.pending.items()):
            await self.client.send({"type": "chat", "id": cid, "chatId": self.chat_id, "body": body})
        return backoff

    async def _handle(self, f: Frame) -> None:
        assert self.client is not None
        kind = f.get("type")
        if kind in ("message", "command"):
            if f.get("chatId") != self.chat_id:
                return  # another chat's: left for a client that shows it
            if self.client.seqs.is_seen(f):
                if kind == "message":  # a redelivery: the receipt may have been lost
                    await self.client.receipt([f["messageId"]], "read")
                return
            self.client.seqs.observe(f)
            self._print_event(f)
            if kind == "message" and f.get("senderId") != self.user:
                await self._receipt(f)
        elif kind == "ack":
            body = self.pending.pop(str(f.get("id")), None)
            if body is None:
                return
            if f.get("status") in ("accepted", "duplicate"):
                self.client.seqs.observe(f)
                self.screen.line(f"[{hhmmss(None)}] #{f['seq']} {self.user}: {body} ✓")
            else:
                err = f.get("error") or {}
                retry = f" (retry in {err['retryAfter']} s)" if err.get("retryAfter") else ""
                self.screen.line(f"! not sent: {err.get('code')}: {err.get('message')}{retry}: {body}")
        elif kind == "signal":
            self._show_signal(f)
        elif kind == "system":
            self._show_system(f)
        elif kind == "error":
            self.screen.line(f"! {f.get('code')}: {f.get('message')}")

    async def _receipt(self, message: Frame) -> None:
        """Receipt ``read`` to the server (cumulative: it covers every earlier message)."""
        assert self.client is not None
        with contextlib.suppress(ConnectionClosed):
            await self.client.receipt([message["messageId"]], "read")

    def _print_event(self, item: Frame) -> None:
        seq, who = item.get("seq"), item.get("senderId") or item.get("by")
        if item.get("type") == "command":
            what = {"edit": f"edited #{item.get('messageId')}: {item.get('body')}",
                    "react": f"reacted {item.get('emoji')} to {item.get('messageId')}",
                    "delete": f"deleted {item.get('messageId')}"}.get(str(item.get("op")), item.get("op"))
            self.screen.line(f"[{hhmmss(item.get('createdAt'))}] #{seq} {who} {what}")
            return
        if item.get("deleted") or item.get("tombstone"):
            body = "(deleted)"
        elif item.get("kind") == "attachment":
            att = item.get("attachment") or {}
            body = f"[attachment {att.get('fileName', '')} {att.get('size', '')} bytes]"
        else:
            body = item.get("body", "")
        self.screen.line(f"[{hhmmss(item.get('createdAt'))}] #{seq} {who}: {body}")

    def _show_signal(self, f: Frame) -> None:
        payload = f.get("payload") or {}
        sender = str(f.get("from"))
        if payload.get("chatId") != self.chat_id:
            return
        if payload.get("kind") == "typing":
            now = time.monotonic()
            if now - self._typing_shown.get(sender, -1e9) >= TYPING_EVERY_S:
                self._typing_shown[sender] = now
                self.screen.line(f"… {sender} is typing")

    def _show_system(self, f: Frame) -> None:
        event, data = f.get("event"), f.get("data") or {}
        if event == "presence":
            if data.get("userId") in self.members:
                self.screen.line(f"* {data.get('userId')} is {'online' if data.get('online') else 'offline'}")
        elif event == "receipt" and data.get("chatId") == self.chat_id:
            who, read = str(data.get("userId")), data.get("readSeq")
            if isinstance(read, int) and read > self._read_shown.get(who, 0):
                self._read_shown[who] = read
                self.screen.line(f"✓✓ {who} read #{read}")
        elif event == "reconnect":
            self.screen.line("-- the server asks to reconnect")
        elif event in ("credits_low", "credits_exhausted", "overload"):
            self.screen.line(f"! {event} {orjson.dumps(data).decode()}")


def main(url: str, user: str, chat: str | None, source: TokenSource, *, history: int = 20) -> int:
    """``conveyor chat``. Without a chat, lists the user's chats. ``source``: the user's
    token, or a callable minting a fresh one for each connect."""
    if chat is None:
        return asyncio.run(_list_chats(url, source if isinstance(source, str) else source()))
    app = TerminalChat(url, user, source, chat, history=history)
    try:
        return asyncio.run(app.run())
    except (ClientError, OSError) as exc:
        print(f"conveyor chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _list_chats(url: str, token: str) -> int:
    try:
        async with HttpClient(url, token) as http:
            chats = await http.chats()
    except (ServerError, OSError) as exc:
        print(f"conveyor chat: {exc}", file=sys.stderr)
        return 1
    if not chats:
        print("no chats yet: `conveyor chat --as YOU @someone` starts one")
    for c in chats:
        print(f"{c['chatId']}  {c.get('title') or ''}  members: {', '.join(c['members'])}  "
              f"unread: {c.get('unreadCount', 0)}")
    return 0
