"""A decode attention hook that attends only where a policy says, and measures what that cost.

It owns one sequence's KV cache (the prefill's K/V, then every decoded token) and,
per layer and step: computes the true attention of the new query over the whole
cache, asks the policy for blocks, attends over the selected tokens only, and
records per query head the true softmax mass the selection kept (recall) and the
relative error of the output against full attention. The model then continues
from the *sparse* output, so accuracy reflects what the policy really produces.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.decoder import PrefillOutput
from fluxion_dist.quality.policies import Policy, StepView


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


def block_minmax(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest metadata ``k [T, Hkv, d]`` -> ``kmin, kmax [nb, Hkv, d]``; the last block covers its valid tokens."""
    t = k.shape[0]
    pad = num_blocks(t) * BLOCK_TOKENS - t
    shape = (-1, BLOCK_TOKENS) + tuple(k.shape[1:])
    lo = torch.cat([k, k.new_full((pad,) + tuple(k.shape[1:]), math.inf)]).view(shape).amin(1)
    hi = torch.cat([k, k.new_full((pad,) + tuple(k.shape[1:]), -math.inf)]).view(shape).amax(1)
    return lo, hi


class PolicyAttention:
    """The ``AttentionHook`` for one sequence of batch 1 under one policy."""

    def __init__(self, prefill: PrefillOutput, arch: ModelArch, policy: Policy, stats: FidelityStats,
                 capacity: int) -> None:
        t0 = prefill.keys[0].shape[0]
        if capacity < t0:
            raise ValueError(f"capacity {capacity} is below the prompt's {t0} tokens")
        self.arch, self.policy, self.stats = arch, policy, stats
        self.length = t0
        self.keys, self.values, self.kmin, self.kmax = [], [], [], []
        for k, v in zip(prefill.keys, prefill.values):
            kc = k.new_empty((capacity,) + tuple(k.shape[1:]))
            vc = v.new_empty((capacity,) + tuple(v.shape[1:]))
            kc[:t0], vc[:t0] = k, v
            lo, hi = block_minmax(k)
            nb_cap = num_blocks(capacity)
            self.kmin.append(torch.cat([lo, lo.new_full((nb_cap - lo.shape[0],) + tuple(lo.shape[1:]), math.inf)]))
            self.kmax.append(torch.cat([hi, hi.new_full((nb_cap - hi.shape[0],) + tuple(hi.shape[1:]), -math.inf)]))
            self.keys.append(kc)
            self.values.append(vc)
        self._appended = [False] * arch.num_hidden_layers
        policy.start_sequence()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1:
            raise ValueError(f"PolicyAttention decodes one sequence; got a batch of {q.shape[0]}")
        # layer 0 starts a new step: the token before it is in every layer's cache by now
        if layer == 0 and self._appended[0]:
            self.length += 1
            self._appended = [False] * self.arch.num_hidden_layers
        t = self.length + 1
        if t > self.keys[layer].shape[0]:
            raise ValueError(f"cache capacity {self.keys[layer].shape[0]} exceeded")
        pos = t - 1
        self.keys[layer][pos], self.values[layer][pos] = k[0], v[0]
        self._appended[layer] = True
        b = pos // BLOCK_TOKENS
        self.kmin[layer][b] = torch.minimum(self.kmin[layer][b], k[0])
        self.kmax[layer][b] = torch.maximum(self.kmax[layer][b], k[0])

        g, d = self.arch.gqa_group, self.arch.head_dim
        hq, hkv = self.arch.num_attention_heads, self.arch.num_key_value_heads
        scale = 1.0 / math.sqrt(d)
        keys = self.keys[layer][:t].float().repeat_interleave(g, 1)  # [T, Hq, d]
        values = self.values[layer][:t].float().repeat_interleave(g, 1)
        qf = q[0].float()
        logits = torch.einsum("hd,thd->ht", qf, keys) * scale  # [Hq, T]
        probs = torch.softmax(logits, -1)
        full = torch.einsum("ht,thd->hd", probs, values)

        nb = num_blocks(t)
        padded = torch.nn.functional.pad(probs, (0, nb * BLOCK_TOKENS - t))
        block_mass = padded.view(hq, nb, BLOCK_TOKENS).sum(-1).view(hkv, g, nb).mean(1)
        view = StepView(layer, qf.cpu().numpy(), t, self.kmin[layer][:nb].float().cpu().numpy(),
                        self.kmax[layer][:nb].float().cpu().numpy(), scale,
                        block_mass.double().cpu().numpy())
        blocks = self.policy.select(view)
        if blocks.shape != (hkv, nb):
            raise ValueError(f"policy {self.policy.name} returned blocks {blocks.shape}; expected {(hkv, nb)}")
        tok = torch.from_numpy(blocks).to(q.device).repeat_interleave(BLOCK_TOKENS, 1)[:, :t]
        tok = tok.repeat_interleave(g, 0)  # [Hq, T]
        sparse = torch.softmax(logits.masked_fill(~tok, -math.inf), -1)
        out = torch.einsum("ht,thd->hd", sparse, values)

        recall = (probs * tok).sum(-1)
        rel_err = (out - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-30)
        self.stats.add(layer, recall.double().cpu().numpy(), rel_err.double().cpu().numpy(),
                       blocks.sum(1) / nb)
        return out[None].to(q.dtype)
