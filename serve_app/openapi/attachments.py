"""Attachments' second phase over HTTP: the uploader's ``/complete``, members' downloads,
the storage webhook, and the embedded object store's signed upload URLs."""

from __future__ import annotations

from typing import Any

from serve_app.openapi.common import (
    ERROR_SCHEMA,
    STORABLE,
    STORAGE_WEBHOOK,
    common,
    error,
    error_response,
    json_content,
    ok,
    ref,
    secured,
    unauthorized,
)

ATTACHMENT_ID = "7d3e9f1a-2b4c-4d6e-8f01-a2b3c4d5e6f7"
CHAT_ID = "6f1c2a9e-3b7d-4e55-9a0c-2d8e4b1f7a63"
MESSAGE_ID = "1b2c3d4e-5f60-4718-8293-a4b5c6d7e8f9"
STATES = ["pending", "verifying", "ready", "rejected", "expired", "deleted"]

SCHEMAS: dict[str, Any] = {
    "AttachmentResult": {
        "type": "object", "required": ["attachmentId", "state"],
        "description": "What checking an upload came to: `messageId` once posted to the "
                       "chat, `error` when refused or not possible now.",
        "properties": {
            "attachmentId": {"type": "string"}, "state": {"enum": STATES},
            "messageId": {"type": ["string", "null"]},
            "error": ERROR_SCHEMA["properties"]["error"]}},
    "AttachmentRefusal": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "description": "`Error`, with the attachment's id and state when the check ran.",
        "properties": {
            "attachmentId": {"type": "string"}, "state": {"enum": STATES},
            "error": ERROR_SCHEMA["properties"]["error"]}},
    "StorageEvent": {
        "type": "object", "required": ["Records"],
        "description": "An S3 / MinIO bucket notification. A record is used when it is "
                       "`{\"eventName\": \"s3:ObjectCreated:…\", \"s3\": {\"object\": "
                       "{\"key\": …}}}` naming a pending upload; any other record, of any "
                       "shape, is counted as ignored (one odd record does not fail the others).",
        "properties": {"Records": {"type": "array", "items": {
            "examples": [{"eventName": "s3:ObjectCreated:Put",
                          "s3": {"object": {"key": f"{CHAT_ID}/{ATTACHMENT_ID}/cat.png"}}}]}}}},
    "StorageEventResult": {
        "type": "object", "required": ["processed", "ignored", "results"], "properties": {
            "processed": {"type": "integer"}, "ignored": {"type": "integer"},
            "results": {"type": "array", "items": ref("AttachmentResult")}}},
    "UploadResult": {"type": "object", "required": ["stored", "results"], "properties": {
        "stored": {"const": True},
        "results": {"type": "array", "items": ref("AttachmentResult")}}},
}


def refusal(description: str, *examples: tuple[str, str, str | None]) -> dict[str, Any]:
    """``examples``: (code, message, state): the attachment's state when the check ran, or
    None when there was none to run (no such attachment)."""
    content: dict[str, Any] = {"schema": ref("AttachmentRefusal")}
    values = {}
    for code, message, state in examples:
        values[code] = (error(code, message) if state is None else
                        {"attachmentId": ATTACHMENT_ID, "state": state, **error(code, message)})
    if len(values) == 1:
        content["example"] = next(iter(values.values()))
    elif values:
        content["examples"] = {code: {"value": value} for code, value in values.items()}
    return {"description": description, "content": {"application/json": content}}


def _signed_query() -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": True, "schema": schema,
             "description": "Part of the signed URL the attachment's ack gave."}
            for name, schema in (("expires", {"type": "integer"}), ("size", {"type": "integer"}),
                                 ("sig", {"type": "string"}))]


