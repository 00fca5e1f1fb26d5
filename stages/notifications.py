"""The notification route: validation, dispatch strategy, retries and the pipeline stages.

Pure domain code: no I/O here. Channels, the store and the dispatcher are ports whose
guarantees are written on their Protocols below; adapters implement them.

Pipeline (``pipelines.yaml``, type ``notification``)::

    validate_notification → persist_notification → route_notification

One envelope per item of a request; ``fields["notification"]`` is the item as the client
sent it, ``meta["subject"]`` the sender taken from the token. A rejected item carries its
errors (``{code, message, path}``, the vocabulary of the contract: ``too_small``,
``too_big``, ``invalid_type``, ``invalid_enum_value``, ``invalid_string``,
``unrecognized_keys``) in ``meta["errors"]``; an accepted one its normalised form in
``meta["notification"]``.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from stages.feedback import PaceConfig, Pacer
from stages.model import Envelope, Outcome
from stages.resolver import ConfigError, StageRegistry

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

CONTACT_TYPES = ("email", "bitrix")
STRATEGIES = ("send_to_first_available", "send_to_all_available")
DEFAULT_STRATEGY = "send_to_first_available"
ITEM_KEYS = ("contacts", "message", "isImmediate", "strategy")
CONTACT_KEYS = ("type", "value")
MAX_ITEMS = 100
MAX_CONTACTS = 20  # defaults of the settings notification_max_contacts / _max_message_chars
MAX_MESSAGE_CHARS = 10_000
MAX_EMAIL_CHARS = 254


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-item limits beyond the contract's own (at least one contact, a non-empty message)."""

    max_contacts: int = MAX_CONTACTS
    max_message_chars: int = MAX_MESSAGE_CHARS

# The e-mail rule of the schema library the contract's messages come from.
EMAIL_RE = re.compile(
    r"^(?!\.)(?!.*\.\.)([A-Z0-9_'+\-.]*)[A-Z0-9_+-]@([A-Z0-9][A-Z0-9\-]*\.)+[A-Z]{2,}$",
    re.IGNORECASE,
)

PathPart = str | int
Issue = dict[str, Any]


def issue(code: str, message: str, path: Sequence[PathPart]) -> Issue:
    """An issue is exactly ``{code, message, path}``, the shape the contract shows (Zod's
    own extra keys such as ``minimum`` or ``keys`` are not part of it; the message says
    the same in words)."""
    return {"code": code, "message": message, "path": list(path)}


