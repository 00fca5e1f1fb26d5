"""HTTP resources of attachments' second phase: the storage webhook, the uploader's
``/complete``, and members' downloads. Each upload runs the ``attachment_uploaded``
pipeline (verify, scan, finalize, store the message, deliver)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_plus

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from adapters.auth import Principal
from deployments.http import ApiError, error_response, json_response, token_of
from deployments.pipeline_runner import PipelineRunner
from stages.attachments import ready_key
from stages.model import Envelope, Verdict
from stages.ports import AttachmentStore, ChatStore, ObjectStore

Guard = Callable[[Request], Awaitable[Principal]]


def created_key(record: Any) -> str | None:
    """The object key of an ``s3:ObjectCreated:*`` record of a bucket notification; None
    for any other event and for a record not shaped like one (it is ignored, not an error:
    one odd record does not fail the others)."""
    if not isinstance(record, dict):
        return None
    name, s3 = record.get("eventName"), record.get("s3")
    obj = s3.get("object") if isinstance(s3, dict) else None
    key = obj.get("key") if isinstance(obj, dict) else None
    if not isinstance(name, str) or not name.startswith("s3:ObjectCreated") \
            or not isinstance(key, str) or not key:
        return None
    return unquote_plus(key)


class AttachmentsApi:
    def __init__(self, attachments: AttachmentStore, objects: ObjectStore, chats: ChatStore,
                 runner: PipelineRunner, guard: Guard, webhook_secret: str | None,
                 replica_id: str) -> None:
        self.attachments = attachments
        self.objects = objects
        self.chats = chats
        self.runner = runner
        self.guard = guard
        self.webhook_secret = webhook_secret
        self.replica_id = replica_id

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/storage/events", self.storage_events, methods=["POST"]),
            Route("/v1/attachments/{attachment_id}/complete", self.complete_attachment,
                  methods=["POST"]),
            Route("/v1/attachments/{attachment_id}/content", self.attachment_content,
                  methods=["GET"]),
        ]

    async def uploaded(self, records: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Run attachment_uploaded for (attachment id, uploader) pairs; one batch."""
        batch = [Envelope(type="attachment_uploaded", id=f"attachment:{aid}", sender=uploader,
                          gateway=self.replica_id, fields={"attachmentId": aid})
                 for aid, uploader in records]
        outcomes = await self.runner.run("attachment_uploaded", -1, batch)
        out = []
        for o in outcomes:
            env = o.envelope
            item: dict[str, Any] = {"attachmentId": env.fields["attachmentId"]}
            if o.verdict is Verdict.REJECT:
                item.update(state=env.meta.get("attachmentState",
                                               "pending" if o.code == "not_found" else "rejected"),
                            error={"code": o.code, "message": o.message})
            else:
                item.update(state=env.meta.get("attachmentState", "ready"),
                            messageId=env.meta.get("messageId"))
            out.append(item)
        return out

    async def storage_events(self, request: Request) -> Response:
        """S3/MinIO bucket notifications (MinIO's event JSON), bearer-secret protected."""
        secret = self.webhook_secret
        given = token_of(request) or ""
        if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
            return error_response(401, "unauthorized", "a valid storage webhook secret is required")
        try:
            event = orjson.loads(await request.body())
            records = event["Records"] if isinstance(event, dict) else None
            if not isinstance(records, list):
                raise KeyError("Records")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return error_response(400, "invalid", "expected a bucket notification with Records")
        found: list[tuple[str, str]] = []
        ignored = 0
        for rec in records:
            key = created_key(rec)
            att = await self.attachments.by_key(key) if key is not None else None
            if att is None or (att.id, att.uploader) in found:  # a repeat counts once
                ignored += 1
                continue
            found.append((att.id, att.uploader))
        results = await self.uploaded(found) if found else []
        return json_response({"processed": len(results), "ignored": ignored, "results": results})

    async def complete_attachment(self, request: Request) -> Response:
        """The uploader confirms an upload (deployments without a storage webhook)."""
        try:
            principal = await self.guard(request)
            aid = request.path_params["attachment_id"]
            recs = await self.attachments.get([aid])
            rec = recs.get(aid)
            if rec is None or rec.uploader != principal.user_id:
                raise ApiError(404, "not_found", "no such attachment")
            token = request.headers.get("x-upload-token", "")
            if not hmac.compare_digest(token.encode(), rec.upload_token.encode()):
                raise ApiError(403, "forbidden", "the X-Upload-Token header must carry the "
                                                 "uploadToken of the attachment's ack")
            (result,) = await self.uploaded([(aid, principal.user_id)])
            error = result.get("error")
            if error is not None:
                # 409: not uploaded yet / being checked (retry later); 410: too late;
                # 503: the virus scan could not run (retry later); 422: the file is refused.
                status = {"not_uploaded": 409, "in_progress": 409, "conflict": 409,
                          "not_found": 404, "expired": 410, "deleted": 410,
                          "scan_failed": 503}.get(error["code"], 422)
                return json_response(result, status)
            return json_response(result)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def attachment_content(self, request: Request) -> Response:
        """Members get a short-lived download URL (a redirect to the object store)."""
        try:
            principal = await self.guard(request)
            aid = request.path_params["attachment_id"]
            rec = (await self.attachments.get([aid])).get(aid)
            members = await self.chats.members([rec.chat_id]) if rec else {}
            if rec is None or principal.user_id not in members.get(rec.chat_id, ()):
                raise ApiError(404, "not_found", "no such attachment")
            if rec.state in ("deleted", "expired"):
                raise ApiError(410, "gone", f"attachment is {rec.state}")
            if rec.state != "ready":
                raise ApiError(409, "not_ready", f"attachment is {rec.state}")
            # The checked copy, never the upload (which its uploader could still overwrite).
            url = await self.objects.download_url(ready_key(rec), 300, rec.file_name)
            return Response(status_code=307, headers={"Location": url,
                                                      "Cache-Control": "private, no-store"})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