def paths() -> dict[str, Any]:
    attachment_id = {"name": "attachmentId", "in": "path", "required": True,
                     "schema": {"type": "string", "minLength": 1, "pattern": STORABLE}}
    key = {"name": "key", "in": "path", "required": True,
           "description": "The object key (it may contain `/`).",
           "schema": {"type": "string", "minLength": 1, "pattern": STORABLE}}
    bad_signature = error_response("Missing, malformed, invalid or expired signature.",
                                   ("forbidden", "invalid or expired signature"))
    no_local_store = error_response(
        "Uploads go to the object store directly (`s3_endpoint` set), or no such object.",
        ("not_found", "uploads go to the object store directly"))
    return {
        "/v1/attachments/{attachmentId}/complete": {"post": {
            "operationId": "completeAttachment", "tags": ["attachments"], "security": secured(),
            "summary": "The uploader confirms an upload (without a storage webhook)",
            "description": "Checks the upload (size, type, sniffed signature, virus scan) and "
                           "posts it to the chat. No body.",
            "parameters": [attachment_id, {
                "name": "X-Upload-Token", "in": "header", "required": True,
                "description": "The `uploadToken` of the attachment's ack.",
                "schema": {"type": "string"}}],
            "responses": {
                "200": ok("Checked and posted (or already so).", ref("AttachmentResult"),
                          {"attachmentId": ATTACHMENT_ID, "state": "ready",
                           "messageId": MESSAGE_ID}),
                "401": unauthorized(),
                "403": error_response(
                    "The X-Upload-Token header is missing or wrong.",
                    ("forbidden", "the X-Upload-Token header must carry the uploadToken of "
                                  "the attachment's ack")),
                "404": refusal("No such attachment of the caller's.",
                               ("not_found", "no such attachment", None)),
                "409": refusal("Not uploaded yet, or being checked: try again later.",
                               ("not_uploaded", "the file has not been uploaded", "pending")),
                "410": refusal("Too late: the upload window expired, or the message was deleted.",
                               ("deleted", "the attachment is deleted", "deleted")),
                "422": refusal("The file is refused (`too_large`, `size_mismatch`, "
                               "`type_mismatch`, `infected`, `too_large_to_scan`).",
                               ("type_mismatch", "declared image/png, the content is text/plain",
                                "rejected")),
                "503": refusal("The virus scan could not run; the attachment stays pending.",
                               ("scan_failed", "the virus scan could not run: ConnectionRefusedError(111, "
                                "'Connection refused')", "pending")),
                **common(body=True)}}},
        "/v1/attachments/{attachmentId}/content": {"get": {
            "operationId": "getAttachmentContent", "tags": ["attachments"], "security": secured(),
            "summary": "Members: a redirect to a short-lived download URL",
            "parameters": [attachment_id],
            "responses": {
                "307": {"description": "The download URL (always served as a download).",
                        "headers": {"Location": {"required": True, "schema": {"type": "string"}},
                                    "Cache-Control": {"schema": {"type": "string"}}}},
                "401": unauthorized(),
                "404": error_response("No such attachment in the caller's chats.",
                                      ("not_found", "no such attachment")),
                "409": error_response("Not checked yet.", ("not_ready", "attachment is pending")),
                "410": error_response("Deleted or expired.", ("gone", "attachment is deleted")),
                **common()}}},
        "/v1/storage/events": {"post": {
            "operationId": "storageEvents", "tags": ["attachments"],
            "security": secured(STORAGE_WEBHOOK),
            "summary": "Bucket-notification webhook of S3 / MinIO",
            "requestBody": {"required": True, "content": json_content(
                ref("StorageEvent"), {"Records": [{"eventName": "s3:ObjectCreated:Put",
                                                   "s3": {"object": {"key": "nothing-here"}}}]})},
            "responses": {
                "200": ok("Each upload it names was checked.", ref("StorageEventResult"),
                          {"processed": 0, "ignored": 1, "results": []}),
                "400": error_response("Not a bucket notification.",
                                      ("invalid", "expected a bucket notification with Records")),
                "401": unauthorized(("unauthorized",
                                     "a valid storage webhook secret is required")),
                **common(body=True)}}},
        "/v1/uploads/{key}": {
            "put": {
                "operationId": "uploadObject", "tags": ["uploads"],
                "summary": "The embedded object store's signed upload URL",
                "description": "Only with the embedded store (no `s3_endpoint`). The signature "
                               "in the query authorizes it; a finished upload is checked at once.",
                "parameters": [key, *_signed_query()],
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}},
                "responses": {
                    "200": ok("Stored and checked.", ref("UploadResult")),
                    "403": bad_signature, "404": no_local_store,
                    "409": error_response("The attachment takes no more uploads.",
                                          ("conflict", "this upload URL takes no more uploads "
                                                       "(the attachment is ready)")),
                    "413": error_response("Larger than the size signed for.",
                                          ("too_large", "the upload is larger than declared")),
                    "500": common()["500"]}},
            "get": {
                "operationId": "downloadObject", "tags": ["uploads"],
                "summary": "The embedded object store's signed download URL",
                "parameters": [key, *_signed_query()],
                "responses": {
                    "200": {"description": "The file, as a download (`Content-Disposition: "
                                           "attachment`, `nosniff`, a sandboxing CSP).",
                            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                    "403": bad_signature, "404": no_local_store, "500": common()["500"]}},
        },
    }
