"""The AsyncAPI 3.0 document of the WebSocket protocol (PROTOCOL.md), served at
``/asyncapi.json``.

Written from the application's side: client frames are operations the application
``receive``s, server frames ones it ``send``s. Every frame is one JSON object with a
string ``type`` (``system`` frames also an ``event``); each message's payload pins them
with ``const``, so a frame names the one message that describes it (:func:`message_for`).
Payloads of server frames list every field the server writes (``additionalProperties:
false``): a new field must be documented here first. Client frames may carry more
fields than listed; the server ignores them.
"""

from __future__ import annotations

from typing import Any

from deployments.gateway import close_codes
from deployments.gateway.frames import MAX_CLIENT_ID

CHANNEL = "socket"
MESSAGES = "#/components/messages/"
SCHEMAS = "#/components/schemas/"

CLOSE_CODES = {
    str(close_codes.SERVER_ERROR): "The token could not be checked: the issuer's keys are "
                                   "unreachable (retry later).",
    str(close_codes.RESTARTING): "The gateway replica is shutting down (after a `system` "
                                 "`reconnect` frame): reconnect, to another replica.",
    str(close_codes.BAD_TOKEN): "The handshake's token is missing, malformed, badly signed or "
                                "expired.",
    str(close_codes.SLOW_CONSUMER): "Slow consumer (after a `system` `slow_consumer` frame): "
                                    "the client did not receipt what was written to it.",
    str(close_codes.TOO_MANY_CONNECTIONS): "The user holds as many open connections as "
                                           "allowed (`max_connections_per_user`).",
    str(close_codes.TOO_MANY_ATTEMPTS): "Too many connection attempts "
                                        "(`connection_attempts_per_minute`); the reason says "
                                        "when to retry.",
}


def _string(**more: Any) -> dict[str, Any]:
    return {"type": "string", **more}


INTEGER: dict[str, Any] = {"type": "integer"}
SEQ: dict[str, Any] = {"type": "integer", "minimum": 1}
CLIENT_ID = _string(minLength=1, maxLength=MAX_CLIENT_ID, pattern="^(?!attachment:)",
                    description="Unique per sender: the dedup key. `attachment:…` is the "
                                "server's own key space.")


def _frame(frame_type: str, required: list[str], properties: dict[str, Any], *,
           closed: bool = True, event: str | None = None, description: str = "") -> dict[str, Any]:
    props: dict[str, Any] = {"type": {"const": frame_type}}
    if event is not None:
        props["event"] = {"const": event}
    props.update(properties)
    schema: dict[str, Any] = {"type": "object",
                              "required": ["type", *(["event"] if event else []), *required],
                              "properties": props}
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _system(event: str, data_required: list[str], data: dict[str, Any], description: str
            ) -> dict[str, Any]:
    return _frame("system", ["data"], {"data": {
        "type": "object", "required": data_required, "additionalProperties": False,
        "properties": data}}, event=event, description=description)


def schemas(settings: Any = None) -> dict[str, Any]:
    max_body = getattr(settings, "max_body_chars", 4000)
    error_body = {"type": "object", "required": ["code", "message"], "additionalProperties": False,
                  "properties": {
                      "code": {"enum": ["credits_exhausted", "forbidden", "invalid", "overloaded",
                                        "not_found"],
                               "description": "`forbidden`: a chat, attachment or command "
                                              "in a chat the sender is not a member of, an "
                                              "edit or delete of another author's message, "
                                              "or a signal to a user who shares no chat "
                                              "with the sender (`signal_scope` "
                                              "`contacts`)."},
                      "message": _string(),
                      "retryAfter": {"type": ["number", "null"],
                                     "description": "Seconds; with `credits_exhausted`."}}}
    return {
        "Attachment": {"type": "object", "additionalProperties": False,
                       "required": ["attachmentId", "fileName", "contentType", "size", "url"],
                       "properties": {"attachmentId": _string(), "fileName": _string(),
                                      "contentType": _string(), "size": INTEGER,
                                      "url": _string(description="GET it (members) for a "
                                                                 "download URL.")}},
        "MessageFrame": _frame("message", [
            "messageId", "chatId", "seq", "senderId", "kind", "body", "createdAt"], {
            "messageId": _string(), "chatId": _string(), "seq": SEQ, "senderId": _string(),
            "kind": {"enum": ["text", "attachment"]},
            "body": {"type": ["string", "null"], "description": "null once deleted (history)."},
            "createdAt": _string(format="date-time"),
            "attachment": {"$ref": SCHEMAS + "Attachment"},
            "editedAt": _string(format="date-time"), "deleted": {"const": True},
            "reactions": {"type": "object", "additionalProperties": INTEGER}},
            description="A stored chat message (live, or in `sync`/history in its current "
                        "state). Answer with a `receipt`."),
        "CommandFrame": _frame("command", [
            "op", "messageId", "chatId", "seq", "by", "eventId", "createdAt"], {
            "op": {"enum": ["edit", "react", "delete"]},
            "messageId": _string(description="The message acted on."), "chatId": _string(),
            "seq": SEQ, "by": _string(), "eventId": _string(description="What receipts name."),
            "createdAt": _string(format="date-time"), "body": {"type": ["string", "null"]},
            "emoji": {"type": ["string", "null"]},
            "added": {"type": ["boolean", "null"], "description": "react: added or removed."}},
            description="A command event, with its own seq in the chat."),
        "AckError": error_body,
        "ClientBody": _string(maxLength=max_body),
    }


