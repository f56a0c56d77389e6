"""Load generator for OpenAI-compatible ``/v1/completions`` endpoints (streaming SSE).

One concept per module: ``workload`` (what to send), ``arrivals`` (when),
``client`` (one streamed request, timed), ``runner`` (a whole run, bounded in
count and time), ``metrics`` (``vllm bench serve`` key names), ``plot`` (PNG),
``target`` (loopback guard), ``progress`` and ``cli``.
"""
