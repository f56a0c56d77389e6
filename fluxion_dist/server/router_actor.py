"""The router: a Ray actor that serves the HTTP API with uvicorn on the configured host and port."""

from __future__ import annotations

import asyncio

import ray
import uvicorn

from fluxion_dist.config import config_from_dict
from fluxion_dist.model.loader import tokenizer_from_config
from fluxion_dist.server.app import build_app
from fluxion_dist.server.ray_backend import RayBackend


class Router:
    def __init__(self, config: dict, prefill_names: list[str], decode_names: list[str]) -> None:
        self.cfg = config_from_dict(config)
        tokenizer = tokenizer_from_config(self.cfg.model)
        ns = self.cfg.cluster.namespace
        self.backend = RayBackend({n: ray.get_actor(n, namespace=ns) for n in prefill_names},
                                  {n: ray.get_actor(n, namespace=ns) for n in decode_names}, self.cfg.server)
        app = build_app(self.cfg.server, tokenizer, self.backend, self.cfg.decode.sparse)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.cfg.server.host, port=self.cfg.server.port,
                                                    log_level="warning", lifespan="off"))
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        """Bind and serve; returns the endpoint URL (the real port when the config asked for 0)."""
        if self._task is None:
            await self.backend.start()
            self._task = asyncio.create_task(self.server.serve())
            while not self.server.started:
                if self._task.done():
                    self._task.result()  # raises the bind error, e.g. the port is taken
                await asyncio.sleep(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def health(self) -> dict:
        workers = await self.backend.health()
        serving = self._task is not None and not self._task.done()
        return {**workers, "healthy": serving and workers["healthy"], "serving": serving}
