"""The demo's client side: a few completions over HTTP, one streamed, printed as they arrive."""

from __future__ import annotations

import json
import time

import httpx

from fluxion_dist.config.schema import ServerConfig


def run_demo_requests(endpoint: str, server: ServerConfig, prompts: tuple[str, ...], max_tokens: int) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    with httpx.Client(base_url=endpoint, headers=headers, timeout=120) as client:
        print("GET /health ->", client.get("/health").json()["healthy"])
        for i, prompt in enumerate(prompts):
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
                print(f"[stream] {prompt!r}\n  -> {text!r}  (first token {ttft * 1e3:.0f} ms, "
                      f"total {(time.perf_counter() - t0) * 1e3:.0f} ms)")
            else:
                r = client.post("/v1/completions", json=body)
                r.raise_for_status()
                out = r.json()
                print(f"[plain]  {prompt!r}\n  -> {out['choices'][0]['text']!r}  ({out['usage']['completion_tokens']} "
                      f"tokens, {(time.perf_counter() - t0) * 1e3:.0f} ms)")