def type_name(value: Any) -> str:
    """The JSON type name used in ``invalid_type`` messages ("received string")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "number"
    if isinstance(value, float):
        return "number" if value == value else "nan"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _invalid_type(expected: str, value: Any, path: Sequence[PathPart]) -> Issue:
    got = type_name(value)
    return issue("invalid_type", f"Expected {expected}, received {got}", path)


def _required(expected: str, path: Sequence[PathPart]) -> Issue:
    return issue("invalid_type", "Required", path)


def _enum(options: Sequence[str], value: Any, path: Sequence[PathPart]) -> Issue:
    expected = " | ".join(f"'{o}'" for o in options)
    return issue("invalid_enum_value",
                 f"Invalid enum value. Expected {expected}, received '{value}'", path)


def _unrecognized(keys: Sequence[str], path: Sequence[PathPart]) -> Issue:
    names = ", ".join(f"'{k}'" for k in keys)
    return issue("unrecognized_keys", f"Unrecognized key(s) in object: {names}", path)


def list_size_issues(value: Sequence[Any], path: Sequence[PathPart], minimum: int,
                     maximum: int) -> list[Issue]:
    if len(value) < minimum:
        return [issue("too_small", f"List must contain at least {minimum} element(s)", path)]
    if len(value) > maximum:
        return [issue("too_big", f"List must contain at most {maximum} element(s)", path)]
    return []


def _contact_issues(contact: Any, path: list[PathPart]) -> list[Issue]:
    if not isinstance(contact, dict):
        return [_invalid_type("object", contact, path)]
    out: list[Issue] = []
    ctype = contact.get("type")
    if "type" not in contact:
        out.append(_required("string", [*path, "type"]))
    elif not isinstance(ctype, str) or ctype not in CONTACT_TYPES:
        out.append(_enum(CONTACT_TYPES, ctype, [*path, "type"]))
    vpath = [*path, "value"]
    value = contact.get("value")
    if ctype == "email":
        if "value" not in contact:
            out.append(_required("string", vpath))
        elif not isinstance(value, str):
            out.append(_invalid_type("string", value, vpath))
        elif len(value) > MAX_EMAIL_CHARS:
            out.append(issue("too_big", f"String must contain at most {MAX_EMAIL_CHARS} character(s)",
                             vpath))
        elif not EMAIL_RE.match(value):
            out.append(issue("invalid_string", "Invalid email", vpath))
    elif ctype == "bitrix":
        if "value" not in contact:
            out.append(_required("number", vpath))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            out.append(_invalid_type("number", value, vpath))
        elif isinstance(value, float) and not value.is_integer():
            out.append(_invalid_type("integer", value, vpath))
        elif value <= 0:
            out.append(issue("too_small", "Number must be greater than 0", vpath))
    extra = [k for k in contact if k not in CONTACT_KEYS]
    if extra:
        out.append(_unrecognized(extra, path))
    return out


def validate_item(item: Any, limits: Limits = Limits()) -> tuple[dict[str, Any] | None, list[Issue]]:
    """One notification as sent → (normalised notification, []) or (None, issues).

    Every problem is reported, not only the first. Unknown keys (including ``id`` and
    ``subject``, which only the server sets) are ``unrecognized_keys``.
    """
    if not isinstance(item, dict):
        return None, [_invalid_type("object", item, [])]
    issues: list[Issue] = []
    contacts = item.get("contacts")
    if "contacts" not in item:
        issues.append(_required("array", ["contacts"]))
    elif not isinstance(contacts, list):
        issues.append(_invalid_type("array", contacts, ["contacts"]))
    else:
        issues += list_size_issues(contacts, ["contacts"], 1, limits.max_contacts)
        for i, c in enumerate(contacts):
            issues += _contact_issues(c, ["contacts", i])
    message = item.get("message")
    if "message" not in item:
        issues.append(_required("string", ["message"]))
    elif not isinstance(message, str):
        issues.append(_invalid_type("string", message, ["message"]))
    elif not message:
        issues.append(issue("too_small", "String must contain at least 1 character(s)", ["message"]))
    elif len(message) > limits.max_message_chars:
        issues.append(issue("too_big",
                            f"String must contain at most {limits.max_message_chars} character(s)",
                            ["message"]))
    immediate = item.get("isImmediate", False)
    if not isinstance(immediate, bool):
        issues.append(_invalid_type("boolean", immediate, ["isImmediate"]))
    strategy = item.get("strategy", DEFAULT_STRATEGY)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        issues.append(_enum(STRATEGIES, strategy, ["strategy"]))
    extra = [k for k in item if k not in ITEM_KEYS]
    if extra:
        issues.append(_unrecognized(extra, []))
    if issues:
        return None, issues
    assert isinstance(contacts, list)
    normalised = {
        "contacts": [{"type": c["type"], "value": int(c["value"]) if c["type"] == "bitrix"
                      else c["value"]} for c in contacts],
        "message": message,
        "isImmediate": immediate,
        "strategy": strategy,
    }
    return normalised, []


def rfc3339_ms(ts: float) -> str:
    """``2025-12-14T12:00:00.000Z``: the contract's timestamp form."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotificationDraft:
    """A validated notification about to be stored."""

    id: str
    subject_id: str
    subject_name: str | None
    contacts: list[dict[str, Any]]
    message: str
    is_immediate: bool
    strategy: str
    created_at: float  # seconds since the epoch


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The final response of a request that carried an ``Idempotency-Key``, stored in the
    same transaction as the notifications it accepted. ``claim`` identifies this request's
    hold on the key (another request may have taken an abandoned key over)."""

    subject_id: str
    key: str
    claim: str
    status: int
    body: bytes


class IdempotencyLost(Exception):
    """The key is no longer held by this request: nothing was stored."""


class AcceptRequest:
    """What the envelopes of one POST share (``meta["request"]``): the idempotency claim,
    if any, and how the request's response is built from the validated envelopes. The
    response is built once and cached, so what is stored with the key is exactly what the
    client is answered."""

    def __init__(self, respond: Callable[[], tuple[int, bytes]], *, subject_id: str | None = None,
                 key: str | None = None, claim: str | None = None) -> None:
        self._respond = respond
        self._response: tuple[int, bytes] | None = None
        self.subject_id = subject_id
        self.key = key
        self.claim = claim
        self.persisted = False  # the notifications (and the key's response) were committed

    def response(self) -> tuple[int, bytes]:
        if self._response is None:
            self._response = self._respond()
        return self._response

    def record(self) -> IdempotencyRecord | None:
        if self.key is None or self.subject_id is None or self.claim is None:
            return None
        status, body = self.response()
        return IdempotencyRecord(self.subject_id, self.key, self.claim, status, body)


class NotificationStore(Protocol):
    """Where accepted notifications live until they reach a final state.

    Guarantees: ``accept`` stores the notifications *and* their outbox entries in one
    transaction — when it returns, every one of them will be dispatched even if this
    process dies right after (the dispatcher's outbox loop resumes it); when it raises,
    none was stored. Storing an id twice is refused (the whole call raises). With an
    ``idempotency`` record, the key is marked done with its response in that same
    transaction, so a repeat of the request after the commit always replays the response
    and never stores (sends) again; if the key is no longer held by ``record.claim`` it
    raises ``IdempotencyLost`` and stores nothing.
    """

    async def accept(self, drafts: Sequence[NotificationDraft],
                     idempotency: IdempotencyRecord | None = None) -> None: ...


class DispatchKick(Protocol):
    """Asks the dispatcher to send these (immediate) notifications now.

    Best effort and non-blocking: a kick may be lost; the outbox loop still sends every
    stored notification, only later.
    """

    def kick(self, ids: Sequence[str]) -> None: ...


class SendStatus(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"  # may succeed later: retried with backoff
    PERMANENT = "permanent"  # will not succeed: this contact has failed
    UNAVAILABLE = "unavailable"  # the channel is not working now (breaker open)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message to one contact on one channel."""

    notification_id: str
    contact_index: int
    address: str | int
    message: str
    subject_name: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    status: SendStatus
    detail: str | None = None  # error text, or the provider's id on success

    @classmethod
    def ok(cls, detail: str | None = None) -> SendResult:
        return cls(SendStatus.DELIVERED, detail)

    @classmethod
    def transient(cls, detail: str) -> SendResult:
        return cls(SendStatus.TRANSIENT, detail)

    @classmethod
    def permanent(cls, detail: str) -> SendResult:
        return cls(SendStatus.PERMANENT, detail)


class Channel(Protocol):
    """A way to reach a contact (``kind`` is the contact type it serves).

    Guarantees: ``send`` returns exactly one result per delivery, in the same order, and
    classifies every failure as transient (worth retrying: timeouts, connection errors,
    SMTP 4xx, HTTP 5xx/429, rate limits) or permanent (SMTP 5xx, a rejected recipient);
    it raises only when the whole batch could not be attempted, which callers treat as
    transient for every item. Delivery is at-least-once: a message sent just before the
    process died may be sent again when the outbox resumes it. ``available`` is False
    while the channel should not be tried (its circuit breaker is open); a channel may
    also say how long that lasts with ``retry_after_s()`` (see ``GuardedChannel``).
    """

    kind: str

    def available(self) -> bool: ...

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]: ...


