"""One streamed ``/v1/completions`` request, timed the way ``vllm bench serve`` times it.

TTFT is the time from sending to the first SSE chunk that carries a choice;
each later chunk with a choice adds one inter-token latency (a chunk holding
several tokens counts once, as in vLLM). The output length is the server's
``usage.completion_tokens`` when it reports one (``stream_options.include_usage``),
else the number of chunks with text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from .workload import RequestSpec

_MAX_ERROR_CHARS = 500


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    requested_output_len: int
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # seconds after the run started, when the request was sent
    queue_time: float = 0.0  # waiting for a --max-concurrency slot before sending
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    generated_text: str = ""


def build_payload(model: str, spec: RequestSpec, *, ignore_eos: bool) -> dict:
    payload = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


async def stream_completion(session: aiohttp.ClientSession, url: str, payload: dict,
                            result: RequestResult, run_start: float) -> RequestResult:
    """Send one request and fill ``result``; never raises for server or network errors."""
    sent = time.perf_counter()
    result.start_time = sent - run_start
    last = sent
    chunks_with_text = 0
    usage_tokens = None
    try:
        async with session.post(url, json=payload) as resp:
            if resp.status != 200:
                body = (await resp.text())[:_MAX_ERROR_CHARS]
                result.error = f"HTTP {resp.status}: {body}"
                return result
            buffer = b""
            async for piece in resp.content.iter_any():
                now = time.perf_counter()
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, `event:` lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        result.error = f"stream error: {json.dumps(event['error'])[:_MAX_ERROR_CHARS]}"
                        return result
                    if event.get("choices"):
                        text = event["choices"][0].get("text") or ""
                        if result.ttft == 0.0:
                            result.ttft = now - sent
                        else:
                            result.itl.append(now - last)
                        last = now
                        chunks_with_text += bool(text)
                        result.generated_text += text
                    if event.get("usage"):
                        usage_tokens = event["usage"].get("completion_tokens")
                        if event["usage"].get("prompt_tokens"):
                            result.prompt_len = int(event["usage"]["prompt_tokens"])
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
        return result
    if result.ttft == 0.0:
        result.error = "stream ended without a completion chunk"
        return result
    result.latency = last - sent
    result.output_tokens = int(usage_tokens) if usage_tokens is not None else chunks_with_text
    result.success = True
    return result


async def first_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first id of ``GET /v1/models``, as vLLM picks a default model."""
    url = base_url.rstrip("/") + "/v1/models"
    async with session.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {resp.status}; pass --model")
        data = await resp.json()
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"GET {url} lists no models; pass --model")
    return models[0]["id"]
