"""Errors the router maps to HTTP status codes."""

from fluxion_dist.errors import FluxionError


class AdmissionRefused(FluxionError):
    """No worker can take the request now (KV stores full, queues at their limit): HTTP 429."""


class WorkerFailed(FluxionError):
    """A prefill or decode worker died or failed mid-request: HTTP 503 or an SSE error event."""
