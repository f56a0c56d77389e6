"""GPU prefill's K/V to the host, layer by layer, without stalling the GPU.

``LayerOffload`` is the model's ``on_layer_kv`` on a GPU: for layer ``i`` it queues, on a side
stream after the layer's compute, the layer's packing into the store's paged layout (bf16 bits
``[nb, Hkv, 2, 16, d]``, the tail zero-filled) with its Quest min/max over the valid keys, all
on the device (``kv_store.packing.pack_layer``'s twin), and the device-to-host copy of the
result into pinned buffers; then returns at once, so the model goes on queueing layer
``i + 1``. One host thread takes the layers in order as they land and hands each, as a
``kv_store.LayerKV`` of host arrays, to ``deliver(layer, kv)`` (write into the host store, queue
on the wire): layer ``i``'s host work, a copy, overlaps layer ``i + 1``'s compute. ``depth``
pinned buffers bound how far the host may fall behind; the model waits for a free one only then.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from kv_store.packing import LayerKV

Deliver = Callable[[int, LayerKV], None]


def pack_on_device(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k, v [T, Hkv, d]`` -> int16 bits ``blocks [nb, Hkv, 2, 16, d]``, ``kmin, kmax [nb, Hkv, d]``
    (over the bf16 keys, padding excluded), where the tensors are."""
    t, hkv, d = k.shape
    nb = num_blocks(t)
    kv = torch.zeros((2, nb * BLOCK_TOKENS, hkv, d), dtype=torch.bfloat16, device=k.device)
    kv[0, :t], kv[1, :t] = k, v
    blocks = kv.view(2, nb, BLOCK_TOKENS, hkv, d).permute(1, 3, 0, 2, 4).contiguous()
    keys = blocks[:, :, 0].float()  # [nb, Hkv, 16, d]
    valid = (torch.arange(nb * BLOCK_TOKENS, device=k.device) < t).view(nb, 1, BLOCK_TOKENS, 1)
    kmin = torch.where(valid, keys, torch.inf).amin(2).to(torch.bfloat16)
    kmax = torch.where(valid, keys, -torch.inf).amax(2).to(torch.bfloat16)
    return blocks.view(torch.int16), kmin.view(torch.int16), kmax.view(torch.int16)


class LayerOffload:
    def __init__(self, deliver: Deliver, num_tokens: int, kv_heads: int, head_dim: int, *,
                 depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"LayerOffload: depth must be >= 1; got {depth}")
        self.deliver = deliver
        self.shape = (num_tokens, kv_heads, head_dim)
        nb = num_blocks(num_tokens)
        shapes = ((nb, kv_heads, 2, BLOCK_TOKENS, head_dim), (nb, kv_heads, head_dim), (nb, kv_heads, head_dim))
        self.buffers = [tuple(torch.empty(sh, dtype=torch.int16, pin_memory=True) for sh in shapes)
                        for _ in range(depth)]
        self.stream = torch.cuda.Stream()
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(depth):
            self._free.put(i)
        self._ready: queue.Queue[tuple[int, int, torch.cuda.Event] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="prefill-kv-offload", daemon=True)
        self._thread.start()
        self.delivered = 0

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """On the compute thread, right after the layer's K/V were queued."""
        slot = self._free.get()
        if self._error is not None:
            raise self._error
        if tuple(k.shape) != self.shape or tuple(v.shape) != self.shape:
            raise ValueError(f"LayerOffload: layer {layer} K/V {tuple(k.shape)}, {tuple(v.shape)}; "
                             f"sized for {self.shape}")
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(computed)
            for host, dev in zip(self.buffers[slot], pack_on_device(k, v)):
                host.copy_(dev, non_blocking=True)  # the packed temporaries live on this stream
            landed = torch.cuda.Event()
            landed.record(self.stream)
        # the caller may drop k, v now: their memory is not reused before the packing has read it
        k.record_stream(self.stream)
        v.record_stream(self.stream)
        self._ready.put((layer, slot, landed))

    def _drain(self) -> None:
        while (item := self._ready.get()) is not None:
            layer, slot, landed = item
            landed.synchronize()
            try:
                if self._error is None:
                    blocks, kmin, kmax = (b.numpy().view("uint16") for b in self.buffers[slot])
                    self.deliver(layer, LayerKV(blocks, kmin, kmax))
                    self.delivered += 1
            except BaseException as e:  # the compute thread raises it at its next layer, or finish
                self._error = e
            self._free.put(slot)

    def finish(self) -> None:
        """Wait until every queued layer was delivered; raises the first delivery error."""
        self.close()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread.is_alive():
            self._ready.put(None)
            self._thread.join()