def messages(settings: Any = None) -> dict[str, dict[str, Any]]:
    """Every frame, by message name."""
    client: dict[str, Any] = {
        "clientChat": ("A chat message.", _frame("chat", ["id", "chatId", "body"], {
            "id": CLIENT_ID, "chatId": _string(),
            "body": {"$ref": SCHEMAS + "ClientBody"}}, closed=False),
            {"type": "chat", "id": "c-1", "chatId": "<chat>", "body": "hi Bob"}),
        "clientSignal": ("An ephemeral signal to one user (never stored): a contact of the "
                         "sender (a user sharing at least one chat with it) or the sender "
                         "itself (its connections, the sending one too), unless "
                         "`signal_scope` is `anyone`; to anyone else it is acked `rejected` "
                         "`forbidden` and not forwarded. `typing` signals carry `chatId` in "
                         "the payload.",
                         _frame("signal", ["id", "to", "payload"], {
                             "id": CLIENT_ID, "to": _string(), "payload": {"type": "object"}},
                             closed=False),
                         {"type": "signal", "id": "s-1", "to": "bob",
                          "payload": {"typing": True, "chatId": "<chat>"}}),
        "clientAttachment": ("Phase 1 of an attachment: its ack carries the upload URL.",
                             _frame("attachment", ["id", "chatId", "fileName", "contentType",
                                                   "size"], {
                                 "id": CLIENT_ID, "chatId": _string(), "fileName": _string(),
                                 "contentType": _string(), "size": {"type": "integer",
                                                                    "minimum": 1}}, closed=False),
                             {"type": "attachment", "id": "a-1", "chatId": "<chat>",
                              "fileName": "cat.png", "contentType": "image/png", "size": 1024}),
        "clientCommand": ("Edit (author), react (members; the same emoji again removes it) "
                          "or delete (author).",
                          {**_frame("command", ["id", "op", "messageId"], {
                              "id": CLIENT_ID, "op": {"enum": ["edit", "react", "delete"]},
                              "messageId": _string(), "body": {"$ref": SCHEMAS + "ClientBody"},
                              "emoji": _string()}, closed=False),
                           "allOf": [
                               {"if": {"properties": {"op": {"const": "edit"}}},
                                "then": {"required": ["body"]}},
                               {"if": {"properties": {"op": {"const": "react"}}},
                                "then": {"required": ["emoji"]}}]},
                          {"type": "command", "id": "c-3", "op": "react", "messageId": "<id>",
                           "emoji": "👍"}),
        "clientReceipt": ("The receiver's ACK: cumulative per chat (a receipt for seq N "
                          "covers everything up to N).",
                          _frame("receipt", ["messageIds", "status"], {
                              "messageIds": {"type": "array", "minItems": 1,
                                             "items": _string()},
                              "status": {"enum": ["delivered", "read"]}}, closed=False),
                          {"type": "receipt", "messageIds": ["<id>"], "status": "read"}),
        "clientSync": ("A page of a chat's history (members).",
                       _frame("sync", ["id", "chatId"], {
                           "id": CLIENT_ID, "chatId": _string(),
                           "afterSeq": {"type": "integer", "minimum": 0,
                                        "maximum": 2**63 - 1, "default": 0},
                           "limit": {"type": "integer", "minimum": 1, "maximum": 500,
                                     "default": 50}}, closed=False),
                       {"type": "sync", "id": "s-1", "chatId": "<chat>", "afterSeq": 0,
                        "limit": 50}),
        "clientPing": ("Answered by `pong`.", _frame("ping", [], {}, closed=False),
                       {"type": "ping"}),
    }
    ack_fields = {
        "id": _string(description="The client's id of the frame acked."),
        "status": {"enum": ["accepted", "duplicate", "rejected"]},
        "messageId": _string(), "chatId": _string(), "seq": SEQ,
        "attachmentId": _string(), "uploadUrl": _string(), "uploadToken": _string(),
        "expiresAt": _string(format="date-time"),
        "targetMessageId": _string(description="A command's target."),
        "error": {"$ref": SCHEMAS + "AckError"},
    }
    ack = {**_frame("ack", ["id", "status"], ack_fields),
           "oneOf": [{"properties": {"status": {"enum": ["accepted", "duplicate"]}},
                      "not": {"required": ["error"]}},
                     {"properties": {"status": {"const": "rejected"}}, "required": ["error"]}]}
    server: dict[str, Any] = {
        "ack": ("The answer to a client frame with an `id` (not `receipt`, `sync`, `ping`). "
                "Chat, attachment and command acks carry `messageId, chatId, seq`; an "
                "attachment's adds the upload URL; a command's `targetMessageId`; a signal's "
                "nothing more. A refused frame's ack is `rejected` with an `error`.", ack,
                [{"name": "accepted", "summary": "A chat message stored.",
                  "payload": {"type": "ack", "id": "c-1", "status": "accepted",
                              "messageId": "<id>", "chatId": "<chat>", "seq": 1}},
                 {"name": "signalForbidden",
                  "summary": "A signal to a user who shares no chat with the sender "
                             "(`signal_scope` `contacts`): nothing is forwarded.",
                  "payload": {"type": "ack", "id": "s-1", "status": "rejected",
                              "error": {"code": "forbidden", "message": "the recipient "
                                        "shares no chat with the sender"}}}]),
        "message": ("A chat message for a member.", {"$ref": SCHEMAS + "MessageFrame"},
                    {"type": "message", "messageId": "<id>", "chatId": "<chat>", "seq": 1,
                     "senderId": "alice", "kind": "text", "body": "hi Bob",
                     "createdAt": "2026-11-30T06:00:00.000Z"}),
        "serverSignal": ("A signal from another user.", _frame("signal", ["id", "from", "payload"], {
            "id": _string(), "from": _string(), "payload": {"type": "object"}}),
            {"type": "signal", "id": "s-1", "from": "alice", "payload": {"typing": True}}),
        "serverCommand": ("A command event for a member.", {"$ref": SCHEMAS + "CommandFrame"},
                          {"type": "command", "op": "react", "messageId": "<id>",
                           "chatId": "<chat>", "seq": 2, "by": "bob", "eventId": "<event>",
                           "createdAt": "2026-11-30T06:00:00.000Z", "emoji": "👍",
                           "added": True}),
        "serverSync": ("The answer to `sync`: messages and command events in seq order.",
                       _frame("sync", ["id", "chatId", "messages", "hasMore"], {
                           "id": _string(), "chatId": _string(),
                           "messages": {"type": "array", "items": {"oneOf": [
                               {"$ref": SCHEMAS + "MessageFrame"},
                               {"$ref": SCHEMAS + "CommandFrame"}]}},
                           "hasMore": {"type": "boolean"}}),
                       {"type": "sync", "id": "s-1", "chatId": "<chat>", "messages": [],
                        "hasMore": False}),
        "error": ("A frame refused before any pipeline; the connection stays open. `id` when "
                  "the frame had one and was parsed (an oversized frame is refused unparsed).",
                  _frame("error", ["code", "message"], {
                      "id": _string(),
                      "code": {"enum": ["bad_frame", "unknown_type", "too_large", "forbidden",
                                        "not_found", "invalid", "credits_exhausted",
                                        "overloaded", "internal"],
                               "description": "`internal`: the server failed to handle the "
                                              "frame (a store unreachable during a `sync`)."},
                      "message": _string()}),
                  {"type": "error", "code": "unknown_type", "message": "unknown frame type 'x'"}),
        "pong": ("The answer to `ping`.", _frame("pong", [], {}), {"type": "pong"}),
        "systemConnected": ("Always the first frame of a connection.", _system(
            "connected", ["userId", "connectionId", "gateway"],
            {"userId": _string(), "connectionId": _string(),
             "gateway": _string(description="The gateway replica's id.")},
            "The connection is open."), {"type": "system", "event": "connected", "data": {
                "userId": "alice", "connectionId": "<connection>", "gateway": "<replica>"}}),
        "systemPresence": ("A contact went online or offline.", _system(
            "presence", ["userId", "online", "lastSeen"],
            {"userId": _string(), "online": {"type": "boolean"},
             "lastSeen": {"type": ["string", "null"], "format": "date-time"}},
            "Droppable."), {"type": "system", "event": "presence", "data": {
                "userId": "bob", "online": True, "lastSeen": None}}),
        "systemReceipt": ("A member's pointers moved (the sender's delivered/read ticks).",
                          _system("receipt", ["chatId", "userId", "deliveredSeq", "readSeq"],
                                  {"chatId": _string(), "userId": _string(),
                                   "deliveredSeq": INTEGER, "readSeq": INTEGER},
                                  "Best effort: `GET /v1/chats` has the positions too."),
                          {"type": "system", "event": "receipt", "data": {
                              "chatId": "<chat>", "userId": "bob", "deliveredSeq": 1,
                              "readSeq": 1}}),
        "systemCreditsLow": ("The sender's credits fell below the low-water mark.", _system(
            "credits_low", ["remaining"], {"remaining": INTEGER}, "Once per crossing."),
            {"type": "system", "event": "credits_low", "data": {"remaining": 9}}),
        "systemCreditsExhausted": ("No credits left; frames are acked rejected until then.",
                                   _system("credits_exhausted", ["retryAfter"], {
                                       "retryAfter": {"type": ["number", "null"],
                                                      "description": "Seconds; null: never "
                                                                     "(a cost above capacity)."}},
                                       "Once per batch."),
                                   {"type": "system", "event": "credits_exhausted",
                                    "data": {"retryAfter": 1.5}}),
        "systemOverload": ("A durable frame type's buffer is full: the server stops reading "
                           "the socket until it has room.", _system(
                               "overload", ["type", "buffered"],
                               {"type": _string(description="The frame type."),
                                "buffered": INTEGER}, "Once per overload episode."),
                           {"type": "system", "event": "overload",
                            "data": {"type": "chat", "buffered": 64}}),
        "systemReconnect": ("Reconnect (the socket then closes with 1012).", _system(
            "reconnect", ["reason", "retryAfter"], {"reason": _string(),
                                                    "retryAfter": {"type": "number"}},
            "Sent when a gateway replica shuts down."),
            {"type": "system", "event": "reconnect",
             "data": {"reason": "gateway shutting down", "retryAfter": 1}}),
        "systemSlowConsumer": ("The client did not receipt what was written to it: the "
                               "socket then closes with 4408.", _system(
                                   "slow_consumer", ["reason", "unreceipted"],
                                   {"reason": _string(), "unreceipted": INTEGER},
                                   "See `connection_unreceipted_max`, `slow_consumer_s`."),
                               {"type": "system", "event": "slow_consumer",
                                "data": {"reason": "no receipt for 30 s", "unreceipted": 1024}}),
        "systemAttachmentRejected": ("An uploaded file was refused; it never reaches the chat.",
                                     _system("attachment_rejected",
                                             ["attachmentId", "chatId", "code", "reason"], {
                                                 "attachmentId": _string(), "chatId": _string(),
                                                 "code": {"enum": ["too_large", "size_mismatch",
                                                                   "type_mismatch", "infected",
                                                                   "too_large_to_scan"]},
                                                 "reason": _string()}, "To the uploader."),
                                     {"type": "system", "event": "attachment_rejected",
                                      "data": {"attachmentId": "<id>", "chatId": "<chat>",
                                               "code": "type_mismatch",
                                               "reason": "not a PNG image"}}),
    }
    out: dict[str, dict[str, Any]] = {}
    for direction, table in (("client", client), ("server", server)):
        for name, (summary, payload, example) in table.items():
            out[name] = {"name": name, "title": name, "summary": summary,
                         "contentType": "application/json", "payload": payload,
                         "examples": (example if isinstance(example, list)
                                      else [{"payload": example}]),
                         "x-direction": "client-to-server" if direction == "client"
                         else "server-to-client"}
    return out