# --------------------------------------------------------------------------------------
# Circuit breaker, retry policy
# --------------------------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failures`` transient failures in a row; after ``reset_s`` lets one
    trial batch through (half-open): a success closes it, a failure opens it again.
    Permanent failures (a bad address) say nothing about the channel and are ignored."""

    def __init__(self, failures: int = 5, reset_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, failures)
        self.reset_s = reset_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.reset_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def remaining_s(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.reset_s - (self.clock() - self.opened_at))

    def allow(self) -> bool:
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def record(self, status: SendStatus) -> None:
        if status is SendStatus.DELIVERED:
            self.failures = 0
            self.opened_at = None
            self._trial = False
        elif status is SendStatus.TRANSIENT:
            self.failures += 1
            if self.opened_at is not None or self.failures >= self.threshold:
                self.opened_at = self.clock()
                self._trial = False


class GuardedChannel:
    """A channel behind a circuit breaker: ``available`` is False while it is open; a
    whole-batch exception counts as a transient failure of every item."""

    def __init__(self, inner: Channel, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.breaker = breaker

    def available(self) -> bool:
        return self.inner.available() and self.breaker.state is not BreakerState.OPEN

    def retry_after_s(self) -> float:
        return self.breaker.remaining_s()

    async def send(self, deliveries: Sequence[Delivery]) -> list[SendResult]:
        if not deliveries:
            return []
        if not self.breaker.allow():
            return [SendResult(SendStatus.UNAVAILABLE, "circuit breaker open")] * len(deliveries)
        try:
            results = await self.inner.send(deliveries)
        except Exception as exc:
            results = [SendResult.transient(f"{type(exc).__name__}: {exc}"[:500])] * len(deliveries)
        if len(results) != len(deliveries):
            raise RuntimeError(f"channel {self.kind} returned {len(results)} results "
                               f"for {len(deliveries)} deliveries")
        # One verdict per batch keeps the breaker's count meaningful: a batch of 100
        # timeouts is one failure of the channel, not 100.
        statuses = {r.status for r in results}
        if SendStatus.DELIVERED in statuses:
            self.breaker.record(SendStatus.DELIVERED)
        elif SendStatus.TRANSIENT in statuses:
            self.breaker.record(SendStatus.TRANSIENT)
        return results


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n (1-based) waits a random time in
    [d/2, d] where d = min(max_s, base_s * 2**(n-1)) ("equal jitter": never zero, and
    retries of a batch that failed together spread out)."""

    max_attempts: int = 5
    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        d = min(self.max_s, self.base_s * float(2 ** max(0, attempt - 1)))
        return d / 2 + rng() * d / 2


