"""The notification service's deployments: its HTTP API (mounted in the gateway) and
its dispatcher (a deployment of its own)."""
