"""The decode model runner: the model on its device and one decode step over an ``attend`` hook.

It owns static input buffers (token ids, positions) sized for the largest padded batch; a step
copies the batch's ids and positions into them (the only host-to-device traffic of the step
besides what the hook itself moves) and runs embedding -> every layer with the hook -> logits.

CUDA graphs (on a GPU, unless ``enforce_eager``): a hook whose state is static device tensors
(``capturable = True``, e.g. ``fluxion_dist.model.hbm_kv.DenseHBMKV``) gets the whole step
captured as ONE graph per padded batch size (1, 2, 4, ..., max_batch_size), on the step's first
use of that size: the eager run is that step (so capturing rewrites nothing), later steps copy
their inputs and replay. The hybrid operator's hook plans each layer on the host from the
previous layer's counts and replays its own per-layer graphs (``hybrid.device_pipeline``), so
it runs eagerly here, over the real rows only. On the CPU every step is eager.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fluxion_dist.model.decoder import AttentionHook, CausalLM
from fluxion_dist.model.loader import to_device


def padded_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch_size``, then ``max_batch_size`` itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch_size)


class ModelRunner:
    def __init__(self, model: CausalLM, max_batch_size: int, *, enforce_eager: bool = False,
                 device: torch.device | str | None = None) -> None:
        """``device``: where the model runs (moved there, in bf16 on a GPU); None: where it is."""
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        p = next(model.parameters())
        dtype = torch.bfloat16 if self.device.type == "cuda" else p.dtype
        if p.device != self.device or p.dtype != dtype:
            model = to_device(model, self.device, dtype)
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_sizes = padded_batch_sizes(max_batch_size)
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        on_gpu = self.device.type == "cuda"
        self.tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._staging = torch.zeros((2, max_batch_size), dtype=torch.long, pin_memory=on_gpu)
        self._copied = torch.cuda.Event() if on_gpu else None
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self.graph_replays = 0  # steps served by a replay (tests, benchmarks)

    def padded(self, n: int) -> int:
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"batch of {n} rows; the runner holds 1..{self.max_batch_size}")
        return next(b for b in self.batch_sizes if b >= n)

    @torch.inference_mode()
    def run(self, tokens: Sequence[int], positions: Sequence[int], attend: AttentionHook) -> torch.Tensor:
        """One decode step of ``len(tokens)`` sequences -> logits ``[n, vocab]`` (float32, on the
        runner's device), real rows only."""
        n = len(tokens)
        if len(positions) != n:
            raise ValueError(f"{n} tokens but {len(positions)} positions")
        graph = self.use_graphs and getattr(attend, "capturable", False)
        bs = self.padded(n) if graph else n
        self._load_inputs(tokens, positions, bs)
        ids, pos = self.tokens[:bs], self.positions[:bs]
        bind = getattr(attend, "bind", None)
        if bind is not None:
            bind(pos)
        if not graph:
            return self.model.decode_step(ids, pos, attend)[:n]
        key = (bs, id(attend))
        entry = self._graphs.get(key)
        if entry is None:
            logits = self.model.decode_step(ids, pos, attend)  # the step itself, and the warm-up
            self._capture(key, ids, pos, attend)
            return logits[:n]
        g, out = entry
        g.replay()
        self.graph_replays += 1
        return out[:n]

    def _load_inputs(self, tokens: Sequence[int], positions: Sequence[int], bs: int) -> None:
        n = len(tokens)
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the pinned staging
        st = self._staging
        st[0, :n] = torch.as_tensor(tokens, dtype=torch.long)
        st[1, :n] = torch.as_tensor(positions, dtype=torch.long)
        st[:, n:bs] = 0  # padded rows: token 0 at position 0 (their hook rows point at scratch)
        self.tokens[:bs].copy_(st[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(st[1, :bs], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _capture(self, key: tuple[int, int], ids: torch.Tensor, pos: torch.Tensor, attend: AttentionHook) -> None:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = self.model.decode_step(ids, pos, attend)
        if self._pool is None:
            self._pool = g.pool()
        self._graphs[key] = (g, out)

    def release_graphs(self) -> None:
        """Drop the captured graphs (a hook they captured is going away)."""
        self._graphs.clear()
        self._pool = None
