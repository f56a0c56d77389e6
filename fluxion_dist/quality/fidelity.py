"""How faithful one decode step's attention was: mass recall, output error, budget read.

For one layer of one sequence at one step, given the query, the whole KV cache (the new
token included) and which 16-token blocks each KV head attended (a mask, however it was
chosen), the true attention decides:

- recall, per query head: the true softmax mass of the attended blocks;
- rel_err, per query head: ``|out - full| / |full|`` of the output that was actually used
  (the operator's, or the harness's own sparse attention for an oracle) against full attention;
- budget, per KV head: the fraction of the blocks attended.

The arithmetic runs in the dtype of the K/V it is given: float64 on the CPU, float32 on a GPU
(with TF32 off), where a float64 pass over 32k tokens per layer and step would cost more
than the decode itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.model.arch import ModelArch


class FidelityStats:
    """Sums over decode steps, per (layer, query head) and per (layer, KV head)."""

    def __init__(self, arch: ModelArch) -> None:
        shape_q = (arch.num_hidden_layers, arch.num_attention_heads)
        self.recall = np.zeros(shape_q)
        self.rel_err = np.zeros(shape_q)
        self.budget = np.zeros((arch.num_hidden_layers, arch.num_key_value_heads))
        self.steps = np.zeros(arch.num_hidden_layers, dtype=np.int64)

    def add(self, layer: int, recall: np.ndarray, rel_err: np.ndarray, budget: np.ndarray) -> None:
        self.recall[layer] += recall
        self.rel_err[layer] += rel_err
        self.budget[layer] += budget
        self.steps[layer] += 1

    def merge(self, other: "FidelityStats") -> None:
        self.recall += other.recall
        self.rel_err += other.rel_err
        self.budget += other.budget
        self.steps += other.steps

    def mean(self) -> dict[str, np.ndarray]:
        n = np.maximum(self.steps, 1)[:, None]
        return {"recall": self.recall / n, "rel_err": self.rel_err / n, "budget": self.budget / n}


def true_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [Hq, d]``, ``keys, values [T, Hkv, d]`` -> softmax ``probs [Hq, T]`` and ``full [Hq, d]``,
    in the dtype of ``keys``."""
    hq, d = q.shape
    hkv = keys.shape[1]
    # grouped, not repeat_interleave'd: a copy of the whole cache per call costs more than the rest
    qg = q.to(keys.dtype).view(hkv, hq // hkv, d)
    probs = torch.softmax(torch.einsum("hgd,thd->hgt", qg, keys) / math.sqrt(d), -1)
    return probs.reshape(hq, -1), grouped_output(probs.reshape(hq, -1), values)


def grouped_output(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weights [Hq, T]`` over ``values [T, Hkv, d]`` -> ``[Hq, d]``."""
    hq, t = weights.shape
    hkv = values.shape[1]
    return torch.einsum("hgt,thd->hgd", weights.view(hkv, hq // hkv, t), values).reshape(hq, -1)


def block_mass(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``probs [Hq, T]`` -> ``[Hkv, nb]``: each block's true mass, mean over the KV head's query heads."""
    hq, t = probs.shape
    nb = num_blocks(t)
    padded = torch.nn.functional.pad(probs, (0, nb * BLOCK_TOKENS - t))
    return padded.view(hq, nb, BLOCK_TOKENS).sum(-1).view(num_kv_heads, hq // num_kv_heads, nb).mean(1)


def csr_mask(indptr: np.ndarray, blocks: np.ndarray, num_kv_heads: int, nb: int, row0: int = 0) -> np.ndarray:
    """Rows ``row0 .. row0 + Hkv`` of a selection CSR (``indptr [R + 1]``, ``blocks [nnz]``) ->
    ``bool [Hkv, nb]``. A block outside ``[0, nb)`` is an error, not dropped."""
    mask = np.zeros((num_kv_heads, nb), dtype=bool)
    for h in range(num_kv_heads):
        ids = np.asarray(blocks[indptr[row0 + h]:indptr[row0 + h + 1]], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= nb):
            raise ValueError(f"selection row {row0 + h} names block {int(ids.min())}..{int(ids.max())}; "
                             f"the sequence has {nb}")
        mask[h, ids] = True
    return mask


def csr_token_mask(indptr: np.ndarray, blocks: np.ndarray, masks: np.ndarray, num_kv_heads: int,
                   nb: int) -> np.ndarray:
    """Rows ``0 .. Hkv`` of a selection with per-block token masks (bit t of ``masks[i]``: token
    t of block ``blocks[i]``) -> ``bool [Hkv, nb * 16]``."""
    csr_mask(indptr, blocks, num_kv_heads, nb)  # the blocks' range check
    out = np.zeros((num_kv_heads, nb, BLOCK_TOKENS), dtype=bool)
    bit = np.arange(BLOCK_TOKENS)
    for h in range(num_kv_heads):
        lo, hi = int(indptr[h]), int(indptr[h + 1])
        out[h, np.asarray(blocks[lo:hi], np.int64)] = (masks[lo:hi, None].astype(np.int64) >> bit) & 1
    return out.reshape(num_kv_heads, nb * BLOCK_TOKENS)


def token_mask(mask: np.ndarray, num_tokens: int, group: int, device: torch.device) -> torch.Tensor:
    """``bool [Hkv, nb]`` (blocks) or ``[Hkv, nb * 16]`` (tokens: ``csr_token_mask``) ->
    ``bool [Hq, T]``: each query head sees its KV head's selection."""
    tok = torch.from_numpy(mask).to(device)
    if tok.shape[1] == num_blocks(num_tokens):
        tok = tok.repeat_interleave(BLOCK_TOKENS, 1)
    return tok[:, :num_tokens].repeat_interleave(group, 0)


def mask_fidelity(probs: torch.Tensor, full: torch.Tensor, out: torch.Tensor,
                  mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(recall [Hq], rel_err [Hq], budget [Hkv])`` of output ``out [Hq, d]`` that attended ``mask``
    (blocks, or tokens from ``csr_token_mask``); the budget is the fraction of the sequence's
    blocks, or of its tokens."""
    hq, t = probs.shape
    tok = token_mask(mask, t, hq // mask.shape[0], probs.device)
    recall = (probs * tok).sum(-1)
    o = out.to(full.dtype)
    rel_err = (o - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-30)
    return (recall.double().cpu().numpy(), rel_err.double().cpu().numpy(), mask.sum(1) / mask.shape[1])
