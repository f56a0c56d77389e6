"""The router's view of its workers' health: probed in the background, read without waiting.

``/health`` must answer within a second whatever the workers do, so it never calls a worker:
a background task probes every worker each ``health_interval_s`` with its own
``health_timeout_s`` and keeps the latest verdict. A worker is

- ``ok``: it answered its last probe and said it is healthy;
- ``hung``: its probe is unanswered past the timeout (a SIGSTOPped or wedged process);
- ``missing``: Ray says the process is dead (it is being restarted, or is gone for good);
- ``unhealthy``: it answered, but reports itself unhealthy (its decode loop ended).

A worker that has answered no probe for ``restart_hung_after_s`` is killed, so that Ray
restarts it: a hung process otherwise holds its pages and its requests' slots for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)


class WorkerHealth:
    def __init__(self, actors: dict[str, ray.actor.ActorHandle], *, interval_s: float, timeout_s: float,
                 restart_hung_after_s: float) -> None:
        self.actors = actors
        self.interval_s, self.timeout_s, self.restart_after_s = interval_s, timeout_s, restart_hung_after_s
        now = time.monotonic()
        self._state: dict[str, dict] = {n: {"healthy": False, "status": "starting"} for n in actors}
        self._last_ok: dict[str, float] = dict.fromkeys(actors, now)
        self._probe_since: dict[str, float | None] = dict.fromkeys(actors)
        self._task: asyncio.Task | None = None
        self.kills: dict[str, int] = dict.fromkeys(actors, 0)

    async def start(self) -> None:
        """Probe every worker once (so the first ``/health`` has an answer), then keep probing."""
        if self._task is None:
            await self._round()
            self._task = asyncio.create_task(self._run())

    def status(self, name: str) -> str:
        return self._current(name)["status"]

    def usable(self, name: str) -> bool:
        """Whether requests should go to this worker now; a fresh worker is given the benefit of doubt."""
        return self.status(name) in ("ok", "starting")

    def snapshot(self) -> dict:
        workers = {n: self._current(n) for n in self.actors}
        degraded = sorted(n for n, w in workers.items() if w["status"] != "ok")
        out = {"healthy": not degraded, "status": "degraded" if degraded else "ok", "workers": workers}
        if degraded:
            out["degraded"] = {n: workers[n]["status"] for n in degraded}
        return out

    def _current(self, name: str) -> dict:
        since = self._probe_since[name]
        if since is not None and time.monotonic() - since > self.timeout_s and \
                self._state[name]["status"] != "missing":
            return {"healthy": False, "status": "hung",
                    "error": f"no answer to a health probe for {time.monotonic() - since:.1f}s"}
        return self._state[name]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._round()
            except Exception:  # the monitor must outlive any one bad round
                log.exception("health round failed")

    async def _round(self) -> None:
        # A probe still outstanding from an earlier round is not sent again: one per worker at a time.
        names = [n for n in self.actors if self._probe_since[n] is None]
        await asyncio.gather(*(self._probe(n) for n in names))
        now = time.monotonic()
        for name in self.actors:
            if self.restart_after_s > 0 and now - self._last_ok[name] > self.restart_after_s:
                self._restart(name)

    async def _probe(self, name: str) -> None:
        self._probe_since[name] = time.monotonic()
        reply = asyncio.ensure_future(self.actors[name].health.remote())
        try:
            # Past the timeout the probe keeps waiting in the background: _current reports the
            # worker hung meanwhile, and a late answer still counts.
            done, _ = await asyncio.wait([reply], timeout=self.timeout_s)
            if not done:
                state = await asyncio.to_thread(_actor_state, self.actors[name])
                if state in ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY"):
                    # Calls to a restarting actor wait for it: slow to start is not hung.
                    self._state[name] = {"healthy": False, "status": "missing",
                                         "error": f"the worker process died; Ray is restarting it ({state})"}
                    self._last_ok[name] = time.monotonic()
                else:
                    self._state[name] = {"healthy": False, "status": "hung",
                                         "error": f"no answer to a health probe within {self.timeout_s}s"}
                asyncio.ensure_future(self._late(name, reply))
                return
            self._record(name, reply.result())
            self._probe_since[name] = None
        except RayActorError:
            self._state[name] = {"healthy": False, "status": "missing",
                                 "error": "the worker process is dead; Ray restarts it if it may"}
            self._probe_since[name] = None
        except Exception as e:
            self._state[name] = {"healthy": False, "status": "unhealthy", "error": f"{type(e).__name__}: {e}"}
            self._probe_since[name] = None

    async def _late(self, name: str, reply: asyncio.Future) -> None:
        try:
            self._record(name, await reply)
        except Exception as e:
            self._state[name] = {"healthy": False, "status": "missing",
                                 "error": f"the worker process is dead ({type(e).__name__})"}
        finally:
            self._probe_since[name] = None

    def _record(self, name: str, reply: dict) -> None:
        ok = bool(reply.get("healthy"))
        self._state[name] = {**reply, "healthy": ok, "status": "ok" if ok else "unhealthy"}
        if ok:
            self._last_ok[name] = time.monotonic()

    def _restart(self, name: str) -> None:
        log.warning("%s answered no health probe for %.0fs: killing it so Ray restarts it", name,
                    time.monotonic() - self._last_ok[name])
        try:
            ray.kill(self.actors[name], no_restart=False)
        except Exception:
            log.exception("could not kill %s", name)
        self.kills[name] += 1
        self._last_ok[name] = time.monotonic()  # one kill per restart period, not one per round


def _actor_state(actor: ray.actor.ActorHandle) -> str | None:
    """The GCS's word on an actor (ALIVE, RESTARTING, DEAD, ...); None if it cannot say."""
    try:
        from ray._private.state import actors
        return actors(actor_id=actor._actor_id.hex()).get("State")
    except Exception:
        return None
