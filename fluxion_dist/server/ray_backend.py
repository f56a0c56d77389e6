"""The router's side of a request: pick workers, admit, prefill, stream decode, clean up.

A request's life cycle here:
1. pick the decode worker with room for the prompt plus ``max_tokens`` in its KV store and
   the fewest active sequences; ``admit`` reserves its pages (a full store -> HTTP 429);
2. pick the prefill worker with the fewest requests in flight; it computes the prompt's KV
   and pushes it layer by layer over UCX into those pages, and returns the first token;
3. stream the remaining tokens from the decode worker's streaming generator;
4. on any exit (done, client gone, worker died) tell the decode worker to drop the request,
   which frees its pages.
Every call to a worker has a deadline (``server.worker_timeout_s``; a prefill
``server.prefill_timeout_s``, cut short when the health monitor finds its worker hung), so a
hung worker fails the requests it holds with 503 instead of holding them; workers the monitor
reports hung or dead get no new requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from typing import AsyncIterator

import ray
from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram, generate_latest
from ray.exceptions import RayActorError, RayTaskError

from fluxion_dist.config.schema import ServerConfig
from fluxion_dist.policy.request import RequestSparse
from fluxion_dist.sampling import SamplingParams
from fluxion_dist.server.errors import AdmissionRefused, WorkerFailed
from fluxion_dist.server.stream import GeneratedToken
from fluxion_dist.server.worker_health import WorkerHealth
from kv_store.errors import RemoteStoreFull, StoreFull

log = logging.getLogger(__name__)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("fluxion_ttft_seconds", "time to first token", registry=self.registry, buckets=buckets)
        self.tpot = Histogram("fluxion_tpot_seconds", "time per output token after the first",
                              registry=self.registry, buckets=buckets)
        self.queue = Histogram("fluxion_queue_seconds", "admission + worker choice time",
                               registry=self.registry, buckets=buckets)
        self.requests = PCounter("fluxion_requests", "finished requests by outcome "
                                 "(ok, rejected_429, client_abort, error)", ["outcome"], registry=self.registry)
        self.e2e = Histogram("fluxion_e2e_latency_seconds", "request arrival to last token",
                             registry=self.registry, buckets=buckets + (60, 120))
        self.itl = Histogram("fluxion_itl_seconds", "time between consecutive output tokens",
                             registry=self.registry, buckets=buckets)
        self.prompt_tokens = PCounter("fluxion_prompt_tokens", "prompt tokens of admitted requests",
                                      registry=self.registry)
        self.generation_tokens = PCounter("fluxion_generation_tokens", "output tokens streamed",
                                          registry=self.registry)
        self.running = Gauge("fluxion_requests_running", "requests past admission, generating",
                             registry=self.registry)
        self.waiting = Gauge("fluxion_requests_waiting", "requests waiting for admission or prefill",
                             registry=self.registry)
        # Exported for dashboards that plot running/waiting/swapped; it cannot move: admission
        # reserves the pages of a request's whole max_tokens, so no running sequence is preempted.
        self.swapped = Gauge("fluxion_requests_swapped", "always 0: the engine never preempts or swaps out "
                             "a running sequence (its pages are reserved at admission; a full store "
                             "answers 429)", registry=self.registry)
        self.kv_occupancy = Gauge("fluxion_kv_occupancy_ratio", "decode KV store pages in use",
                                  ["worker"], registry=self.registry)
        self.kv_bytes = PCounter("fluxion_kv_transferred_bytes", "KV bytes pushed prefill -> decode",
                                 registry=self.registry)
        self.kv_transfer = Histogram("fluxion_kv_transfer_seconds", "prefill compute + KV push, offer to commit",
                                     registry=self.registry, buckets=buckets)
        self.budget = Gauge("fluxion_sparse_budget_used_ratio", "fraction of the KV decode attention read",
                            ["worker", "policy"], registry=self.registry)
        self.worker_up = Gauge("fluxion_worker_up", "1 while the worker answers its health probes healthy, "
                               "else 0 (hung, dead or restarting, unhealthy)", ["worker"], registry=self.registry)


class RayBackend:
    def __init__(self, prefill: dict[str, ray.actor.ActorHandle], decode: dict[str, ray.actor.ActorHandle],
                 server: ServerConfig) -> None:
        self.prefill, self.decode = prefill, decode
        self.timeout_s, self.prefill_timeout_s = server.worker_timeout_s, server.prefill_timeout_s
        self.workers = WorkerHealth({**prefill, **decode}, interval_s=server.health_interval_s,
                                    timeout_s=server.health_timeout_s,
                                    restart_hung_after_s=server.restart_hung_after_s)
        self._prefill_inflight: Counter[str] = Counter()
        # requests this router has placed on each decode worker and not yet released, its
        # admissions in flight included: concurrent arrivals see each other's choice at once,
        # where the workers' own loads lag by a round trip and would send a burst to one worker
        self._decode_placed: Counter[str] = Counter()
        self._finished: set[str] = set()
        self._refreshes: set[asyncio.Future] = set()  # held so the loop does not drop them
        self.metrics = RouterMetrics()
        self.router_restarts = 0  # set by the router actor: how often Ray restarted it

    async def start(self) -> None:
        await self.workers.start()

    def finished(self, request_id: str) -> None:
        self._finished.add(request_id)

    async def _call(self, ref, what: str, timeout_s: float | None = None, *, watch: str | None = None):
        """Await a worker call under its deadline; a late one fails the request with 503. With
        ``watch``, also as soon as the health monitor finds that worker hung or dead (a prefill's
        deadline is long: a stopped worker should not hold its requests that long)."""
        timeout_s = timeout_s or self.timeout_s
        future = asyncio.ensure_future(ref)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait([future], timeout=min(left, 0.5) if watch else left)
                if done:
                    return future.result()
                if time.monotonic() >= deadline:
                    raise WorkerFailed(f"{what} did not answer within {timeout_s:g}s")
                if watch and self.workers.status(watch) in ("hung", "missing"):
                    raise WorkerFailed(f"{what} is {self.workers.status(watch)} (its health probe)")
        finally:
            if not future.done():
                future.cancel()

    async def _refresh_occupancy(self, name: str) -> None:
        try:
            load = await asyncio.wait_for(self.decode[name].load.remote(), self.timeout_s)
        except Exception:
            return
        self.metrics.kv_occupancy.labels(name).set(load["used_pages"] / max(load["total_pages"], 1))

    async def _usable(self, pool: dict[str, ray.actor.ActorHandle]) -> list[str]:
        """The pool's workers fit for a request; while none is (one restarting, say), wait for
        one up to ``server.worker_timeout_s``, so a quick restart costs a delay, not a 503."""
        deadline = time.monotonic() + self.timeout_s
        while not (names := [n for n in pool if self.workers.usable(n)]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return names

    async def _loads(self) -> dict[str, dict]:
        names = await self._usable(self.decode)
        # a cheap call: held to the health probe's deadline, so one hung worker delays no admission long
        results = await asyncio.gather(*(asyncio.wait_for(self.decode[n].load.remote(), self.workers.timeout_s)
                                         for n in names), return_exceptions=True)
        return {n: r for n, r in zip(names, results) if isinstance(r, dict)}

    async def _admit(self, request_id: str, prompt_len: int, max_tokens: int) -> tuple[str, bytes]:
        loads = await self._loads()
        if not loads:
            raise WorkerFailed(f"no decode worker is reachable: {self.workers.snapshot().get('degraded')}")
        for name, load in loads.items():
            self.metrics.kv_occupancy.labels(name).set(load["used_pages"] / max(load["total_pages"], 1))
            self.metrics.budget.labels(name, load["policy"]).set(load["budget_used"])
        # The store's own admission decides capacity; the order is the least loaded first: the
        # fewest requests running there (as this router placed them), then the most free KV pages.
        order = sorted(loads, key=lambda n: (self._decode_placed[n], -loads[n]["free_pages"]))
        last: Exception | None = None
        for name in order:
            self._decode_placed[name] += 1
            placed = False
            try:
                address = await self._call(self.decode[name].admit.remote(request_id, prompt_len, max_tokens),
                                           f"decode worker {name}")
                placed = True
                return name, address
            except WorkerFailed as e:  # it may still reserve pages late: free them when it answers
                self._background(self._abort(name, request_id))
                last = e
            except RayTaskError as e:
                if not isinstance(e.cause, StoreFull):
                    raise WorkerFailed(f"decode worker {name} refused the request: {_reason(e)}") from None
                last = e.cause
            except RayActorError as e:
                last = WorkerFailed(f"decode worker {name} is unavailable: {_reason(e)}")
            finally:
                if not placed:
                    self._decode_placed[name] -= 1
        if isinstance(last, StoreFull):
            raise AdmissionRefused(f"KV stores are full: {last}")
        raise last or WorkerFailed("no decode worker admitted the request")

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       sparse: RequestSparse | None = None) -> AsyncIterator[int | GeneratedToken]:
        t0 = time.perf_counter()
        m = self.metrics
        m.waiting.inc()
        waiting = True
        try:
            decode_name, address = await self._admit(request_id, len(prompt), params.max_tokens)
        except AdmissionRefused:
            m.requests.labels("rejected_429").inc()
            raise
        except BaseException:
            m.requests.labels("client_abort" if _is_abort() else "error").inc()
            raise
        finally:
            m.waiting.dec()
            waiting = False
        # off the request's path: one more round trip to the worker would add to its TTFT
        self._background(self._refresh_occupancy(decode_name))
        m.prompt_tokens.inc(len(prompt))
        m.waiting.inc()
        waiting = True
        outcome = "error"
        try:
            usable = await self._usable(self.prefill)
            if not usable:
                raise WorkerFailed(f"no prefill worker is reachable: {self.workers.snapshot().get('degraded')}")
            prefill_name = min(usable, key=lambda n: self._prefill_inflight[n])
            m.queue.observe(time.perf_counter() - t0)
            self._prefill_inflight[prefill_name] += 1
            try:
                done = await self._call(self.prefill[prefill_name].prefill.remote(
                    request_id, prompt, address, params.temperature, params.top_p, params.seed, params.logprobs),
                    f"prefill worker {prefill_name}", self.prefill_timeout_s, watch=prefill_name)
            except RayTaskError as e:
                # Another request took the room since admit, or the prefill side's own store is full.
                if isinstance(e.cause, (RemoteStoreFull, StoreFull)):
                    outcome = "rejected_429"
                    raise AdmissionRefused(f"KV stores are full: {e.cause}") from None
                raise WorkerFailed(f"prefill worker {prefill_name} failed: {_reason(e)}") from None
            except RayActorError as e:
                raise WorkerFailed(f"prefill worker {prefill_name} failed: {_reason(e)}") from None
            finally:
                self._prefill_inflight[prefill_name] -= 1
            first = done["token"]
            t_first = t_last = time.perf_counter()
            m.waiting.dec()
            waiting = False
            m.running.inc()
            m.ttft.observe(t_first - t0)
            m.kv_bytes.inc(done["kv_bytes"])
            m.kv_transfer.observe(done["transfer_s"])
            m.generation_tokens.inc()
            n = 1
            try:
                yield GeneratedToken(first, None, done.get("logprobs"))
                gen = self.decode[decode_name].generate.options(num_returns="streaming").remote(
                    request_id, first, dataclasses.asdict(params),
                    dataclasses.asdict(sparse) if sparse is not None else None)
                try:
                    while True:
                        try:
                            ref = await self._call(anext(gen), f"decode worker {decode_name}")
                        except StopAsyncIteration:
                            break
                        # the decode step's token, the fraction of the KV it read, its logprobs if asked
                        token, kv_fraction, logprobs = await ref
                        now = time.perf_counter()
                        m.itl.observe(now - t_last)
                        m.generation_tokens.inc()
                        t_last = now
                        n += 1
                        yield GeneratedToken(token, kv_fraction, logprobs)
                except (RayActorError, RayTaskError) as e:
                    raise WorkerFailed(f"decode worker {decode_name} failed: {_reason(e)}") from None
                outcome = "ok"
            finally:
                m.running.dec()
                if n > 1:
                    m.tpot.observe((t_last - t_first) / (n - 1))
                m.e2e.observe(time.perf_counter() - t0)
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "ok" if request_id in self._finished else "client_abort"
            raise
        finally:
            if waiting:
                m.waiting.dec()
            self._finished.discard(request_id)
            m.requests.labels(outcome).inc()
            # Frees the pages whatever happened (a dead worker's restart frees them too), beside the
            # request: the client's answer (an error from a hung worker above all) waits for none of it.
            self._decode_placed[decode_name] -= 1
            self._background(self._release(decode_name, request_id))

    async def _release(self, name: str, request_id: str) -> None:
        await self._abort(name, request_id)
        await self._refresh_occupancy(name)

    async def _abort(self, name: str, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.decode[name].abort.remote(request_id), self.timeout_s)
        except Exception:
            pass

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def prompt_logprobs(self, request_id: str, prompt: list[int], n: int) -> list:
        usable = await self._usable(self.prefill)
        if not usable:
            raise WorkerFailed(f"no prefill worker is reachable: {self.workers.snapshot().get('degraded')}")
        name = min(usable, key=lambda p: self._prefill_inflight[p])
        self._prefill_inflight[name] += 1
        try:
            return await self._call(self.prefill[name].prompt_logprobs.remote(prompt, n), f"prefill worker {name}",
                                    self.prefill_timeout_s, watch=name)
        except (RayActorError, RayTaskError) as e:
            raise WorkerFailed(f"prefill worker {name} failed to score the prompt: {_reason(e)}") from None
        finally:
            self._prefill_inflight[name] -= 1

    async def reclaim(self) -> int:
        """Have every decode worker drop every request placed on it (a restarted router's first
        act: those requests' clients went with the router that died); returns how many."""
        async def one(name: str) -> int:
            try:
                return await asyncio.wait_for(self.decode[name].abort_all.remote(), self.timeout_s)
            except Exception as e:  # a dead worker's restart frees its pages anyway
                log.warning("could not reclaim the requests on %s: %s", name, _reason(e))
                return 0
        counts = await asyncio.gather(*(one(n) for n in self.decode))
        for name in self.decode:
            await self._refresh_occupancy(name)
        return sum(counts)

    async def health(self) -> dict:
        """The background monitor's latest verdict: answers at once, whatever the workers do."""
        return {**self.workers.snapshot(), "router_restarts": self.router_restarts}

    def metrics_text(self) -> bytes:
        for name, state in self.workers.snapshot()["workers"].items():
            self.metrics.worker_up.labels(name).set(1.0 if state["status"] == "ok" else 0.0)
        return generate_latest(self.metrics.registry)


def _is_abort() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _reason(e: BaseException) -> str:
    if isinstance(e, RayTaskError):
        return f"{type(e.cause).__name__}: {e.cause}" if e.cause is not None else str(e).splitlines()[0]
    if isinstance(e, RayActorError):
        return "the worker process died"
    return f"{type(e).__name__}: {e}"
