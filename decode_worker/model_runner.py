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
(``hybrid.device_pipeline``), so it is not captured as such. It plans its layers a segment
(``_SEGMENT_LAYERS``) at a time instead (``plan_layers``: rows, refreshes and CPU shares, with
a key naming the segment graph's structure). A batch size's first step replays *piecewise*
(each layer's model pieces, norm + q/k/v + RoPE and o_proj + MLP, as CUDA graphs per batch
size, the hook called eagerly between them; this captures the pieces and warms the operator's
own graphs); later, a segment whose key is seen the first time replays piecewise, the second
time it is captured as one graph (model pieces, operator work, the CPU share as a host node)
and later sights replay it, while the host plans the next segment (``hybrid.step_graph``).
``enforce_eager`` turns all of them off. On the CPU every step is eager.
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
# A hybrid step replays as segments of this many layers: the host plans one while the GPU runs
# the one before, so only the first segment's planning is exposed.
_SEGMENT_LAYERS = 8
# segment graphs kept per runner (a key per segment, refresh phase and CPU-branch pattern)
_MAX_SEGMENT_GRAPHS = 128
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
        self._segments: OrderedDict[tuple, _SegmentGraph] = OrderedDict()  # segment graphs, least recent first
        self._segments_seen: set[tuple] = set()
        self._segments_epoch = None
        self._segments_failed = False
        self.step_graphs = True  # segment graphs for hooks that plan their layers (benchmarks turn them off)
        self.plan_s = 0.0  # host time in the hooks' segment planning, summed (benchmarks)
        self._pool = None
        self.graph_replays = 0  # steps served by a replay (tests, benchmarks)
        self.step_graph_replays = 0  # of those, hybrid steps whose every segment replayed as one graph

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
                if self.step_graphs and hasattr(attend, "plan_layers") and n in self._pieces:
                    return self._run_segments(ids, pos, attend)
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

    def _run_segments(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The step as segments of ``_SEGMENT_LAYERS`` layers over the pieces' static buffers: the
        hook plans a segment's layers while the GPU runs the previous segment, and a segment whose
        key was seen before replays as one graph (captured on its second sight), else piecewise."""
        n, pw, m = ids.shape[0], self._pieces[ids.shape[0]], self.model
        layers, hq = m.arch.num_hidden_layers, m.arch.num_attention_heads
        if attend.graph_epoch != self._segments_epoch:  # the old graphs hold buffers they alone can use
            self._segments.clear()
            self._segments_seen.clear()
            self._segments_epoch = attend.graph_epoch
        bounds = [*range(0, layers, _SEGMENT_LAYERS), layers]
        whole = True
        for si, (a, b) in enumerate(zip(bounds, bounds[1:])):
            t0 = time.perf_counter()
            key = attend.plan_layers(a, b, hq)
            self.plan_s += time.perf_counter() - t0
            entry = self._segment((n, si, key), ids, pos, attend, pw, a, b) if key is not None else None
            if entry is None:
                whole = False
                if a == 0:
                    pw.embed.replay()
                for i in range(a, b):
                    pw.qkv[i].replay()
                    pw.attn.copy_(attend(i, *pw.qkv_out[i]))
                    pw.rest[i].replay()
                if b == layers:
                    pw.head.replay()
            else:
                attend.before_replay(entry.captured)
                entry.graph.replay()
                attend.after_replay(entry.captured)
        self.graph_replays += 1
        self.step_graph_replays += whole
        return pw.logits

    def _segment(self, key: tuple, ids, pos, attend, pw: "_Pieces", a: int, b: int) -> "_SegmentGraph | None":
        """The segment's graph; None where it runs piecewise this time (first sight, or capture failed)."""
        entry = self._segments.get(key)
        if entry is not None:
            self._segments.move_to_end(key)
            return entry
        if self._segments_failed or key not in self._segments_seen:
            if len(self._segments_seen) >= _MAX_KEYS_SEEN:
                self._segments_seen.clear()
            self._segments_seen.add(key)  # a first sight warms the layers' own graphs
            return None
        try:
            entry = self._capture_segment(ids, pos, attend, pw, a, b)
        except RuntimeError:
            log.exception("segment CUDA-graph capture failed; replaying pieces from now on")
            self._segments_failed = True
            torch.cuda.synchronize()
            return None
        if len(self._segments) >= _MAX_SEGMENT_GRAPHS:
            self._segments.popitem(last=False)
        self._segments[key] = entry
        return entry

    def _capture_segment(self, ids, pos, attend, pw: "_Pieces", a: int, b: int) -> "_SegmentGraph":
        """Capture layers [a, b) (the embedding first if a == 0, the logits last if b is the last
        layer) over the pieces' static buffers. The capture runs nothing: the replay that follows
        is the step's."""
        m = self.model
        torch.cuda.synchronize()
        hook = attend.capture_hook()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool, stream=hook.stream, capture_error_mode=_CAPTURE_MODE):
            if a == 0:
                e, c, s = m.decode_embed(ids, pos)
                pw.hidden.copy_(e)
                pw.cos.copy_(c)
                pw.sin.copy_(s)
            for i in range(a, b):
                q, k, v = m.decode_qkv(i, pw.hidden, pw.cos, pw.sin)
                pw.hidden.copy_(m.decode_rest(i, pw.hidden, hook(i, q, k, v)))
            if b == m.arch.num_hidden_layers:
                pw.logits.copy_(m.decode_logits(pw.hidden))
            hook.finish()
        if self._pool is None:
            self._pool = g.pool()
        return _SegmentGraph(g, hook.captured)

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
        self._segments.clear()
        self._segments_seen.clear()
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
class _SegmentGraph:
    """A segment of a hybrid step as one graph; ``captured`` is what its replays need from the
    hook (``hybrid.step_graph.CapturedLayer``: io words, the layer states it holds)."""

    graph: torch.cuda.CUDAGraph
    captured: list
