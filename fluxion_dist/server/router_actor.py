"""The router: a Ray actor that serves the HTTP API with uvicorn on the configured host and port.

It is the deployment's front door, so Ray restarts it when it dies, as it does the workers
(after the same backoff, ``restart_backoff``). A restarted router comes back by itself: its
constructor queues its own ``start``, which binds the port its first incarnation bound (the
config may say 0: any free port; the one taken is recorded in the cluster's key-value store,
so clients find the service where they left it) and, before it serves, has every decode
worker drop the requests the dead router had placed there: their clients' connections died
with it, and nobody else would free their pages. While it is down nothing listens on the
port (clients get "connection refused", as from any API server that died), and
``fluxion-dist status`` reports it missing; ``/health`` reports ``router_restarts``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import ray
import uvicorn
from ray.experimental import internal_kv

from fluxion_dist.config import config_from_dict
from fluxion_dist.model.loader import tokenizer_from_config
from fluxion_dist.server.app import build_app
from fluxion_dist.server.ray_backend import RayBackend
from fluxion_dist import restart_backoff
from fluxion_dist.restart_backoff import KV_NAMESPACE, wait_before_start

log = logging.getLogger(__name__)


def endpoint_key(namespace: str) -> bytes:
    return f"router-endpoint:{namespace}".encode()


class Router:
    def __init__(self, config: dict, prefill_names: list[str], decode_names: list[str]) -> None:
        self.cfg = config_from_dict(config)
        self.start_record = wait_before_start(self.cfg.server)
        tokenizer = tokenizer_from_config(self.cfg.model)
        ns = self.cfg.cluster.namespace
        self.backend = RayBackend({n: ray.get_actor(n, namespace=ns) for n in prefill_names},
                                  {n: ray.get_actor(n, namespace=ns) for n in decode_names}, self.cfg.server)
        self.backend.router_restarts = self.start_record["restarts"]
        self.app = build_app(self.cfg.server, tokenizer, self.backend, self.cfg.decode.sparse)
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.reclaimed = 0
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Queued behind this constructor: runs as soon as the actor is up again.
            me = ray.get_actor(ray.get_runtime_context().get_actor_name(), namespace=ns)
            me.serve_after_restart.remote()

    async def start(self) -> str:
        """Bind and serve; returns the endpoint URL (the real port when the config asked for 0)."""
        if self._task is None:
            port = self.cfg.server.port
            if self.start_record["restarts"]:
                port = await asyncio.to_thread(self._recorded_port) or port
                # Before the first request of this incarnation: whatever is placed now is the dead one's.
                self.reclaimed = await self.backend.reclaim()
                log.warning("router restarted (%d): serving on port %d again; dropped %d request(s) the "
                            "dead router had placed", self.start_record["restarts"], port, self.reclaimed)
            await self.backend.start()
            self.server = uvicorn.Server(uvicorn.Config(self.app, host=self.cfg.server.host, port=port,
                                                        log_level="warning", lifespan="off"))
            self._task = asyncio.create_task(_serve(self.server, self.cfg.server.host, port))
            while not self.server.started:
                if self._task.done():
                    self._task.result()  # raises the bind error, e.g. the port is taken
                await asyncio.sleep(0.05)
            host, port = self.server.servers[0].sockets[0].getsockname()[:2]
            self.endpoint = f"http://{host}:{port}"
            await asyncio.to_thread(internal_kv._internal_kv_put, endpoint_key(self.cfg.cluster.namespace),
                                    json.dumps({"endpoint": self.endpoint, "port": port}).encode(),
                                    True, namespace=KV_NAMESPACE)
        return self.endpoint

    async def serve_after_restart(self) -> None:
        """``start`` until it serves: nobody awaits a restarted router's start, so one that failed
        (its port still held for a moment, a worker slow to answer the reclaim) would otherwise
        leave the front door up but deaf. Retries back off as restarts do."""
        server, attempt = self.cfg.server, 0
        while True:
            try:
                await self.start()
                return
            except Exception:
                self._task = self.server = None
                attempt += 1
                wait = restart_backoff.backoff_s(attempt, server) or 1.0
                log.exception("the restarted router could not serve (attempt %d); trying again in %.1fs",
                              attempt, wait)
                await asyncio.sleep(wait)

    def _recorded_port(self) -> int | None:
        raw = internal_kv._internal_kv_get(endpoint_key(self.cfg.cluster.namespace), namespace=KV_NAMESPACE)
        return json.loads(raw)["port"] if raw else None

    async def health(self) -> dict:
        workers = await self.backend.health()
        serving = self._task is not None and not self._task.done()
        return {**workers, "healthy": serving and workers["healthy"], "serving": serving}


async def _serve(server: uvicorn.Server, host: str, port: int) -> None:
    """``server.serve()``, with uvicorn's exit on a failed bind turned into an error: a
    SystemExit in a task stops the actor's whole event loop, so a restarted router (whose start
    nobody awaits) would stay alive but deaf instead of trying again."""
    try:
        await server.serve()
    except SystemExit as e:
        raise RuntimeError(f"the router could not serve on {host}:{port} (the port is taken or the "
                           f"address is not this machine's; uvicorn exited with {e.code})") from None
