"""The demo's client side: a few completions over HTTP, one streamed, printed as they arrive."""

from __future__ import annotations

import json
import time

import httpx

from fluxion_dist.config.schema import ServerConfig


def _show(prompt: str) -> str:
    return repr(prompt) if len(prompt) <= 90 else repr(prompt[:40] + " ... " + prompt[-45:]) + f" ({len(prompt.split())} words)"


def run_demo_requests(endpoint: str, server: ServerConfig, prompts: list[tuple[str, str | None]],
                      max_tokens: int) -> None:
    """``prompts``: (prompt, expected answer or None), the first one streamed."""
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    with httpx.Client(base_url=endpoint, headers=headers, timeout=120) as client:
        print("GET /health ->", client.get("/health").json()["healthy"])
        for i, (prompt, expected) in enumerate(prompts):
            body = {"model": server.served_model_name, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "stream": i == 0}
            t0 = time.perf_counter()
            if body["stream"]:
                text, ttft = "", None
                with client.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text += json.loads(line[6:])["choices"][0]["text"]
                            ttft = ttft or time.perf_counter() - t0
                print(f"[stream] {_show(prompt)}\n  -> {text!r}  (first token {ttft * 1e3:.0f} ms, "
                      f"total {(time.perf_counter() - t0) * 1e3:.0f} ms)")
            else:
                r = client.post("/v1/completions", json=body)
                r.raise_for_status()
                out = r.json()
                text = out["choices"][0]["text"]
                print(f"[plain]  {_show(prompt)}\n  -> {text!r}  ({out['usage']['completion_tokens']} "
                      f"tokens, {(time.perf_counter() - t0) * 1e3:.0f} ms)")
            if expected is not None:
                print(f"  expected {expected!r}: {'correct' if text.split()[:len(expected.split())] == expected.split() else 'wrong'}")