# --------------------------------------------------------------------------------------
# Dispatch: strategy over contacts, one round at a time
# --------------------------------------------------------------------------------------


class ContactStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"  # no channel configured for this contact type


class FinalState(StrEnum):
    DELIVERED = "delivered"
    PARTIALLY_DELIVERED = "partially_delivered"
    FAILED = "failed"


@dataclass
class ContactProgress:
    status: ContactStatus = ContactStatus.PENDING
    attempts: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "attempts": self.attempts, "lastError": self.last_error}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ContactProgress:
        return cls(ContactStatus(data.get("status", "pending")), int(data.get("attempts", 0)),
                   data.get("lastError"))


@dataclass
class Job:
    """A notification being dispatched, with what earlier rounds achieved."""

    id: str
    contacts: list[dict[str, Any]]
    message: str
    strategy: str
    subject_name: str | None = None
    round: int = 0
    progress: list[ContactProgress] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.progress:
            self.progress = [ContactProgress() for _ in self.contacts]


@dataclass(frozen=True, slots=True)
class Attempt:
    notification_id: str
    contact_index: int
    channel: str
    attempt: int
    status: SendStatus
    detail: str | None
    duration_s: float


@dataclass
class RoundResult:
    job: Job
    attempts: list[Attempt]
    final: FinalState | None  # None: not finished, retry after ``retry_in_s``
    retry_in_s: float = 0.0


