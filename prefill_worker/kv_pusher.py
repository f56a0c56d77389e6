"""The prefill worker's KV path: local host store + UCX sender, one transfer per request.

Its frames carry tags under the deployment's secret (handed to the actor through Ray); the
decode worker takes an OFFER only for a request the router admitted there first."""

from __future__ import annotations

import asyncio

import torch

from fluxion_dist.config import DeployConfig
from fluxion_dist.config.kv_setup import fabric, store_config
from fluxion_dist.model.arch import ModelArch
from kv_store import KVSender, KVStore, PeerConnection, SendTransfer, TransferState


class KVPusher:
    def __init__(self, cfg: DeployConfig, arch: ModelArch, secret: bytes) -> None:
        self.store = KVStore(store_config(cfg, arch))
        self.sender = KVSender(self.store, fabric(cfg), cfg.transport, secret=secret)
        self.lease_s = cfg.kv_store.lease_ttl_s
        self._peers: dict[bytes, PeerConnection] = {}

    def _peer(self, address: bytes) -> PeerConnection:
        peer = self._peers.get(address)
        if peer is None or not peer.alive:
            # A decode worker restarted by Ray comes back at a new address; old ones die here.
            peer = self.sender.connect(address)
            self._peers[address] = peer
        return peer

    async def open(self, request_id: str, num_tokens: int, address: bytes) -> SendTransfer:
        """Reserve the prompt's pages here (leased, so a crash mid-way cannot pin them) and offer it."""
        peer = await asyncio.to_thread(self._peer, address)
        self.store.reserve(request_id, num_tokens, ttl_s=self.lease_s)
        return self.sender.begin(peer, request_id)

    def write_and_push(self, transfer: SendTransfer, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Pack one layer into the local pages and queue it on the wire; never blocks on the network."""
        self.store.write_layer_kv(transfer.request_id, layer, k, v)
        transfer.push_layer(layer)

    async def complete(self, transfer: SendTransfer, timeout_s: float) -> None:
        """Wait for the receiver's commit; raises the transfer's typed error if it failed."""
        transfer.finish()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while transfer.poll() not in (TransferState.SUCCESS, TransferState.FAILED):
            if loop.time() > deadline:
                transfer.abort(f"no commit within {timeout_s:.0f}s")
                break
            await asyncio.sleep(0.001)
        self.store.abort(transfer.request_id)
        if transfer.poll() is not TransferState.SUCCESS:
            raise transfer.error or RuntimeError(f"transfer of {transfer.request_id} did not complete")

    def cancel(self, transfer: SendTransfer, reason: str) -> None:
        transfer.abort(reason)
        self.store.abort(transfer.request_id)

    def stats(self) -> dict:
        s = self.store.stats()
        return {"kv_used_pages": s.used_pages, "kv_bytes_out": s.bytes_out}
