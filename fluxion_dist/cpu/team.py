"""A persistent CPU team for the decode worker's sparse partial attention.

``sparse_partial_attention`` (attention.py) opens an OpenMP region and checks
every argument in Python on every call: a fixed cost per layer call that a
decode step pays once per layer. A decode worker instead holds one
``AttentionTeam`` for its life: its threads are created once and wait between
calls (spinning ``spin_us``, then asleep), ``bind`` checks the step's arena,
lengths and head layout once per step, and ``attend`` checks per layer only
what a layer changes, in C. Numerics are those of ``sparse_partial_attention``
with the same thread and chunk counts (the same job, attention_job.h).

    with AttentionTeam(num_threads=16) as team:
        for step in steps:
            team.bind(kv_pages, seq_lens, num_q_heads, scale)
            for layer in layers:
                part = team.attend(q, block_tables, sel_indptr, sel_blocks)

One caller thread at a time; ``close`` (or leaving the ``with``) joins the
threads. Callers that share a team (the hybrid operator's CPU path and its GPU
pipeline's CPU share) tag their binding (``bind(..., owner=tag)``) and bind again
only when ``team.owner`` is no longer their tag. A forked child has none of the
parent's threads: ``attend`` there refuses the parent's binding, and ``bind``
there starts the child's own threads.
"""

from __future__ import annotations

import os

import numpy as np

from fluxion_dist.cpu import _checks, _team
from fluxion_dist.cpu._checks import Isa
from fluxion_dist.cpu.attention import CHUNKS_PER_THREAD, PREFETCH_BLOCKS, BatchPartial

SPIN_US = 200.0
"""How long an idle worker spins before it sleeps: longer than the gap between two layers'
calls of a decode step, so within a step no worker sleeps and none needs waking."""

PAUSE_US = 0.0
"""How much of that spin holds the core (pause instructions) before the waiter yields between
checks. On a machine with more runnable threads than cores a core-holding waiter delays the
thread it waits for by its whole pause; yielding costs a system call per check (well under a
microsecond on an idle core). A host with cores reserved for the team may raise it."""


