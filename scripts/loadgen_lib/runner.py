"""A whole run: warm-up, then requests sent on their arrival times, bounded in count and time.

Requests are dispatched at precomputed offsets from the start (no drift from
sleep overshoot accumulating); ``--max-concurrency`` makes a request wait for
a free slot after its arrival, and that wait is recorded as its queue time.
Nothing new is sent after ``max_duration_s``, and requests still running at
that point are cancelled and recorded as errors, so a run always ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import aiohttp

from .client import RequestResult, build_payload, stream_completion
from .progress import Progress
from .workload import RequestSpec

_CANCEL_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class RunConfig:
    url: str  # the full /v1/completions URL
    model: str
    max_concurrency: int | None
    num_warmups: int
    max_duration_s: float
    request_timeout_s: float
    ignore_eos: bool
    headers: tuple[tuple[str, str], ...] = ()
    progress: bool = True


@dataclass(slots=True)
class RunOutcome:
    results: list[RequestResult]
    duration_s: float
    not_sent: int  # requests never sent because the time limit came first
    warmup_failures: list[str]


def _session(cfg: RunConfig, concurrency_hint: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=max(1, concurrency_hint), force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=dict(cfg.headers))


async def _warm_up(session: aiohttp.ClientSession, cfg: RunConfig, spec: RequestSpec) -> list[str]:
    if cfg.num_warmups <= 0:
        return []
    slots = asyncio.Semaphore(cfg.max_concurrency or cfg.num_warmups)
    bar = Progress(cfg.num_warmups, "warm-up", enabled=cfg.progress)
    payload = build_payload(cfg.model, spec, ignore_eos=cfg.ignore_eos)

    async def one() -> RequestResult:
        async with slots:
            res = await stream_completion(session, cfg.url, payload,
                                          RequestResult(spec.prompt_len, spec.output_len), time.perf_counter())
        bar.update()
        return res

    try:
        done = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(cfg.num_warmups))),
                                      timeout=cfg.request_timeout_s + _CANCEL_GRACE_S)
    finally:
        bar.close()
    return [r.error for r in done if not r.success]


async def run(cfg: RunConfig, specs: list[RequestSpec], offsets: list[float]) -> RunOutcome:
    if len(specs) != len(offsets):
        raise ValueError(f"{len(specs)} requests but {len(offsets)} arrival times")
    async with _session(cfg, cfg.max_concurrency or len(specs) or 1) as session:
        warmup_failures = await _warm_up(session, cfg, specs[0]) if specs else []
        slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else contextlib.nullcontext()
        bar = Progress(len(specs), "requests", enabled=cfg.progress)
        start = time.perf_counter()
        deadline = start + cfg.max_duration_s
        results: list[RequestResult] = []
        tasks: list[asyncio.Task] = []

        async def one(spec: RequestSpec, result: RequestResult) -> None:
            arrived = time.perf_counter()
            async with slots:
                result.queue_time = time.perf_counter() - arrived
                payload = build_payload(cfg.model, spec, ignore_eos=cfg.ignore_eos)
                await stream_completion(session, cfg.url, payload, result, start)
            bar.update()

        for spec, offset in zip(specs, offsets, strict=True):
            wait = start + offset - time.perf_counter()
            if start + offset >= deadline:
                break
            if wait > 0:
                await asyncio.sleep(wait)
            result = RequestResult(spec.prompt_len, spec.output_len)
            results.append(result)
            tasks.append(asyncio.create_task(one(spec, result)))

        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_CANCEL_GRACE_S)
        for r in results:
            if not r.success and not r.error:
                r.error = "cancelled: the run reached --max-duration"
        duration = time.perf_counter() - start
        bar.close()
    return RunOutcome(results, duration, len(specs) - len(results), warmup_failures)
