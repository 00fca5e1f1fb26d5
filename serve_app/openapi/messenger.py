"""The messenger's HTTP resources: chats, a chat's history, presence."""

from __future__ import annotations

from typing import Any

from serve_app.openapi.common import (
    STORABLE,
    common,
    error_response,
    json_content,
    ok,
    ref,
    secured,
    unauthorized,
)

MAX_SEQ = 2**63 - 1  # seq is a PostgreSQL bigint
CHAT_ID = "6f1c2a9e-3b7d-4e55-9a0c-2d8e4b1f7a63"
MESSAGE_ID = "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9"
EVENT_ID = "2c3d4e5f-6071-4829-93a4-b5c6d7e8f901"
AT = "2026-11-30T06:00:00.000Z"

USER_ID = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": STORABLE,
           "examples": ["bob"]}

SCHEMAS: dict[str, Any] = {
    "NewChat": {
        "type": "object", "required": ["members"],
        "description": "The caller is a member too. Unknown keys are ignored.",
        "properties": {
            "members": {"type": "array", "minItems": 1, "maxItems": 1000, "items": USER_ID},
            "title": {"type": ["string", "null"], "maxLength": 200, "pattern": STORABLE}},
    },
    "Chat": {"type": "object", "required": ["chatId", "members", "title"], "properties": {
        "chatId": {"type": "string"},
        "members": {"type": "array", "items": {"type": "string"}},
        "title": {"type": ["string", "null"]}}},
    "Peer": {"type": "object", "required": ["userId", "deliveredSeq", "readSeq"], "properties": {
        "userId": {"type": "string"}, "deliveredSeq": {"type": "integer"},
        "readSeq": {"type": "integer"}}},
    "ChatSummary": {
        "type": "object",
        "required": ["chatId", "title", "members", "lastSeq", "deliveredSeq", "readSeq",
                     "unreadCount", "peers"],
        "properties": {
            "chatId": {"type": "string"}, "title": {"type": ["string", "null"]},
            "members": {"type": "array", "items": {"type": "string"}},
            "lastSeq": {"type": "integer", "description": "The chat's newest seq."},
            "deliveredSeq": {"type": "integer", "description": "The caller's pointers."},
            "readSeq": {"type": "integer"},
            "unreadCount": {"type": ["integer", "null"],
                            "description": "Messages (not command events) from others after "
                                           "the caller's read pointer."},
            "peers": {"type": "array", "items": ref("Peer")}}},
    "ChatList": {"type": "object", "required": ["chats"], "properties": {
        "chats": {"type": "array", "items": ref("ChatSummary")}}},
    "Attachment": {"type": "object", "required": ["attachmentId", "fileName", "contentType",
                                                  "size", "url"], "properties": {
        "attachmentId": {"type": "string"}, "fileName": {"type": "string"},
        "contentType": {"type": "string"}, "size": {"type": "integer"},
        "url": {"type": "string", "description": "`GET` it for a download URL (members)."}}},
    "HistoryMessage": {
        "type": "object", "required": ["type", "messageId", "chatId", "seq", "senderId", "kind",
                                       "body", "createdAt"],
        "properties": {
            "type": {"const": "message"}, "messageId": {"type": "string"},
            "chatId": {"type": "string"}, "seq": {"type": "integer", "minimum": 1},
            "senderId": {"type": "string"}, "kind": {"enum": ["text", "attachment"]},
            "body": {"type": ["string", "null"], "description": "null once deleted."},
            "createdAt": {"type": "string"}, "editedAt": {"type": "string"},
            "deleted": {"const": True},
            "reactions": {"type": "object", "additionalProperties": {"type": "integer"}},
            "attachment": ref("Attachment")}},
    "HistoryCommand": {
        "type": "object", "required": ["type", "op", "messageId", "chatId", "seq", "by",
                                       "eventId", "createdAt"],
        "properties": {
            "type": {"const": "command"}, "op": {"enum": ["edit", "react", "delete"]},
            "messageId": {"type": "string", "description": "The message acted on."},
            "chatId": {"type": "string"}, "seq": {"type": "integer", "minimum": 1},
            "by": {"type": "string"}, "eventId": {"type": "string"},
            "createdAt": {"type": "string"}, "body": {"type": ["string", "null"]},
            "emoji": {"type": ["string", "null"]}, "added": {"type": ["boolean", "null"]}}},
    "History": {"type": "object", "required": ["messages", "hasMore"], "properties": {
        "messages": {"type": "array", "items": {"oneOf": [ref("HistoryMessage"),
                                                          ref("HistoryCommand")]}},
        "hasMore": {"type": "boolean"}}},
    "Presence": {"type": "object", "required": ["users"], "properties": {
        "users": {"type": "array", "items": {
            "type": "object", "required": ["userId", "online", "lastSeen"], "properties": {
                "userId": {"type": "string"}, "online": {"type": "boolean"},
                "lastSeen": {"type": ["string", "null"],
                             "description": "RFC 3339, when last seen online."}}}}}},
}

