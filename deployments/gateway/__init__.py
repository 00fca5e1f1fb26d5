"""The Gateway deployment, one module per part (see ``deployment``)."""

from deployments.gateway.deployment import Gateway

__all__ = ["Gateway"]
