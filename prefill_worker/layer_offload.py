"""GPU prefill's K/V to the host, layer by layer, without stalling the GPU.

``LayerOffload`` is the model's ``on_layer_kv`` on a GPU: for layer ``i`` it queues the
device-to-host copy of its K/V (bf16) into a pinned buffer on a side stream, after the layer's
compute, and returns at once, so the model goes on queueing layer ``i + 1``. One host thread
takes the copies in layer order as they land and hands CPU tensors to ``deliver(layer, k, v)``
(the pusher's contract: pack into the host store, queue on the wire), so layer ``i``'s host
work overlaps layer ``i + 1``'s compute. ``depth`` pinned buffers bound how far the host may
fall behind; the model waits for a free one only then.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

Deliver = Callable[[int, torch.Tensor, torch.Tensor], None]


class LayerOffload:
    def __init__(self, deliver: Deliver, num_tokens: int, kv_heads: int, head_dim: int, *,
                 depth: int = 2, dtype: torch.dtype = torch.bfloat16) -> None:
        if depth < 1:
            raise ValueError(f"LayerOffload: depth must be >= 1; got {depth}")
        self.deliver = deliver
        shape = (num_tokens, kv_heads, head_dim)
        self.buffers = [(torch.empty(shape, dtype=dtype, pin_memory=True),
                         torch.empty(shape, dtype=dtype, pin_memory=True)) for _ in range(depth)]
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
        hk, hv = self.buffers[slot]
        if k.shape != hk.shape or v.shape != hv.shape:
            raise ValueError(f"LayerOffload: layer {layer} K/V {tuple(k.shape)}, {tuple(v.shape)}; "
                             f"buffers are {tuple(hk.shape)}")
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(computed)
            hk.copy_(k, non_blocking=True)
            hv.copy_(v, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record(self.stream)
        # the caller may drop k, v now: their memory is not reused before the copy has read it
        k.record_stream(self.stream)
        v.record_stream(self.stream)
        self._ready.put((layer, slot, landed))

    def _drain(self) -> None:
        while (item := self._ready.get()) is not None:
            layer, slot, landed = item
            landed.synchronize()
            try:
                if self._error is None:
                    self.deliver(layer, *self.buffers[slot])
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