# Examples: what the server answers (ids and times are the server's own).
CHAT_EXAMPLE = {"chatId": CHAT_ID, "members": ["alice", "bob"], "title": "hello"}
CHAT_LIST_EXAMPLE = {"chats": [{
    "chatId": CHAT_ID, "title": "hello", "members": ["alice", "bob"], "lastSeq": 2,
    "deliveredSeq": 2, "readSeq": 0, "unreadCount": 0,
    "peers": [{"userId": "bob", "deliveredSeq": 1, "readSeq": 1}]}]}
HISTORY_EXAMPLE = {"messages": [
    {"type": "message", "messageId": MESSAGE_ID, "chatId": CHAT_ID, "seq": 1,
     "senderId": "alice", "kind": "text", "body": "hi Bob!", "createdAt": AT,
     "editedAt": AT},
    {"type": "command", "op": "edit", "messageId": MESSAGE_ID, "chatId": CHAT_ID, "seq": 2,
     "by": "alice", "eventId": EVENT_ID, "createdAt": AT, "body": "hi Bob!"}],
    "hasMore": False}
PRESENCE_EXAMPLE = {"users": [{"userId": "bob", "online": False, "lastSeen": None}]}

NOT_MEMBER = ("forbidden", "not a member of this chat")
NOT_CONTACTS = ("forbidden", "not contacts of the caller (no chat shared): mallory")
NO_CHAT = ("not_found", "no such chat")
BAD_PAGE = ("invalid", "afterSeq must be >= 0 and limit 1..500")


def paths() -> dict[str, Any]:
    chat_id = {"name": "chatId", "in": "path", "required": True,
               "schema": {"type": "string", "minLength": 1, "pattern": STORABLE}}
    return {
        "/v1/chats": {
            "post": {
                "operationId": "createChat", "tags": ["chats"], "security": secured(),
                "summary": "Create a chat (the caller is a member)",
                "requestBody": {"required": True, "content": json_content(
                    ref("NewChat"), {"members": ["bob"], "title": "hello"})},
                "responses": {
                    "201": {**ok("The chat.", ref("Chat"), CHAT_EXAMPLE), "links": {
                        "history": {"operationId": "getChatMessages",
                                    "parameters": {"chatId": "$response.body#/chatId"},
                                    "description": "The new chat's history."}}},
                    "400": error_response(
                        "The body is not JSON or does not fit `NewChat`.",
                        ("invalid", "'members' must be a list of 1..1000 user ids")),
                    "401": unauthorized(), **common(body=True)}},
            "get": {
                "operationId": "listChats", "tags": ["chats"], "security": secured(),
                "summary": "The caller's chats, with positions and unread counts",
                "responses": {"200": ok("The caller's chats.", ref("ChatList"), CHAT_LIST_EXAMPLE),
                              "401": unauthorized(), **common()}},
        },
        "/v1/chats/{chatId}/messages": {"get": {
            "operationId": "getChatMessages", "tags": ["chats"], "security": secured(),
            "summary": "A page of a chat's history in seq order (members only)",
            "parameters": [
                chat_id,
                {"name": "afterSeq", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ, "default": 0}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}}],
            "responses": {
                "200": ok("Messages (current state) and command events after `afterSeq`.",
                          ref("History"), HISTORY_EXAMPLE),
                "400": error_response("`afterSeq` or `limit` out of range or not integers.",
                                      BAD_PAGE),
                "401": unauthorized(),
                "403": error_response("The caller is not a member.", NOT_MEMBER),
                "404": error_response("No such chat.", NO_CHAT), **common()}}},
        "/v1/presence": {"get": {
            "operationId": "getPresence", "tags": ["presence"], "security": secured(),
            "summary": "Whether users are online, and when they were last seen",
            "description": "Only for the caller and its contacts (users sharing at least one "
                           "chat with it) while `presence_scope` is `contacts` (the "
                           "default); for anyone with `anyone`.",
            "parameters": [{
                "name": "userId", "in": "query", "required": True, "style": "form",
                "explode": True, "description": "Repeat it, or separate ids with commas "
                                                "(1..500 ids in all; no empty one).",
                "schema": {"type": "array", "minItems": 1, "maxItems": 500, "items": {
                    "type": "string", "pattern": "^[^,\\u0000]+(,[^,\\u0000]+)*$"}}}],
            "responses": {
                "200": ok("One entry per user asked.", ref("Presence"), PRESENCE_EXAMPLE),
                "400": error_response("No user id, an empty one, or more than 500.",
                                      ("invalid", "give 1..500 userId values")),
                "401": unauthorized(),
                "403": error_response(
                    "Some users asked for share no chat with the caller (`presence_scope` "
                    "`contacts`): the message names them, in the order asked. Nothing is "
                    "answered for the others either.", NOT_CONTACTS),
                **common()}}},
    }
