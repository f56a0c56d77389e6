"""Decode a quality sample through the production operator, and read its fidelity back.

Life of one sample under one deployment policy (``OperatorRunner.decode``), as the decode
worker lives it (``decode_worker/engine.py``):

1. the dense prefill's post-RoPE K/V (bf16) are written into the operator's host arena,
   in pages of a shuffled per-layer block table with room for the answer, with their Quest
   min/max (``pack_prefill``; the same bits the KV store would hold);
2. the last prompt token and then every answer token go through ``model.decode_step`` with
   ``op.step([seq], [rid])`` as the attend hook, greedily, ``seq_len`` bumped after each step;
3. each layer's call is wrapped (:class:`FidelityHook`): once the operator has returned, the
   new token's K/V are read back from the arena into a dense mirror of the sequence, and the
   operator's own selection (``hook.selections[layer]``, recorded with
   ``HybridOptions.record_selection``) is scored against the true attention over that mirror:
   mass recall, the relative error of the operator's output, and the blocks read. The model
   continues from the operator's output;
4. ``op.release(rid, pages)``, as the engine does when a request ends.

One operator (and arena) per policy serves every sample of a run; on a GPU it is the device
pipeline (``device="auto"``), here the CPU path.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, from_bf16_bits, num_blocks
from fluxion_dist.config.schema import SparseConfig
from fluxion_dist.hybrid import CostModel, HostArena, HybridAttention, HybridOptions
from fluxion_dist.kernels.compact_metadata import mirror_boxes
from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.decoder import CausalLM, PrefillOutput
from fluxion_dist.quality.decode_hook import block_minmax
from fluxion_dist.quality.fidelity import FidelityStats, csr_mask, csr_token_mask, mask_fidelity, true_attention


def _bits(x: torch.Tensor) -> np.ndarray:
    """bf16-exact float tensor -> its bf16 bits (uint16), on the host."""
    return x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def _paged(k: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """``k, v [T, Hkv, d]`` (bf16) -> ``attention.layout``'s pages ``uint16 [nb, Hkv, 2, 16, d]``,
    the tail of the last page zero: ``layout.pack_kv_blocks``, on the tensors' device."""
    t, hkv, d = k.shape
    nb = num_blocks(t)
    kv = torch.zeros((2, nb * BLOCK_TOKENS, hkv, d), dtype=torch.bfloat16, device=k.device)
    kv[0, :t], kv[1, :t] = k, v
    return _bits(kv.view(2, nb, BLOCK_TOKENS, hkv, d).permute(1, 3, 0, 2, 4))


@dataclass(frozen=True, slots=True)
class PackedPrefill:
    """A prompt's prefill K/V as the KV store holds them: per layer, bf16 pages and Quest boxes
    (host bits, for the arena) and the same bf16 K/V on the model's device."""

    num_tokens: int
    pages: tuple[np.ndarray, ...]  # per layer uint16 [nb, Hkv, 2, 16, d]
    kmin: tuple[np.ndarray, ...]  # per layer uint16 [nb, Hkv, d]
    kmax: tuple[np.ndarray, ...]
    keys: tuple[torch.Tensor, ...]  # per layer bf16 [T, Hkv, d]: the values the pages hold
    values: tuple[torch.Tensor, ...]


def pack_prefill(prefill: PrefillOutput) -> PackedPrefill:
    pages, lo, hi, keys, values = [], [], [], [], []
    for k, v in zip(prefill.keys, prefill.values):
        kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
        pages.append(_paged(kb, vb))
        # boxes of the rounded keys: min/max of bf16 values are bf16, so the bits are exact
        kmin, kmax = block_minmax(kb.float())
        lo.append(_bits(kmin))
        hi.append(_bits(kmax))
        keys.append(kb)
        values.append(vb)
    return PackedPrefill(prefill.keys[0].shape[0], tuple(pages), tuple(lo), tuple(hi), tuple(keys), tuple(values))


def with_mirror_boxes(packed: PackedPrefill) -> PackedPrefill:
    """The same prefill with the int8 mirror's boxes (``compact_metadata.mirror_boxes``) in place
    of the bf16 ones: the blocks the GPU's compact scoring would rank, as bf16 boxes (at most one
    bf16 step wider)."""
    boxes = [mirror_boxes(lo, hi) for lo, hi in zip(packed.kmin, packed.kmax)]
    return dataclasses.replace(packed, kmin=tuple(b[0] for b in boxes), kmax=tuple(b[1] for b in boxes))


@dataclass(slots=True)
class LiveSequence:
    """One sample in the operator's arena (fits ``hybrid.PagedSequenceView``), plus the dense
    mirror of its K/V that the fidelity is computed over."""

    block_tables: list[list[int]]
    seq_len: int
    keys: list[torch.Tensor]  # per layer [capacity, Hkv, d], float64 on the CPU, float32 on a GPU
    values: list[torch.Tensor]


