"""The OpenAPI 3.1 document of Conveyor's HTTP API and the routes that serve the contracts
(``/openapi.json``, ``/asyncapi.json``, Swagger UI at ``/api-docs``)."""

from serve_app.openapi.docs import docs_routes
from serve_app.openapi.document import document

__all__ = ["docs_routes", "document"]