CLIENT_TO_SERVER = ("clientChat", "clientSignal", "clientAttachment", "clientCommand",
                    "clientReceipt", "clientSync", "clientPing")
# What answers each client frame (a `reply` in AsyncAPI terms).
REPLIES = {"clientChat": ["ack", "error"], "clientSignal": ["ack", "error"],
           "clientAttachment": ["ack", "error"], "clientCommand": ["ack", "error"],
           "clientReceipt": ["error"], "clientSync": ["serverSync", "error"],
           "clientPing": ["pong"]}


def _channel_message(name: str) -> dict[str, str]:
    return {"$ref": f"#/channels/{CHANNEL}/messages/{name}"}


def asyncapi_document(settings: Any = None) -> dict[str, Any]:
    """The whole AsyncAPI 3.0 document."""
    msgs = messages(settings)
    server_frames = [n for n in msgs if n not in CLIENT_TO_SERVER]
    operations: dict[str, Any] = {}
    for name in CLIENT_TO_SERVER:
        operations[f"receive{name[len('client'):]}"] = {
            "action": "receive", "channel": {"$ref": f"#/channels/{CHANNEL}"},
            "summary": msgs[name]["summary"], "messages": [_channel_message(name)],
            "reply": {"channel": {"$ref": f"#/channels/{CHANNEL}"},
                      "messages": [_channel_message(r) for r in REPLIES[name]]}}
    for name in server_frames:
        operations[f"send{name[0].upper()}{name[1:]}"] = {
            "action": "send", "channel": {"$ref": f"#/channels/{CHANNEL}"},
            "summary": msgs[name]["summary"], "messages": [_channel_message(name)]}
    close = "; ".join(f"{code}: {text}" for code, text in CLOSE_CODES.items())
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Conveyor WebSocket protocol", "version": "1.0.0",
                 "description": "One socket per client at `/v1/ws`: JSON frames both ways, "
                                "camelCase, UTF-8. The first frame is always `system` "
                                "`connected`. A chat acked `accepted` or `duplicate` is stored "
                                "and delivered to every member's connections until each sends "
                                "a `receipt`; within a chat `seq` increases by one. No "
                                "string of a client frame may contain U+0000, and no frame "
                                "may nest deeper than 32 levels (`error` `invalid`). HTTP "
                                "endpoints: `/openapi.json`."},
        "defaultContentType": "application/json",
        "servers": {"conveyor": {
            "host": "127.0.0.1:8000", "protocol": "ws",
            "description": "Where Ray Serve's proxy listens (`wss` behind TLS).",
            "security": [{"$ref": "#/components/securitySchemes/bearer"},
                         {"$ref": "#/components/securitySchemes/accessToken"}]}},
        "channels": {CHANNEL: {
            "address": "/v1/ws", "title": "The client's socket",
            "description": "A bad or missing token closes the handshake with 4401 (or HTTP "
                           f"401 before the upgrade). Close codes: {close}.",
            "servers": [{"$ref": "#/servers/conveyor"}],
            "messages": {name: {"$ref": MESSAGES + name} for name in msgs},
            "bindings": {"ws": {"method": "GET", "query": {
                "type": "object", "properties": {"access_token": {
                    "type": "string", "description": "The JWT, for clients that cannot set "
                                                     "headers (browsers)."}}},
                "bindingVersion": "0.1.0"}},
            "x-close-codes": CLOSE_CODES}},
        "operations": operations,
        "components": {
            "messages": msgs,
            "schemas": schemas(settings),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "`Authorization: Bearer <JWT>`; the user is `sub`."},
                "accessToken": {"type": "httpApiKey", "name": "access_token", "in": "query",
                                "description": "The same JWT as `?access_token=`."}}},
    }


def message_for(document: dict[str, Any], frame: dict[str, Any], direction: str
                ) -> str | None:
    """The name of the message of ``direction`` (``server-to-client`` or
    ``client-to-server``) whose payload pins this frame's ``type`` (and ``event``)."""
    components = document["components"]
    for name, message in components["messages"].items():
        if message.get("x-direction") != direction:
            continue
        payload = message["payload"]
        if "$ref" in payload:
            payload = components["schemas"][payload["$ref"].rsplit("/", 1)[-1]]
        props = payload.get("properties", {})
        if props.get("type", {}).get("const") != frame.get("type"):
            continue
        if "event" in props and props["event"].get("const") != frame.get("event"):
            continue
        return str(name)
    return None
