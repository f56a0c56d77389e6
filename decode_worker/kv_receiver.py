"""The decode worker's KV: the node's host store, the UCX server landing pushes in it, and the
extra pages each running sequence grows into.

A request holds two entries in the store: the prompt's pages (reserved by the KV server when
the prefill side offers them) and ``<id>/decode`` for the tokens it will generate (reserved at
admission, so a sequence never runs out of pages mid-decode). Its block table per layer is the
prompt's pages followed by the decode pages.
"""

from __future__ import annotations

import asyncio

import numpy as np

from fluxion_dist.attention.layout import BLOCK_TOKENS
from fluxion_dist.config import DeployConfig
from fluxion_dist.model.arch import ModelArch
from fluxion_dist.server.kv_setup import fabric, store_config, transport_config
from kv_store import KVServer, KVStore, StoreFull, TransferState, TransferTimeout


def _decode_id(request_id: str) -> str:
    return f"{request_id}/decode"


class KVReceiver:
    def __init__(self, cfg: DeployConfig, arch: ModelArch) -> None:
        self.store = KVStore(store_config(cfg, arch))
        self.server = KVServer(self.store, fabric(cfg), transport_config(cfg))
        self.geometry = self.store.geometry
        self.timeout_s = cfg.transport.timeout_s
        self.lease_s = cfg.kv_store.lease_ttl_s
        self.pages = self.store.arena.pages
        self.kmin = self.store.arena.kmin
        self.kmax = self.store.arena.kmax
        self._tables: dict[str, list[list[int]]] = {}
        self._capacity: dict[str, int] = {}

    async def address(self) -> bytes:
        return self.server.address()

    def admit(self, request_id: str, prompt_len: int, max_tokens: int) -> None:
        """Reserve the generated tokens' pages; refuse now if the prompt's would not fit too."""
        g = self.geometry
        prompt_pages = g.num_layers * g.blocks_for(prompt_len)
        extra_blocks = g.blocks_for(prompt_len + max_tokens) - g.blocks_for(prompt_len)
        free = self.store.stats().total_pages - self.store.stats().used_pages
        if prompt_pages + g.num_layers * extra_blocks > free:
            raise StoreFull(prompt_pages + g.num_layers * extra_blocks, free,
                            f"prompt of {prompt_len} + {max_tokens} new tokens")
        if extra_blocks:
            # Leased: if the prefill never comes, the pages come back on their own.
            self.store.reserve(_decode_id(request_id), extra_blocks * BLOCK_TOKENS, ttl_s=self.lease_s)
        self._capacity[request_id] = prompt_len + max_tokens

    async def wait_received(self, request_id: str) -> int:
        """Wait for the prompt's KV to land; claim it; returns the prompt length."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while (state := self.server.poll(request_id)) not in (TransferState.SUCCESS, TransferState.FAILED):
            if loop.time() > deadline:
                raise TransferTimeout(f"KV of {request_id} did not arrive within {self.timeout_s:.0f}s")
            await asyncio.sleep(0.001)
        if state is TransferState.FAILED:
            raise self.server.status(request_id).error
        prompt = self.store.claim(request_id)
        tables = [list(map(int, prompt.block_table(layer))) for layer in range(self.geometry.num_layers)]
        decode_id = _decode_id(request_id)
        if decode_id in self.store:
            extra = self.store.handle(decode_id)
            self.store.renew(decode_id, 10 * 365 * 86400.0)  # owned by the running sequence now
            for layer, table in enumerate(tables):
                table.extend(map(int, extra.block_table(layer)))
        self._tables[request_id] = tables
        return prompt.num_tokens

    def block_tables(self, request_id: str) -> list[list[int]]:
        return self._tables[request_id]

    def ensure_tokens(self, request_id: str, num_tokens: int) -> None:
        if num_tokens > len(self._tables[request_id][0]) * BLOCK_TOKENS:
            raise StoreFull(1, 0, f"request {request_id} outgrew the {self._capacity[request_id]} tokens "
                                  "reserved at admission")

    def release(self, request_id: str) -> bool:
        """Free every page of the request, whatever state it is in; False if it held none."""
        held = request_id in self.store or _decode_id(request_id) in self.store
        if self.server.poll(request_id) is not TransferState.TRANSFERRING:
            self.store.abort(request_id)
        # else UCX may still be writing into the prompt's pages: the KV server frees them if the
        # transfer fails, and the ready lease reaps them if it lands with nobody to claim it.
        self.store.abort(_decode_id(request_id))
        self._tables.pop(request_id, None)
        self._capacity.pop(request_id, None)
        return held

    def occupancy(self) -> dict:
        s = self.store.stats()
        return {"used_pages": s.used_pages, "free_pages": s.total_pages - s.used_pages,
                "total_pages": s.total_pages, "kv_bytes_in": s.bytes_in}
