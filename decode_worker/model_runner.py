"""The decode model runner: the model on its device and one decode step over an ``attend`` hook.

It owns static input buffers (token ids, positions) sized for the largest padded batch; a step
copies the batch's ids and positions into them (the only host-to-device traffic of the step
besides what the hook itself moves) and runs embedding -> every layer with the hook -> logits.

CUDA graphs (on a GPU, unless ``enforce_eager``): a hook whose state is static device tensors
(``capturable = True``, e.g. ``fluxion_dist.model.hbm_kv.DenseHBMKV``) gets the whole step
captured as ONE graph per padded batch size (1, 2, 4, ..., max_batch_size), on the step's first
use of that size: the eager run is that step (so capturing rewrites nothing), later steps copy
their inputs and replay. The hybrid operator's hook does host work per layer call (its plan,
the CPU share's wait for the routing) and replays its own per-layer graphs
(``hybrid.device_pipeline``), so it is not captured as such. It plans its whole step up front
instead (``plan_whole_step``: every layer's rows, refreshes and CPU shares, with a key naming
the graph's structure); the first time a key is seen the step replays *piecewise* (each
layer's model pieces, norm + q/k/v + RoPE and o_proj + MLP, as CUDA graphs per batch size, the
hook called eagerly between them, which warms the operator's own graphs); the second time the
whole step (model pieces, operator work, the CPU share as a host node) is captured as one
graph under that key, and later steps with the key replay it (``hybrid.step_graph``).
``enforce_eager`` turns all of them off. On the CPU every step
is eager.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from fluxion_dist.model.decoder import AttentionHook, CausalLM
from fluxion_dist.model.loader import to_device

log = logging.getLogger(__name__)

# Graphs are captured on a batch size's first step, while the worker serves: its other threads
# keep making CUDA calls (an admitted request's block metadata goes to the device), which a
# process-wide ("global") capture would fail; only this thread's calls can fail a thread-local one.
_CAPTURE_MODE = "thread_local"
# whole-step graphs kept per runner (a key per refresh phase and CPU-branch pattern: few repeat)
_MAX_STEP_GRAPHS = 32
_MAX_KEYS_SEEN = 1024


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
        self._pieces: dict[int, _Pieces] = {}
        self._pieces_failed = False
        self._steps: OrderedDict[tuple, _StepGraph] = OrderedDict()  # whole-step graphs, least recent first
        self._steps_seen: set[tuple] = set()
        self._steps_failed = False
        self.step_graphs = True  # whole-step graphs for hooks that plan their step (benchmarks turn them off)
        self.plan_s = 0.0  # host time in the hooks' whole-step planning, summed (benchmarks)
        self._pool = None
        self.graph_replays = 0  # steps served by a replay (tests, benchmarks)
        self.step_graph_replays = 0  # of those, a hybrid hook's whole-step graphs

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
            if self.use_graphs:
                plan = getattr(attend, "plan_whole_step", None)
                t0 = time.perf_counter()
                key = plan(self.model.arch.num_attention_heads) if plan is not None and self.step_graphs else None
                self.plan_s += time.perf_counter() - t0
                if key is not None:
                    return self._run_whole_step(ids, pos, attend, (n, key))
                return self._run_pieces(ids, pos, attend)
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
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode=_CAPTURE_MODE):
            out = self.model.decode_step(ids, pos, attend)
        if self._pool is None:
            self._pool = g.pool()
        self._graphs[key] = (g, out)

    def _run_pieces(self, ids: torch.Tensor, pos: torch.Tensor, attend: AttentionHook) -> torch.Tensor:
        n = ids.shape[0]
        pw = self._pieces.get(n)
        if pw is None:
            logits = self.model.decode_step(ids, pos, attend)  # the step itself, and the warm-up
            if self._pieces_failed:
                return logits
            try:
                self._pieces[n] = self._capture_pieces(ids, pos)
            except RuntimeError:
                # a model whose ops cannot be captured still decodes, eagerly (tests assert the replays)
                log.exception("piecewise CUDA-graph capture failed; decoding eagerly from now on")
                self._pieces_failed = True
                torch.cuda.synchronize()
            return logits
        pw.embed.replay()
        for i, (qkv, rest) in enumerate(zip(pw.qkv, pw.rest)):
            qkv.replay()
            pw.attn.copy_(attend(i, *pw.qkv_out[i]))
            rest.replay()
        pw.head.replay()
        self.graph_replays += 1
        return pw.logits

    def _run_whole_step(self, ids: torch.Tensor, pos: torch.Tensor, attend, key: tuple) -> torch.Tensor:
        entry = self._steps.get(key)
        if entry is None:
            if self._steps_failed or key not in self._steps_seen:
                if len(self._steps_seen) >= _MAX_KEYS_SEEN:
                    self._steps_seen.clear()
                self._steps_seen.add(key)  # a first sight warms the layers' own graphs
                return self._run_pieces(ids, pos, attend)
            try:
                entry = self._capture_step(ids, pos, attend)
            except RuntimeError:
                log.exception("whole-step CUDA-graph capture failed; replaying pieces from now on")
                self._steps_failed = True
                torch.cuda.synchronize()
                return self._run_pieces(ids, pos, attend)
            if len(self._steps) >= _MAX_STEP_GRAPHS:
                self._steps.popitem(last=False)
            self._steps[key] = entry
        else:
            self._steps.move_to_end(key)
        attend.before_replay(entry.captured)
        entry.graph.replay()
        attend.after_replay(entry.captured)
        self.graph_replays += 1
        self.step_graph_replays += 1
        return entry.logits[:ids.shape[0]]

    def _capture_step(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> "_StepGraph":
        """Capture the planned step (the capture runs nothing: the replay that follows is the step)."""
        torch.cuda.synchronize()
        hook = attend.capture_hook()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool, stream=hook.stream, capture_error_mode=_CAPTURE_MODE):
            logits = self.model.decode_step(ids, pos, hook)
        if self._pool is None:
            self._pool = g.pool()
        return _StepGraph(g, logits, hook.captured)

    def _capture_pieces(self, ids: torch.Tensor, pos: torch.Tensor) -> "_Pieces":
        m, n = self.model, ids.shape[0]
        a = m.arch
        dtype = next(m.parameters()).dtype
        h = torch.empty((n, a.hidden_size), dtype=dtype, device=self.device)
        cos = torch.empty((n, a.head_dim), dtype=torch.float32, device=self.device)
        sin = torch.empty_like(cos)
        attn = torch.empty((n, a.num_attention_heads, a.head_dim), dtype=dtype, device=self.device)

        def embed() -> None:
            e, c, s = m.decode_embed(ids, pos)
            h.copy_(e)
            cos.copy_(c)
            sin.copy_(s)

        torch.cuda.synchronize()
        g_embed, _ = self._capture_one(embed)
        qkv, qkv_out, rest = [], [], []
        for i in range(a.num_hidden_layers):
            g, out = self._capture_one(lambda i=i: m.decode_qkv(i, h, cos, sin))  # outputs live in the pool
            qkv.append(g)
            qkv_out.append(out)
            rest.append(self._capture_one(lambda i=i: h.copy_(m.decode_rest(i, h, attn)))[0])
        g_head, logits = self._capture_one(lambda: m.decode_logits(h))
        return _Pieces(g_embed, qkv, qkv_out, rest, g_head, h, cos, sin, attn, logits)

    def _capture_one(self, fn):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode=_CAPTURE_MODE):
            out = fn()
        if self._pool is None:
            self._pool = g.pool()
        return g, out

    def release_graphs(self) -> None:
        """Drop the captured graphs (a hook they captured is going away)."""
        self._graphs.clear()
        self._pieces.clear()
        self._steps.clear()
        self._steps_seen.clear()
        self._pool = None


@dataclass(slots=True)
class _Pieces:
    """One batch size's piecewise step: graphs over static buffers (the hidden state, RoPE's
    cos/sin and the hook's output are written in place; q, k, v live in the graphs' pool).
    The buffers are held here because the graphs captured their addresses: freed, their memory
    would go to the next eager allocation (the hook's), which the replays then overwrite."""

    embed: torch.cuda.CUDAGraph
    qkv: list[torch.cuda.CUDAGraph]
    qkv_out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rest: list[torch.cuda.CUDAGraph]
    head: torch.cuda.CUDAGraph
    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    attn: torch.Tensor
    logits: torch.Tensor


@dataclass(slots=True)
class _StepGraph:
    """A hybrid hook's whole step as one graph; ``captured`` is what its replays need from the
    hook (``hybrid.step_graph.CapturedLayer``: io words, the layer states it holds)."""

    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor
    captured: list
