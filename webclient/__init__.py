"""Conveyor's web client: a static single-page app served by the gateway at ``/app``.

Plain ES modules and CSS in ``webclient/static`` (no build step, nothing fetched from
another origin). ``webclient.routes.web_routes`` returns the Starlette routes; it is handed
what it needs (a dev-token issuer, the OIDC endpoints) and imports nothing of the server.
"""

from webclient.routes import web_routes

__all__ = ["web_routes"]
