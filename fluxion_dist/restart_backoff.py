"""Backoff between restarts of a deployment's actors.

Ray restarts a dead actor at once and as often as ``max_restarts`` allows (-1: for ever), so
an actor that dies while it starts (a checkpoint it cannot read, a GPU out of memory, a port
taken) would restart in a hot loop, each attempt loading the model again. So every actor of
a deployment calls :func:`wait_before_start` first thing in its constructor: a fresh actor
starts at once; a restarted one waits ``server.restart_backoff_s``, doubled for each further
restart that comes within ``server.restart_backoff_reset_s`` of its previous start, up to
``server.restart_backoff_max_s``. One that ran longer than the reset window before it died
is back to the first wait.

The count of consecutive restarts has to outlive the process that dies, and a restarted
actor may land on another node, so it lives in the cluster's GCS key-value store, one key
per actor id: ``{"streak": n, "started": wall time of the last start}``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from fluxion_dist.config.schema import ServerConfig

log = logging.getLogger(__name__)

KV_NAMESPACE = "fluxion-restarts"


def backoff_s(streak: int, server: ServerConfig) -> float:
    """The wait before the ``streak``-th consecutive restart (0: a fresh start)."""
    if streak <= 0:
        return 0.0
    # min() before the power would overflow: 2**1100 is still an int, but a float of it is not
    return min(server.restart_backoff_s * 2.0 ** min(streak - 1, 64), server.restart_backoff_max_s)


def next_streak(previous: dict | None, *, reconstructed: bool, now: float, server: ServerConfig) -> int:
    """How many restarts in a row this start is: 0 for a fresh actor; 1 for a restart after a
    long run (or with no record of the last start); one more than last time for a quick one."""
    if not reconstructed:
        return 0
    if not previous or now - float(previous.get("started", 0.0)) >= server.restart_backoff_reset_s:
        return 1
    return int(previous.get("streak", 0)) + 1


def wait_before_start(server: ServerConfig, *, sleep: Callable[[float], None] = time.sleep,
                      clock: Callable[[], float] = time.time) -> dict:
    """Sleep the backoff this actor's restart calls for, record this start; returns
    ``{"streak", "started", "restarts", "waited_s"}`` (restarts: of this actor since it was created)."""
    import ray
    from ray.experimental import internal_kv

    ctx = ray.get_runtime_context()
    key = f"actor:{ctx.get_actor_id()}".encode()
    try:
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        previous = json.loads(raw) if raw else None
    except Exception:  # no record is the safe reading: it gives the first backoff, not none
        log.exception("could not read the restart record of this actor")
        previous = None
    reconstructed = ctx.was_current_actor_reconstructed
    streak = next_streak(previous, reconstructed=reconstructed, now=clock(), server=server)
    waited = backoff_s(streak, server)
    if waited > 0:
        log.warning("restart %d in a row of this actor: waiting %.1fs before starting (server.restart_backoff_s)",
                    streak, waited)
        sleep(waited)
    restarts = (int(previous.get("restarts", 0)) + 1 if previous else 1) if reconstructed else 0
    record = {"streak": streak, "started": clock(), "restarts": restarts}
    try:
        internal_kv._internal_kv_put(key, json.dumps(record).encode(), overwrite=True, namespace=KV_NAMESPACE)
    except Exception:
        log.exception("could not record this actor's start")
    return {**record, "waited_s": waited}


def forget(actor_id: str) -> None:
    """Drop an actor's record (the deployment is being taken down)."""
    from ray.experimental import internal_kv
    try:
        internal_kv._internal_kv_del(f"actor:{actor_id}".encode(), namespace=KV_NAMESPACE)
    except Exception:
        pass