def _settle(job: Job, policy: RetryPolicy, rng: Callable[[], float]) -> tuple[FinalState | None, float]:
    statuses = [p.status for p in job.progress]
    delivered = statuses.count(ContactStatus.DELIVERED)
    pending = statuses.count(ContactStatus.PENDING)
    if job.strategy == "send_to_first_available":
        if delivered:
            return FinalState.DELIVERED, 0.0
        if pending:
            return None, policy.delay(job.round, rng)
        return FinalState.FAILED, 0.0
    if pending:
        return None, policy.delay(job.round, rng)
    tried = [s for s in statuses if s is not ContactStatus.SKIPPED]
    if delivered and delivered == len(tried):
        return FinalState.DELIVERED, 0.0
    if delivered:
        return FinalState.PARTIALLY_DELIVERED, 0.0
    return FinalState.FAILED, 0.0


SKIP_WAIT_MIN_S = 1.0  # a passed-over job comes back no sooner than this


def _retry_after(channel: Channel) -> float:
    hint = getattr(channel, "retry_after_s", None)
    try:
        return float(hint()) if callable(hint) else 0.0
    except Exception:
        return 0.0


async def dispatch_round(
    jobs: Sequence[Job],
    channels: Mapping[str, Channel],
    policy: RetryPolicy,
    *,
    rng: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
) -> list[RoundResult]:
    """One dispatch round over a batch of jobs; sends are batched per channel.

    ``send_to_first_available``: contacts are tried in order, one at a time; the first
    success ends the job. A contact whose channel is not configured is skipped for good;
    one whose channel is not working now (breaker open) or that failed transiently is
    passed over for this round (the next contact is tried) and retried next round. A
    permanent failure fails that contact.
    ``send_to_all_available``: every pending contact is tried in the same round,
    independently.
    Every contact really sent to in a round uses one of its ``policy.max_attempts``
    attempts; a contact out of attempts has failed. A contact passed over because its
    channel is not working (``unavailable``) uses none: the pass-over is recorded (with
    the number of attempts used so far) but a short outage fails nothing. Jobs with
    pending contacts come back with ``retry_in_s``: backoff + jitter after a real attempt,
    else the time until a passed-over channel may be tried again (its breaker's remaining
    reset time). ``job.round`` counts rounds with at least one real attempt.
    """
    attempts: dict[str, list[Attempt]] = {j.id: [] for j in jobs}
    tried: set[str] = set()  # jobs with at least one real send this round
    waits: dict[str, float] = {}  # job → seconds until a passed-over channel may work
    for job in jobs:
        for i, contact in enumerate(job.contacts):
            if job.progress[i].status is ContactStatus.PENDING and contact.get("type") not in channels:
                job.progress[i].status = ContactStatus.SKIPPED
                job.progress[i].last_error = f"no {contact.get('type')} channel is configured"
    # Which contacts each job still has to try this round (in order).
    queue: dict[str, list[int]] = {
        j.id: [i for i, p in enumerate(j.progress) if p.status is ContactStatus.PENDING]
        for j in jobs
    }
    by_id = {j.id: j for j in jobs}
    while True:
        wave: dict[str, list[tuple[Job, int]]] = {}
        for job in jobs:
            todo = queue[job.id]
            if not todo:
                continue
            if job.strategy == "send_to_first_available":
                picks = [todo.pop(0)]
            else:
                picks, queue[job.id] = list(todo), []
            for i in picks:
                wave.setdefault(job.contacts[i]["type"], []).append((job, i))
        if not wave:
            break
        for kind, items in wave.items():
            channel = channels[kind]
            t0 = clock()
            if channel.available():
                results = await channel.send([
                    Delivery(job.id, i, job.contacts[i]["value"], job.message, job.subject_name)
                    for job, i in items
                ])
            else:
                results = [SendResult(SendStatus.UNAVAILABLE, f"{kind} channel is not working")
                           ] * len(items)
            took = (clock() - t0) / max(1, len(items))
            for (job, i), res in zip(items, results, strict=True):
                prog = job.progress[i]
                if res.status is SendStatus.UNAVAILABLE:
                    # Passed over, not tried: no attempt is used.
                    prog.last_error = res.detail
                    attempts[job.id].append(Attempt(job.id, i, kind, prog.attempts, res.status,
                                                    res.detail, 0.0))
                    wait = max(SKIP_WAIT_MIN_S, _retry_after(channel))
                    waits[job.id] = min(waits.get(job.id, wait), wait)
                    continue
                tried.add(job.id)
                prog.attempts += 1
                attempts[job.id].append(Attempt(job.id, i, kind, prog.attempts, res.status,
                                                res.detail, took))
                if res.status is SendStatus.DELIVERED:
                    prog.status = ContactStatus.DELIVERED
                    prog.last_error = None
                    queue[job.id] = []  # first_available: done; all: nothing left queued
                    continue
                prog.last_error = res.detail
                if res.status is SendStatus.PERMANENT or prog.attempts >= policy.max_attempts:
                    prog.status = ContactStatus.FAILED
    out: list[RoundResult] = []
    for job_id, tries in attempts.items():
        job = by_id[job_id]
        if job_id in tried:
            job.round += 1
        final, delay = _settle(job, policy, rng)
        if final is None and job_id not in tried and job_id in waits:
            # Only passed over: come back when the channel may work again (a little
            # jitter spreads the jobs that wait for the same breaker).
            delay = waits[job_id] * (1.0 + 0.1 * rng())
        if final is None and job.round >= policy.max_attempts * max(1, len(job.contacts)):
            # Safety net: never keep a job forever (rounds with real attempts only).
            for p in job.progress:
                if p.status is ContactStatus.PENDING:
                    p.status = ContactStatus.FAILED
            final, delay = _settle(job, policy, rng)
        out.append(RoundResult(job, tries, final, delay))
    return out