class AttentionTeam:
    """``num_threads`` threads (the calling one included) for the CPU share of every layer."""

    def __init__(self, num_threads: int, *, spin_us: float = SPIN_US, pause_us: float = PAUSE_US, isa: Isa = "auto",
                 prefetch: int = PREFETCH_BLOCKS, chunks_per_thread: int = CHUNKS_PER_THREAD) -> None:
        num_threads = _checks.positive_int("num_threads", num_threads)
        chunks_per_thread = _checks.positive_int("chunks_per_thread", chunks_per_thread)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be a non-negative integer; got {prefetch!r}")
        spin_us, pause_us = float(spin_us), float(pause_us)
        for name, value in (("spin_us", spin_us), ("pause_us", pause_us)):
            if not 0 <= value <= 1e6:
                raise ValueError(f"{name} must lie in [0, 1e6]; got {value}")
        if isa not in _checks.ISAS:
            raise ValueError(f"isa must be one of {_checks.ISAS}; got {isa!r}")
        self.isa, self.prefetch = isa, prefetch
        self._make = (num_threads, spin_us, pause_us, chunks_per_thread)
        self._native = _team.Team(*self._make)
        self._pid = os.getpid()
        self.owner: object = None
        """The tag of the current binding (``bind``'s ``owner``); None before the first bind."""

    @property
    def native(self) -> _team.Team:
        """The native team, for the unchecked selection drivers (``cpu.selection``'s ``team=``).
        In a process forked since, the child's own: new threads, with no binding."""
        if self.closed:
            raise RuntimeError("the team is closed")
        if os.getpid() != self._pid:  # forked since: the parent's threads are not in this process
            self._native = _team.Team(*self._make)
            self._pid = os.getpid()
            self.owner = None  # the new threads have no binding
        return self._native

    @property
    def num_threads(self) -> int:
        return self._native.num_threads

    @property
    def closed(self) -> bool:
        return self._native.closed

    def bind(self, kv_pages: np.ndarray, seq_lens: np.ndarray, num_q_heads: int, scale: float, *,
             owner: object = None) -> None:
        """The step's arena ``kv_pages [P, Hkv, 2, 16, d]`` (u16 bf16 bits, referenced: it must
        stay alive and in place until the next bind), lengths ``seq_lens [B]`` (i32, copied) and
        query heads (a multiple of Hkv). ``owner`` becomes ``self.owner`` once the bind holds."""
        if self.closed:
            raise RuntimeError("the team is closed")
        self.owner = None
        native = self.native  # in a forked child, the child's own threads
        _checks.array("kv_pages", kv_pages, np.uint16, 5)
        num_q_heads = _checks.positive_int("num_q_heads", num_q_heads)
        d = kv_pages.shape[4]
        _checks.arena(np.empty((1, num_q_heads, d), np.float32), kv_pages,
                      np.zeros((1, 1), np.int32), np.zeros(1, np.int32))
        _checks.contiguous("seq_lens", _checks.array("seq_lens", seq_lens, np.int32, 1))
        if seq_lens.size < 1:
            raise ValueError("seq_lens must name at least one request")
        if int(seq_lens.min()) < 0:
            raise ValueError(f"seq_lens must be >= 0; got {int(seq_lens.min())}")
        isa_code = _checks.resolve_isa(self.isa, d)
        native._bind(kv_pages, seq_lens, num_q_heads, _checks.finite_scale(scale), isa_code, self.prefetch)
        self.owner = owner

    def attend(self, q: np.ndarray, block_tables: np.ndarray, sel_indptr: np.ndarray,
               sel_blocks: np.ndarray, sel_masks: np.ndarray | None = None) -> BatchPartial:
        """Partial attention of ``q [B, Hq, d]`` (f32) over each (request, KV head)'s selected
        blocks, as ``sparse_partial_attention`` with the bound arena, lengths and scale and this
        layer's ``block_tables [B, max_blocks]`` (i32, rows may be strided)."""
        return self._native.attend(q, block_tables, sel_indptr, sel_blocks, sel_masks)

    def host_job(self, kv_pages: np.ndarray, seq_lens: np.ndarray, block_tables: np.ndarray, q: np.ndarray,
                 sel_indptr: np.ndarray, sel_blocks: np.ndarray, counts: np.ndarray, out: BatchPartial,
                 scale: float) -> _team.HostJob:
        """A layer's CPU share as a function a CUDA host node calls (``cpu/host_job.h``): the
        partial of ``q`` over the CSR ``sel_indptr`` / the first ``counts[2]`` of ``sel_blocks``
        into ``out``'s arrays, as ``attend`` computes it. Every buffer is checked here, once, and
        referenced: the caller rewrites ``seq_lens``, ``block_tables`` and ``q`` in place
        between calls. The job runs on this team, so no other call may run on it meanwhile."""
        if self.closed:
            raise RuntimeError("the team is closed")
        dims = _checks.arena(q, kv_pages, block_tables, seq_lens)
        rows = dims.batch * dims.num_kv_heads
        for name, x, dtype, shape in (("sel_indptr", sel_indptr, np.int32, (rows + 1,)),
                                      ("sel_blocks", sel_blocks, np.int32, sel_blocks.shape[:1]),
                                      ("counts", counts, np.int32, (4,)), ("out.o", out.o, np.float32, q.shape),
                                      ("out.m", out.m, np.float32, q.shape[:2]),
                                      ("out.l", out.l, np.float32, q.shape[:2])):
            _checks.contiguous(name, _checks.array(name, x, dtype, len(shape)))
            _checks.shape(name, x, shape)
        isa_code = _checks.resolve_isa(self.isa, dims.head_dim)
        return self.native._host_job(kv_pages, seq_lens, block_tables, q, sel_indptr, sel_blocks, counts, out.o,
                                     out.m, out.l, _checks.finite_scale(scale), isa_code, self.prefetch)

    def scattered_read(self, words: np.ndarray, starts: np.ndarray, run_words: int) -> int:
        """The XOR fold of the ``run_words``-word runs of ``words`` (u64) at ``starts`` (i64), read
        on this team's threads with no arithmetic: a benchmark's ceiling for ``attend``'s
        scattered reads, made by the same threads under the same wait policy."""
        return self._native.scattered_read(words, starts, run_words)

    def close(self) -> None:
        self.owner = None
        self._native.close()

    def __enter__(self) -> AttentionTeam:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
