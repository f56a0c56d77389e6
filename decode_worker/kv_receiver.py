"""The decode worker's KV: the node's host store and the UCX server landing pushes in it.

A request is admitted on the server when the router places it here, so only its prefill
worker's OFFER (authenticated under the deployment's secret) reserves the prompt's pages;
an admission whose offer does not come within ``transport.offer_deadline_s`` frees the
pages reserved for the request's generated tokens.
"""

from __future__ import annotations

import asyncio

from decode_worker.sequence_pages import SequencePages, decode_entry
from fluxion_dist.config import DeployConfig
from fluxion_dist.config.kv_setup import fabric, store_config
from fluxion_dist.model.arch import ModelArch
from kv_store import KVServer, KVStore, TransferState, TransferTimeout


class KVReceiver(SequencePages):
    def __init__(self, cfg: DeployConfig, arch: ModelArch, secret: bytes) -> None:
        super().__init__(KVStore(store_config(cfg, arch)), cfg.kv_store.lease_ttl_s)
        self.server = KVServer(self.store, fabric(cfg), cfg.transport, secret=secret)
        self.timeout_s = cfg.transport.timeout_s

    async def address(self) -> bytes:
        return self.server.address()

    def admit(self, request_id: str, prompt_len: int, max_tokens: int) -> None:
        super().admit(request_id, prompt_len, max_tokens)
        self.server.admit(request_id, prompt_len, holds=(decode_entry(request_id),))

    async def wait_received(self, request_id: str) -> int:
        """Wait for the prompt's KV to land, then adopt it; returns the prompt length."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while (state := self.server.poll(request_id)) not in (TransferState.SUCCESS, TransferState.FAILED):
            if loop.time() > deadline:
                raise TransferTimeout(f"KV of {request_id} did not arrive within {self.timeout_s:.0f}s")
            await asyncio.sleep(0.001)
        if state is TransferState.FAILED:
            raise self.server.status(request_id).error
        return self.adopt(request_id)

    def release(self, request_id: str, *, prompt_in_flight: bool = False) -> bool:
        # A prompt still TRANSFERRING is freed by the KV server if the transfer fails, or by
        # the ready lease if it lands with nobody left to claim it.
        withdrawn = self.server.forget(request_id)
        in_flight = prompt_in_flight or self.server.poll(request_id) is TransferState.TRANSFERRING
        return super().release(request_id, prompt_in_flight=in_flight) or withdrawn

    def occupancy(self) -> dict:
        return {**super().occupancy(), "kv_rejected": self.server.rejections.total}