# --------------------------------------------------------------------------------------
# Pacing of the dispatcher's loops (the feedback loop of stages/feedback.py)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What one dispatch round saw downstream."""

    latency_s: float  # how long the round took (sends + recording)
    attempts: int = 0  # real sends plus pass-overs
    failures: int = 0  # transient failures and pass-overs (channel not working)
    channels_down: bool = False  # every configured channel is not working now
    error: bool = False  # the round could not run (store or channel raised)


class DispatchPacer:
    """How much a dispatcher loop claims per round and how long it waits between rounds.

    An AIMD ``Pacer``: a round slower than ``target_latency_s``, a round that failed, or
    one where at least ``failure_ratio`` of the attempts failed transiently or found their
    channel not working halves the batch and doubles the interval (up to
    ``max_interval_s``); a healthy round grows the batch by a tenth of ``batch_size`` and
    halves the interval back towards ``interval_s``. When every channel is down the loop
    is *paused*: it claims nothing (claiming would only pass work over) until a channel
    works again — a breaker half-opening is enough — and then recovers by itself.
    """

    def __init__(self, batch_size: int, interval_s: float, *, target_latency_s: float = 10.0,
                 failure_ratio: float = 0.5, max_interval_s: float | None = None) -> None:
        batch_size = max(1, batch_size)
        self.failure_ratio = failure_ratio
        self.pacer = Pacer(PaceConfig(
            min_interval_s=interval_s,
            max_interval_s=max(interval_s, max_interval_s if max_interval_s is not None
                               else max(interval_s * 16, 30.0)),
            min_batch=max(1, batch_size // 10),
            max_batch=batch_size,
            step=max(1, batch_size // 10),
            target_latency_s=target_latency_s,
            # "backlog" here is 1 when every channel is down: that alone pauses the loop.
            high_backlog=1,
            saturated_backlog=1,
        ))

    @property
    def batch(self) -> int:
        return self.pacer.batch

    @property
    def interval_s(self) -> float:
        return self.pacer.interval_s

    @property
    def paused(self) -> bool:
        return self.pacer.paused

    @property
    def state(self) -> str:
        return self.pacer.state

    def observe(self, report: RoundReport) -> None:
        failing = report.attempts > 0 and report.failures >= self.failure_ratio * report.attempts
        self.pacer.observe(latency_s=report.latency_s, backlog=1 if report.channels_down else 0,
                           refused=report.error or failing)


# --------------------------------------------------------------------------------------
# Pipeline stages
# --------------------------------------------------------------------------------------


class ValidateNotification:
    """Per-item validation; valid items get their id, createdAt and normalised form."""

    name = "validate_notification"

    def __init__(self, id_factory: Callable[[], str] = lambda: str(uuid.uuid4()),
                 limits: Limits = Limits()) -> None:
        self.id_factory = id_factory
        self.limits = limits

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        out: list[Outcome] = []
        for env in batch:
            normalised, issues = validate_item(env.fields.get("notification"), self.limits)
            if normalised is None:
                env.meta["errors"] = issues
                out.append(Outcome.reject(env, "invalid", "; ".join(i["message"] for i in issues)))
                continue
            subject = env.meta.get("subject") or {"id": env.sender}
            notification_id = self.id_factory()
            env.meta["notification"] = {
                "id": notification_id,
                "createdAt": rfc3339_ms(env.received_at),
                **normalised,
                "subject": subject,
            }
            out.append(Outcome.ok(env))
        return out


class PersistNotification:
    """Stores the batch's valid notifications with their outbox entries (one transaction)
    and, when the request carries an idempotency key (``meta["request"]``, an
    ``AcceptRequest``), the key's final response in that same transaction."""

    name = "persist_notification"

    def __init__(self, store: NotificationStore) -> None:
        self.store = store

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        drafts = []
        for env in batch:
            n = env.meta["notification"]
            drafts.append(NotificationDraft(
                id=n["id"], subject_id=n["subject"]["id"], subject_name=n["subject"].get("name"),
                contacts=n["contacts"], message=n["message"], is_immediate=n["isImmediate"],
                strategy=n["strategy"], created_at=env.received_at,
            ))
        if drafts:
            request = next((e.meta["request"] for e in batch
                            if isinstance(e.meta.get("request"), AcceptRequest)), None)
            record = request.record() if request is not None else None
            await self.store.accept(drafts, idempotency=record)
            if request is not None:
                request.persisted = True
        return [Outcome.ok(env) for env in batch]


class RouteNotification:
    """Immediate notifications are handed to the dispatcher now; the others wait for the
    next batch flush. Losing the hand-off loses nothing (the outbox has them)."""

    name = "route_notification"

    def __init__(self, dispatcher: DispatchKick | None) -> None:
        self.dispatcher = dispatcher

    async def process(self, batch: Sequence[Envelope]) -> list[Outcome]:
        now = [e.meta["notification"]["id"] for e in batch if e.meta["notification"]["isImmediate"]]
        if now and self.dispatcher is not None:
            self.dispatcher.kick(now)
        for env in batch:
            env.meta["route"] = "immediate" if env.meta["notification"]["isImmediate"] else "queued"
        return [Outcome.done(env) for env in batch]


def register_notification_stages(reg: StageRegistry) -> None:
    def port(ports: Mapping[str, Any], name: str, stage: str) -> Any:
        try:
            return ports[name]
        except KeyError:
            raise ConfigError(f"stage {stage!r} needs port {name!r}, which this host lacks") from None

    def limits(o: Mapping[str, Any], p: Mapping[str, Any]) -> Limits:
        settings = p.get("settings")
        return Limits(
            int(o.get("max_contacts", getattr(settings, "notification_max_contacts", MAX_CONTACTS))),
            int(o.get("max_message_chars",
                      getattr(settings, "notification_max_message_chars", MAX_MESSAGE_CHARS))))

    reg.register("validate_notification", lambda o, p: ValidateNotification(limits=limits(o, p)))
    reg.register("persist_notification",
                 lambda o, p: PersistNotification(port(p, "notification_store", "persist_notification")))
    reg.register("route_notification",
                 lambda o, p: RouteNotification(p.get("notification_dispatch")))
