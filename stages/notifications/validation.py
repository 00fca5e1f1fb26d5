"""Validating one notification item against the seed-004 contract: the vocabulary,
the limits, and errors as ``{code, message, path}`` in the contract's terms."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

CONTACT_TYPES = ("email", "bitrix")
STRATEGIES = ("send_to_first_available", "send_to_all_available")
DEFAULT_STRATEGY = "send_to_first_available"
ITEM_KEYS = ("contacts", "message", "isImmediate", "strategy")
CONTACT_KEYS = ("type", "value")
MAX_ITEMS = 100
MAX_CONTACTS = 20  # defaults of the settings notification_max_contacts / _max_message_chars
MAX_MESSAGE_CHARS = 10_000
MAX_EMAIL_CHARS = 254
MAX_BITRIX_ID = 2**63 - 1  # stored as a JSON number: larger ones would not round-trip


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-item limits beyond the contract's own (at least one contact, a non-empty message)."""

    max_contacts: int = MAX_CONTACTS
    max_message_chars: int = MAX_MESSAGE_CHARS

# The e-mail rule of the schema library the contract's messages come from, written so the
# OpenAPI document can carry it as is (no lookahead, no flags: ASCII letters of either case;
# the local part neither starts with a dot, nor ends with an apostrophe, nor has two dots
# in a row). Checked with ``fullmatch``: a trailing newline is not part of an address.
EMAIL_PATTERN = (r"^([A-Za-z0-9_'+-]+\.)*[A-Za-z0-9_'+-]*[A-Za-z0-9_+-]"
                 r"@([A-Za-z0-9][A-Za-z0-9-]*\.)+[A-Za-z]{2,}$")
EMAIL_RE = re.compile(EMAIL_PATTERN)

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
        elif not EMAIL_RE.fullmatch(value):
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
        elif value > MAX_BITRIX_ID:
            out.append(issue("too_big", f"Number must be less than or equal to {MAX_BITRIX_ID}",
                             vpath))
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
    elif "\x00" in message:  # PostgreSQL text cannot hold it
        issues.append(issue("invalid_string", "String must not contain U+0000", ["message"]))
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
