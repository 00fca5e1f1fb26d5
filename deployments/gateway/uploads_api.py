"""The embedded object store's upload and download endpoints (no S3 configured): signed
URLs served by the app itself. A finished upload reports itself, as a bucket
notification would."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from deployments.http import ApiError, error_response, json_response
from stages.ports import AttachmentStore, UploadEndpoint

Uploaded = Callable[[list[tuple[str, str]]], Awaitable[list[dict[str, Any]]]]


class UploadsApi:
    def __init__(self, uploads: UploadEndpoint | None, attachments: AttachmentStore,
                 uploaded: Uploaded) -> None:
        self.uploads = uploads
        self.attachments = attachments
        self.uploaded = uploaded

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/uploads/{key:path}", self.local_upload, methods=["PUT"]),
            Route("/v1/uploads/{key:path}", self.local_download, methods=["GET"]),
        ]

    def _signed(self, request: Request) -> tuple[UploadEndpoint, str, int, int]:
        objects = self.uploads
        if objects is None:
            raise ApiError(404, "not_found", "uploads go to the object store directly")
        try:
            expires = int(request.query_params["expires"])
            size = int(request.query_params["size"])
            sig = request.query_params["sig"]
        except (KeyError, ValueError):
            raise ApiError(403, "forbidden", "missing or malformed signature") from None
        key = request.path_params["key"]
        method = "PUT" if request.method == "PUT" else "GET"
        if not objects.verify(method, key, expires, size, sig):
            raise ApiError(403, "forbidden", "invalid or expired signature")
        return objects, key, expires, size

    async def local_upload(self, request: Request) -> Response:
        """The embedded object store's upload endpoint; on success it reports the upload
        itself, as a bucket notification would. Only a pending attachment takes bytes: once
        it is being checked, or done, its upload URL is refused."""
        try:
            objects, key, _, size = self._signed(request)
            att = await self.attachments.by_key(key)
            if att is None or att.state != "pending":
                raise ApiError(409, "conflict", "this upload URL takes no more uploads (the "
                               f"attachment is {att.state if att else 'unknown'})")
            try:
                await objects.write(key, request.stream(),
                                    request.headers.get("content-type"), limit=size)
            except ValueError as exc:
                raise ApiError(413, "too_large", str(exc)) from None
            results = await self.uploaded([(att.id, att.uploader)])
            return json_response({"stored": True, "results": results})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    async def local_download(self, request: Request) -> Response:
        try:
            objects, key, _, _ = self._signed(request)
            info = await objects.stat(key)
            if info is None:
                raise ApiError(404, "not_found", "no such object")
            # Served from the app's own origin: always a download, never rendered.
            return FileResponse(
                objects.path(key), media_type=info.content_type or "application/octet-stream",
                filename=key.rsplit("/", 1)[-1], content_disposition_type="attachment",
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, no-store",
                         "Content-Security-Policy": "sandbox; default-src 'none'"})
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
