"""Where the contracts are served: ``/openapi.json``, ``/asyncapi.json`` and Swagger UI at
``/api-docs``, from local assets.

No CDN: the Swagger UI files come from the ``swagger-ui-bundle`` package installed with
Conveyor, so ``/api-docs`` works on machines without internet access.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from deployments.http import json_response
from serve_app.asyncapi import asyncapi_document
from serve_app.openapi.document import document


def swagger_assets() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Conveyor API</title>
  <link rel="stylesheet" type="text/css" href="/api-docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/api-docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/api-docs/swagger-ui-bundle.js"></script>
  <script src="/api-docs/swagger-ui-standalone-preset.js"></script>
  <script src="/api-docs/init.js"></script>
</body>
</html>
"""
INIT_JS = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  });
};
"""
ASSETS = {"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
          "favicon-32x32.png", "favicon-16x16.png"}


async def docs_page(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def docs_asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "init.js":
        return Response(INIT_JS, media_type="text/javascript")
    if name not in ASSETS:
        return json_response({"error": {"code": "not_found", "message": "no such asset"}}, 404)
    path = swagger_assets() / name
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response(path.read_bytes(), media_type=media,
                    headers={"Cache-Control": "public, max-age=86400"})


def docs_routes(settings: Any = None) -> list[BaseRoute]:
    """The contracts' routes; the documents are built once, limits from ``settings``."""
    doc = document(settings)
    events = asyncapi_document(settings)

    async def openapi_json(request: Request) -> Response:
        return json_response(doc)

    async def asyncapi_json(request: Request) -> Response:
        return json_response(events)

    return [
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/asyncapi.json", asyncapi_json, methods=["GET"]),
        Route("/api-docs", docs_page, methods=["GET"]),
        Route("/api-docs/{name}", docs_asset, methods=["GET"]),
    ]