class FidelityHook:
    """The operator's step hook, with each layer's selection scored against the true attention."""

    def __init__(self, inner, arena: HostArena, seq: LiveSequence, stats: FidelityStats) -> None:
        self.inner, self.arena, self.seq, self.stats = inner, arena, seq, stats

    def report(self):
        return self.inner.report()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.inner(layer, q, k, v)
        if out.is_cuda:
            # the operator's output and its append (UVA writes into the arena) are queued on
            # the caller's stream: both must have landed before they are read here
            torch.cuda.current_stream().synchronize()
        seq, pos = self.seq, self.seq.seq_len
        page = seq.block_tables[layer][pos // BLOCK_TOKENS]
        new_kv = from_bf16_bits(self.arena.kv_pages[page, :, :, pos % BLOCK_TOKENS])  # [Hkv, 2, d]
        keys, values = seq.keys[layer], seq.values[layer]
        keys[pos] = torch.from_numpy(new_kv[:, 0]).to(keys)
        values[pos] = torch.from_numpy(new_kv[:, 1]).to(values)
        t = pos + 1
        hkv = keys.shape[1]
        indptr, blocks = self.inner.selections[layer]
        masks = getattr(self.inner, "token_masks", {}).get(layer)  # the CPU path's token refinement
        mask = (csr_mask(indptr, blocks, hkv, num_blocks(t)) if masks is None
                else csr_token_mask(indptr, blocks, masks, hkv, num_blocks(t)))
        probs, full = true_attention(q[0], keys[:t], values[:t])
        self.stats.add(layer, *mask_fidelity(probs, full, out[0], mask))
        return out


class OperatorRunner:
    """One deployment policy: its ``HybridAttention`` over an arena sized for ``max_tokens``."""

    def __init__(self, arch: ModelArch, sparse: SparseConfig, cost: CostModel, *, max_tokens: int,
                 compute: torch.device, device: str = "auto", cpu_threads: int | None = None, seed: int = 0) -> None:
        self.name = sparse.policy
        self.arch, self.compute = arch, compute
        self.dtype = torch.float64 if compute.type == "cpu" else torch.float32
        layers, hkv, d = arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim
        self.capacity = max_tokens
        width = num_blocks(max_tokens)
        shape = (layers * width, hkv, 2, BLOCK_TOKENS, d)
        self.arena = HostArena(np.zeros(shape, np.uint16), np.zeros((shape[0], hkv, d), np.uint16),
                               np.zeros((shape[0], hkv, d), np.uint16))
        # shuffled pages, as the KV store hands them out: the block tables are not the identity
        order = np.random.default_rng(seed).permutation(shape[0])
        self.tables = [order[i * width:(i + 1) * width].tolist() for i in range(layers)]
        threads = cpu_threads or sparse.cpu_threads or os.cpu_count() or 1
        self.op = HybridAttention(self.arena, sparse, cost, HybridOptions(
            num_layers=layers, cpu_threads=threads, device=device, record_selection=True))
        self._requests = 0

    def close(self) -> None:
        self.op.close()

    def begin(self, packed: PackedPrefill) -> tuple[LiveSequence, str]:
        """Write a prefill into the arena; the sequence and a request id never used before."""
        t0 = packed.num_tokens
        if t0 >= self.capacity:
            raise ValueError(f"a {t0}-token prefill leaves no room in an arena built for {self.capacity} tokens")
        a, keys, values = self.arena, [], []
        for layer, table in enumerate(self.tables):
            pages = np.asarray(table[:num_blocks(t0)], dtype=np.int64)
            a.kv_pages[pages] = packed.pages[layer]
            a.kmin[pages] = packed.kmin[layer]
            a.kmax[pages] = packed.kmax[layer]
            # the pages' own values (the tests check the mirror against the arena's bytes)
            k, v = packed.keys[layer], packed.values[layer]
            kc = torch.empty((self.capacity,) + tuple(k.shape[1:]), dtype=self.dtype, device=self.compute)
            vc = torch.empty_like(kc)
            kc[:t0], vc[:t0] = k, v
            keys.append(kc)
            values.append(vc)
        self._requests += 1
        return LiveSequence([list(t) for t in self.tables], t0, keys, values), f"{self.name}-{self._requests}"

    def hook(self, seq: LiveSequence, rid: str, stats: FidelityStats) -> FidelityHook:
        if seq.seq_len + 1 > self.capacity:
            raise ValueError(f"sequence of {seq.seq_len + 1} tokens exceeds the arena's {self.capacity}")
        return FidelityHook(self.op.step([seq], [rid]), self.arena, seq, stats)

    def end(self, seq: LiveSequence, rid: str) -> None:
        self.op.release(rid, [p for table in seq.block_tables for p in table])

    def decode(self, model: CausalLM, prompt: torch.Tensor, packed: PackedPrefill, answer_len: int,
               stats: FidelityStats) -> list[int]:
        """Greedy answer of ``answer_len`` tokens after ``prompt`` (whose last token is decoded)."""
        seq, rid = self.begin(packed)
        if seq.seq_len != prompt.numel() - 1:
            raise ValueError(f"the prefill holds {seq.seq_len} tokens; the prompt less its last has {prompt.numel() - 1}")
        tok, out = prompt[-1:], []
        try:
            for _ in range(answer_len):
                hook = self.hook(seq, rid, stats)
                logits = model.decode_step(tok, torch.tensor([seq.seq_len], device=prompt.device), hook)
                seq.seq_len += 1
                tok = logits[0].argmax().view(1)
                out.append(int(tok))
        finally:
            self.end(seq, rid)
        return out


def attention_dtype_note(compute: torch.device) -> str:
    return "float64 (CPU)" if compute.type == "cpu" else f"float32 ({compute.type}, TF32 off)"

