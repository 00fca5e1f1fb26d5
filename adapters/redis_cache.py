"""The chat cache in Redis: each chat's recent rows and its members' unread counters.

What it holds, per chat (keys share the hash tag ``{c:<chatId>}``, so a chat lives on one
Redis Cluster slot and one Lua script updates it atomically):
- ``…:m`` seq → row (a ``StoredMessage`` as JSON, in its current state: edited body,
  tombstone, reaction counts), ``…:i`` message id → seq, ``…:h`` the window
  ``floor``..``last``: every seq in it is present. At most ``max_messages`` rows; the
  oldest are dropped. Every write renews the chat's TTL.
- ``…:u`` member → ``count:asOf:read``: the member's unread count (text and attachment
  messages of others after ``read``), exact as of seq ``asOf``.

Guarantees (the cache is never the source of truth; PostgreSQL is):
- ``append`` takes the rows ``persist`` committed, in any order and more than once: a row
  seen before is a no-op, a row that extends the window is added and its command (edit,
  react, delete) applied to its target as the store applied it, a row after a gap restarts
  the window at that row. So the window, when a read uses it, equals what
  ``messages_after`` returns for the same range.
- ``recent`` answers only from a complete window: ``None`` when the chat is cold or the
  range starts below the window (the caller reads PostgreSQL and may ``fill``).
- ``fill`` stores rows read from PostgreSQL only into a cold chat (a warm window may hold
  effects the read predates).
- An unread counter advances only seq by seq (``asOf + 1``); a gap drops it (cold again).
  ``mark_read`` lowers it exactly when the rows in between are cached, else drops it.
  ``unread`` returns ``None`` unless every asked chat has a counter for the member.
- Redis unreachable or slow: every method raises ``CacheUnavailable`` within about
  ``timeout_s`` (no retries, short socket timeouts), never hangs. A write that failed
  marks its chats dirty; they are deleted from Redis before this cache serves or writes
  anything again, so a lost write never leaves a stale row behind (other processes' reads
  may see it until then, at most for the TTL).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from stages.bus import CacheUnavailable
from stages.ports import StoredMessage

__all__ = ["CacheUnavailable", "ChatCache"]

log = logging.getLogger("conveyor.redis")

MAX_DIRTY = 10_000

# KEYS: m, i, h, u. ARGV: ttl_ms, max_messages, rows (JSON list, snake_case StoredMessage).
_APPEND = r"""
local ttl = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local rows = cjson.decode(ARGV[3])
local floor = tonumber(redis.call('HGET', KEYS[3], 'floor'))
local last = tonumber(redis.call('HGET', KEYS[3], 'last'))

local function load(seq)
  local raw = redis.call('HGET', KEYS[1], seq)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function save(row)
  redis.call('HSET', KEYS[1], row.seq, cjson.encode(row))
end
local function target(row)
  if row.target == cjson.null or row.target == nil then return nil end
  local seq = redis.call('HGET', KEYS[2], row.target)
  if not seq then return nil end
  return load(seq)
end
local function counts(row, user)
  return (row.kind == 'text' or row.kind == 'attachment') and row.sender_id ~= user
end

for _, r in ipairs(rows) do
  local seq = r.seq
  if last == nil or seq > last + 1 then
    redis.call('DEL', KEYS[1], KEYS[2])
    floor = seq
    last = seq - 1
  end
  if seq == last + 1 then
    save(r)
    redis.call('HSET', KEYS[2], r.message_id, seq)
    last = seq
    if r.kind == 'edit' then
      local t = target(r)
      if t then t.body = r.body; t.edited_at = r.created_at; save(t) end
    elseif r.kind == 'delete' then
      local t = target(r)
      if t then
        t.body = cjson.null; t.attachment = cjson.null; t.deleted = true
        t.reactions = {}
        save(t)
      end
      local all = redis.call('HGETALL', KEYS[1])
      for k = 2, #all, 2 do
        local e = cjson.decode(all[k])
        if e.kind == 'edit' and e.target == r.target and e.body ~= cjson.null then
          e.body = cjson.null
          save(e)
        end
      end
    elseif r.kind == 'react' then
      local t = target(r)
      if t and r.data ~= cjson.null and r.data ~= nil then
        local n = (t.reactions[r.data.emoji] or 0) + (r.data.added and 1 or -1)
        if n > 0 then t.reactions[r.data.emoji] = n else t.reactions[r.data.emoji] = nil end
        save(t)
      end
    end
    local members = redis.call('HGETALL', KEYS[4])
    for k = 1, #members, 2 do
      local user = members[k]
      local c, asof, rd = string.match(members[k + 1], '^(%d+):(%d+):(%d+)$')
      c = tonumber(c); asof = tonumber(asof); rd = tonumber(rd)
      if seq == asof + 1 then
        if counts(r, user) and seq > rd then c = c + 1 end
        redis.call('HSET', KEYS[4], user, c .. ':' .. seq .. ':' .. rd)
      elseif seq > asof + 1 then
        redis.call('HDEL', KEYS[4], user)
      end
    end
  end
