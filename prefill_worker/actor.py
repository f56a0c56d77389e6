"""The prefill worker: a Ray actor that turns a prompt into its KV cache on the decode node.

A request's life cycle on this side:
1. the router calls ``prefill(request_id, prompt, decode_address, ...)`` after the chosen
   decode worker has reserved pages for the prompt (its address says where to push);
2. the model runs over the prompt in a worker thread; as each layer's post-RoPE K/V come
   out they are packed into the paged bf16 layout with their block metadata, written into
   this node's host KV store, and handed to the event loop, which pushes them over UCX
   while the next layer computes (up to ``transport.layers_in_flight`` on the wire). On a
   GPU (``prefill.num_gpus > 0``) the model runs there in bf16, ``prefill.chunk_tokens``
   prompt rows at a time (flash attention over the layer's K/V so far), and each layer's K/V
   reach the host through pinned copies on a side stream (``layer_offload``) while the next
   layer computes;
3. when the last layer is acknowledged the local pages are freed and the first token
   (sampled from the last position's logits) is returned to the router, with the bytes
   pushed and the time from offer to commit;
4. any failure (model error, the decode peer gone, a timeout) frees the local pages,
   aborts the transfer on the peer and raises to the router, which fails only this request.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from fluxion_dist.config import config_from_dict
from fluxion_dist.model.loader import load_from_config, resolve_device, to_device
from fluxion_dist.sampling import Sampler, SamplingParams, token_logprobs
from fluxion_dist.restart_backoff import wait_before_start
from kv_store.packing import LayerKV
from prefill_worker import prompt_scoring
from prefill_worker.kv_pusher import KVPusher
from prefill_worker.layer_offload import LayerOffload

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, config: dict, name: str, kv_secret: bytes) -> None:
        self.cfg = config_from_dict(config)
        self.name = name
        self.start_record = wait_before_start(self.cfg.server)  # a restart in a row waits first
        self.device = resolve_device(self.cfg.model, has_gpu=self.cfg.prefill.num_gpus > 0)
        self.model, _ = load_from_config(self.cfg.model, self.device)
        if self.device.type == "cuda":
            self.model = to_device(self.model, self.device, torch.bfloat16)
        self.pusher = KVPusher(self.cfg, self.model.arch, kv_secret)
        self.served = 0

    async def prefill(self, request_id: str, prompt: list[int], decode_address: bytes,
                      temperature: float, top_p: float, seed: int | None, logprobs: int | None = None) -> dict:
        """Returns ``{"token": first token, "kv_bytes": bytes pushed, "transfer_s": offer to commit,
        "logprobs": the first token's TokenLogprobs when ``logprobs`` (the request's n) is set}``."""
        t0 = time.perf_counter()
        transfer = await self.pusher.open(request_id, len(prompt), decode_address)
        try:
            # Runs on the compute thread: the sender queues each layer and returns at once, so
            # layer i is on the wire while layer i + 1 computes.
            def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
                self.pusher.write_and_push(transfer, layer, k, v)

            def on_packed(layer: int, kv: LayerKV) -> None:  # GPU: packed on the device already
                self.pusher.store.write_layer(request_id, layer, kv)
                transfer.push_layer(layer)

            out = await asyncio.to_thread(self._forward, prompt, on_layer, on_packed)
            await self.pusher.complete(transfer, self.cfg.transport.timeout_s)
        except BaseException as e:
            self.pusher.cancel(transfer, f"prefill failed: {type(e).__name__}")
            raise
        self.served += 1
        elapsed = time.perf_counter() - t0
        log.info("%s: prefilled %s (%d tokens) in %.1f ms", self.name, request_id, len(prompt), elapsed * 1e3)
        token = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))(out.logits[-1].cpu())
        lp = token_logprobs(out.logits[-1], token, logprobs) if logprobs is not None else None
        return {"token": token, "kv_bytes": transfer.bytes_sent, "transfer_s": elapsed, "logprobs": lp}

    def _forward(self, prompt: list[int], on_layer, on_packed):
        tokens = torch.tensor(prompt, dtype=torch.long)
        if self.device.type != "cuda":
            return self.model.prefill(tokens, on_layer, all_logits=False)
        arch = self.model.arch
        offload = LayerOffload(on_packed, len(prompt), arch.num_key_value_heads, arch.head_dim)
        try:
            out = self.model.prefill(tokens.to(self.device), offload, all_logits=False,
                                     chunk_tokens=self.cfg.prefill.chunk_tokens, keep_kv=False)
            offload.finish()
            return out
        finally:
            offload.close()

    async def prompt_logprobs(self, prompt: list[int], n: int) -> list:
        """``echo`` + ``logprobs``: each prompt token's TokenLogprobs (None for the first); no KV moves."""
        device = next(self.model.parameters()).device
        chunk = self.cfg.prefill.chunk_tokens if device.type == "cuda" else None
        return await asyncio.to_thread(prompt_scoring.prompt_logprobs, self.model, prompt, n, device, chunk)

    async def health(self) -> dict:
        return {"healthy": True, "served": self.served, "restarts": self.start_record["restarts"],
                **self.pusher.stats()}
