"""The decode worker: a Ray actor owning a node-level KV store and a continuous-batching loop.

A request's life cycle on this side:
1. ``admit`` (from the router) reserves pages for the generated tokens in the host KV store,
   under a lease, admits the request id on the KV server (only an admitted request's offer
   reserves the prompt's pages; without an offer by ``transport.offer_deadline_s`` the
   reservation is freed) and returns this worker's UCX address; a full store raises
   ``StoreFull`` (HTTP 429);
2. the prefill worker pushes the prompt's KV layer by layer, its frames authenticated under
   the deployment's secret (``kv_secret``, handed over by Ray); the receiver lands the bytes
   straight in the reserved pages and marks the transfer done (or failed);
3. ``generate`` (a Ray streaming generator) waits for the transfer, adds the sequence to the
   engine, and yields each token the batching loop produces for it;
4. the loop runs one decode step at a time in a worker thread over every running sequence:
   requests join and leave between steps; each step appends one token's K/V to a sequence's
   pages and attends with the hybrid operator the config's ``decode.sparse.policy`` names;
5. the request ends on its stop condition, an ``abort`` (client gone, router cleanup) or an
   error; every path frees its pages, so the store's occupancy returns to zero.
If the engine itself breaks (an exception out of a step), the process exits so Ray restarts it
(after ``server.restart_backoff_s``, growing while it keeps dying: ``restart_backoff``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import torch

from decode_worker.attention_setup import build_attention
from decode_worker.engine import DecodeEngine, TokenEvent
from decode_worker.kv_receiver import KVReceiver
from fluxion_dist.config import config_from_dict
from fluxion_dist.hybrid import HostArena
from fluxion_dist.model.loader import load_from_config
from fluxion_dist.policy.request import RequestSparse
from fluxion_dist.sampling import SamplingParams
from fluxion_dist.restart_backoff import wait_before_start

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, config: dict, name: str, kv_secret: bytes) -> None:
        self.cfg = config_from_dict(config)
        self.name = name
        self.start_record = wait_before_start(self.cfg.server)  # a restart in a row waits first
        self.model, self.tokenizer = load_from_config(self.cfg.model)
        self.kv = KVReceiver(self.cfg, self.model.arch, kv_secret)
        attention = build_attention(self.cfg, self.model.arch, HostArena(self.kv.pages, self.kv.kmin, self.kv.kmax))
        self.engine = DecodeEngine(self.model, self.kv, self.cfg.decode.max_batch_size, attention,
                                   enforce_eager=self.cfg.decode.enforce_eager)
        self.streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self.placed: set[str] = set()  # admitted here and not yet aborted
        self._lock: asyncio.Lock | None = None  # engine and store change only between steps
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.Task | None = None
        self.steps = 0

    def _start(self) -> None:
        if self._loop is None:
            self._lock, self._wake = asyncio.Lock(), asyncio.Event()
            self._loop = asyncio.create_task(self._run())

    async def admit(self, request_id: str, prompt_len: int, max_tokens: int) -> bytes:
        self._start()
        async with self._lock:
            self.kv.admit(request_id, prompt_len, max_tokens)
            self.placed.add(request_id)
        return await self.kv.address()

    async def generate(self, request_id: str, first_token: int, params: dict, sparse: dict | None = None):
        """Yields ``(token, fraction of the request's KV its step read, TokenLogprobs or None)`` per
        decode step.
        ``sparse``: the request's validated ``RequestSparse`` fields (None: the deployment's)."""
        self._start()
        queue: asyncio.Queue[tuple[TokenEvent, float | None]] = asyncio.Queue()
        self.streams[request_id] = queue
        try:
            prompt_len = await self.kv.wait_received(request_id)
            async with self._lock:
                done = self.engine.add(request_id, prompt_len, first_token, SamplingParams(**params),
                                       self.tokenizer.eos_token_id, RequestSparse(**sparse) if sparse else None)
            if done is not None:
                return
            self._wake.set()
            while True:
                ev = await queue.get()
                if ev.error is not None:
                    raise RuntimeError(f"request {request_id}: {ev.error}")
                if ev.token is not None:
                    yield ev.token, ev.kv_fraction, ev.logprobs
                if ev.finish_reason is not None:
                    return
        finally:
            self.streams.pop(request_id, None)
            await self.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; frees its pages. Safe to call twice."""
        self._start()
        async with self._lock:
            self.engine.abort(request_id)
            freed = self.kv.release(request_id)
            self.placed.discard(request_id)
        queue = self.streams.get(request_id)
        if queue is not None:
            queue.put_nowait(TokenEvent(request_id, None, "abort"))
        return freed

    async def abort_all(self) -> int:
        """Drop every request placed here; returns how many. A restarted router calls it before
        it serves: the requests its dead predecessor placed have no client left to free them."""
        ids = self.placed | set(self.streams)
        for request_id in ids:
            await self.abort(request_id)
        return len(ids)

    async def _run(self) -> None:
        while True:
            if self.engine.num_active == 0:
                self._wake.clear()
                await self._wake.wait()
            async with self._lock:
                try:
                    events = await asyncio.to_thread(self.engine.step)
                except Exception:
                    log.exception("%s: decode step failed; exiting so Ray restarts this worker", self.name)
                    os._exit(1)
            self.steps += 1
            for ev in events:
                queue = self.streams.get(ev.request_id)
                if queue is not None:
                    queue.put_nowait(ev)
            await asyncio.sleep(0)  # let admissions and aborts in between steps

    async def load(self) -> dict:
        runner = self.engine.runner
        on_gpu = runner.device.type == "cuda"
        return {"active": self.engine.num_active, "policy": self.cfg.decode.sparse.policy,
                "budget_used": self.engine.budget_used, "device": str(runner.device),
                "cuda_memory_bytes": torch.cuda.memory_allocated(runner.device) if on_gpu else 0,
                "graph_replays": runner.graph_replays, **self.kv.occupancy()}

    async def health(self) -> dict:
        self._start()
        return {"healthy": not self._loop.done(), "steps": self.steps, "at": time.time(),
                "restarts": self.start_record["restarts"], **await self.load()}