end
if last ~= nil and floor ~= nil then
  while last - floor + 1 > cap do
    local old = load(floor)
    if old then redis.call('HDEL', KEYS[2], old.message_id) end
    redis.call('HDEL', KEYS[1], floor)
    floor = floor + 1
  end
  redis.call('HSET', KEYS[3], 'floor', floor, 'last', last)
end
for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], ttl) end
return last
"""

# KEYS: m, i, h. ARGV: ttl_ms, rows (contiguous, ascending). Only into a cold chat.
_FILL = r"""
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local rows = cjson.decode(ARGV[2])
if #rows == 0 then return 0 end
for _, r in ipairs(rows) do
  redis.call('HSET', KEYS[1], r.seq, cjson.encode(r))
  redis.call('HSET', KEYS[2], r.message_id, r.seq)
end
redis.call('HSET', KEYS[3], 'floor', rows[1].seq, 'last', rows[#rows].seq)
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], tonumber(ARGV[1])) end
return #rows
"""

# KEYS: u. ARGV: ttl_ms, then pairs user, "count:asOf:read". Newer (asOf, read) wins.
_FILL_UNREAD = r"""
for k = 2, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[k])
  local _, new_asof, new_read = string.match(ARGV[k + 1], '^(%d+):(%d+):(%d+)$')
  new_asof = tonumber(new_asof); new_read = tonumber(new_read)
  local old_asof, old_read = nil, nil
  if old then
    local _c, a, r = string.match(old, '^(%d+):(%d+):(%d+)$')
    old_asof = tonumber(a); old_read = tonumber(r)
  end
  if not old or old_asof < new_asof or (old_asof == new_asof and old_read < new_read) then
    redis.call('HSET', KEYS[1], ARGV[k], ARGV[k + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# KEYS: m, h, u. ARGV: user, read_seq.
_MARK_READ = r"""
local user = ARGV[1]
local upto = tonumber(ARGV[2])
local entry = redis.call('HGET', KEYS[3], user)
if not entry then return -1 end
local c, asof, rd = string.match(entry, '^(%d+):(%d+):(%d+)$')
c = tonumber(c); asof = tonumber(asof); rd = tonumber(rd)
if upto <= rd then return c end
if upto >= asof then
  redis.call('HSET', KEYS[3], user, '0:' .. asof .. ':' .. upto)
  return 0
end
local floor = tonumber(redis.call('HGET', KEYS[2], 'floor'))
if floor == nil or rd + 1 < floor then
  redis.call('HDEL', KEYS[3], user)
  return -1
end
for s = rd + 1, upto do
  local raw = redis.call('HGET', KEYS[1], s)
  if not raw then redis.call('HDEL', KEYS[3], user); return -1 end
  local row = cjson.decode(raw)
  if (row.kind == 'text' or row.kind == 'attachment') and row.sender_id ~= user then c = c - 1 end
end
if c < 0 then redis.call('HDEL', KEYS[3], user); return -1 end
redis.call('HSET', KEYS[3], user, c .. ':' .. asof .. ':' .. upto)
return c
"""


def _keys(chat_id: str) -> tuple[str, str, str, str]:
    tag = f"conveyor:{{c:{chat_id}}}"
    return f"{tag}:m", f"{tag}:i", f"{tag}:h", f"{tag}:u"


def _row(msg: StoredMessage) -> dict[str, Any]:
    return dataclasses.asdict(msg)


def _message(raw: bytes | str) -> StoredMessage:
    d = orjson.loads(raw)
    if not d.get("reactions"):
        d["reactions"] = {}  # an empty Lua table may come back as [] or {}
    return StoredMessage(**d)


class ChatCache:
    """``stages.bus.ChatCache`` on Redis (see the module's and the port's guarantees)."""

    def __init__(self, url: str, *, max_messages: int = 200, ttl_s: float = 3600.0,
                 timeout_s: float = 0.25) -> None:
        self.url = url
        self.max_messages = max_messages
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout_s = timeout_s
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0)
        self._append = self.redis.register_script(_APPEND)
        self._fill = self.redis.register_script(_FILL)
        self._fill_unread = self.redis.register_script(_FILL_UNREAD)
        self._mark_read = self.redis.register_script(_MARK_READ)
        self._dirty: set[str] = set()
        self._dirty_all = False

    async def close(self) -> None:
        await self.redis.aclose()

    # --- failure handling -------------------------------------------------------------
    def _lost(self, chat_ids: Iterable[str], e: BaseException) -> CacheUnavailable:
        for c in chat_ids:
            self._dirty.add(c)
        if len(self._dirty) > MAX_DIRTY:
            self._dirty_all, self._dirty = True, set()
        return CacheUnavailable(repr(e))

    async def _heal(self) -> None:
        """Delete what failed writes may have left stale; raises while Redis is away."""
        if not self._dirty and not self._dirty_all:
            return
        try:
            if self._dirty_all:
                async for key in self.redis.scan_iter(match="conveyor:{c:*", count=1000):
                    await self.redis.delete(key)
                self._dirty_all = False
            if self._dirty:
                chats = list(self._dirty)
                await self.redis.delete(*[k for c in chats for k in _keys(c)])
                self._dirty.difference_update(chats)
        except (RedisError, OSError, TimeoutError) as e:
            raise CacheUnavailable(repr(e)) from e
        log.info("chat cache healed after lost writes")

    async def ping(self) -> None:
        """Raises ``CacheUnavailable`` unless Redis answers within the timeout."""
        try:
            await self.redis.ping()
        except (RedisError, OSError, TimeoutError) as e:
            raise CacheUnavailable(repr(e)) from e

    # --- writes -----------------------------------------------------------------------
    async def append(self, rows: Sequence[StoredMessage]) -> None:
        """Rows ``persist`` committed (messages and commands, no duplicates needed):
        see the module's guarantees. One atomic script per chat."""
        by_chat: dict[str, list[StoredMessage]] = {}
        for m in rows:
            by_chat.setdefault(m.chat_id, []).append(m)
        await self._heal()
        done: set[str] = set()
        try:
            for chat, msgs in by_chat.items():
                msgs.sort(key=lambda m: m.seq)
                await self._append(keys=list(_keys(chat)), args=[
                    self.ttl_ms, self.max_messages, orjson.dumps([_row(m) for m in msgs])])
                done.add(chat)
        except (RedisError, OSError, TimeoutError) as e:
            raise self._lost([c for c in by_chat if c not in done], e) from e

    async def fill(self, chat_id: str, rows: Sequence[StoredMessage]) -> None:
        """Rows read from PostgreSQL (``messages_after``: contiguous, ascending, up to the
        chat's last seq); stored only if the chat is cold. Keeps the last ``max_messages``."""
        rows = list(rows)[-self.max_messages:]
        if not rows:
            return
        await self._heal()
        try:
            await self._fill(keys=list(_keys(chat_id)[:3]),
                             args=[self.ttl_ms, orjson.dumps([_row(m) for m in rows])])
        except (RedisError, OSError, TimeoutError) as e:
            raise self._lost([chat_id], e) from e

    async def fill_unread(self, user_id: str, chats: Sequence[dict[str, Any]]) -> None:
        """Counters from PostgreSQL's chat list (``chats_of`` rows: ``chatId``,
        ``unreadCount``, ``lastSeq``, ``readSeq``, read in one snapshot). A counter
        already cached at a later seq is kept."""
        await self._heal()
        try:
            for c in chats:
                await self._fill_unread(keys=[_keys(c["chatId"])[3]], args=[
                    self.ttl_ms, user_id, f"{c['unreadCount']}:{c['lastSeq']}:{c['readSeq']}"])
        except (RedisError, OSError, TimeoutError) as e:
            raise self._lost([c["chatId"] for c in chats], e) from e

    async def mark_read(self, chat_id: str, user_id: str, read_seq: int) -> None:
        """The member's read pointer is now ``read_seq`` (as the store moved it)."""
        await self._heal()
        m, _, h, u = _keys(chat_id)
        try:
            await self._mark_read(keys=[m, h, u], args=[user_id, read_seq])
        except (RedisError, OSError, TimeoutError) as e:
            raise self._lost([chat_id], e) from e

    # --- reads ------------------------------------------------------------------------
    async def recent(self, chat_id: str, after_seq: int, limit: int) -> list[StoredMessage] | None:
        """Rows with seq > ``after_seq`` in seq order, at most ``limit``, exactly as
        ``messages_after`` returns them; ``None`` when the window does not cover the range."""
        await self._heal()
        m, _, h, _ = _keys(chat_id)
        try:
            floor, last = await self.redis.hmget(h, ["floor", "last"])
            if floor is None or last is None or after_seq + 1 < int(floor):
                return None
            upto = min(int(last), after_seq + limit)
            if upto <= after_seq:
                return []
            raws = await self.redis.hmget(m, [str(s) for s in range(after_seq + 1, upto + 1)])
        except (RedisError, OSError, TimeoutError) as e:
            raise CacheUnavailable(repr(e)) from e
        if any(r is None for r in raws):  # trimmed or expired meanwhile
            return None
        return [_message(r) for r in raws]

    async def unread(self, user_id: str, chat_ids: Sequence[str],
                     at_least: Mapping[str, tuple[int, int]] | None = None) -> dict[str, int] | None:
        """The member's unread count per chat, or ``None`` if any counter is cold.
        ``at_least``: per chat (last seq, read seq) of a store read; a counter behind
        either (the cache stage or a receipt not applied to it yet) counts as cold."""
        await self._heal()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for c in chat_ids:
                    pipe.hget(_keys(c)[3], user_id)
                raws = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as e:
            raise CacheUnavailable(repr(e)) from e
        if any(r is None for r in raws):
            return None
        out: dict[str, int] = {}
        for c, r in zip(chat_ids, raws, strict=True):
            count, as_of, read = (int(x) for x in r.split(b":"))
            if at_least is not None and c in at_least:
                last_seq, read_seq = at_least[c]
                if as_of < last_seq or read < read_seq:
                    return None
            out[c] = count
        return out
