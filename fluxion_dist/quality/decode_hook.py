"""The oracle's decode attention hook: attends where the oracle says, and measures what that cost.

It owns one sequence's KV cache (the prefill's K/V, then every decoded token), rounded to
bf16 as the host KV store keeps it, so the oracle reads the same keys and values as the
operator does under every deployment policy. Per layer and step: the true attention of the
new query over the whole cache, the oracle's blocks from its true block mass, attention
over the selected tokens only, and the fidelity of that output (``quality.fidelity``).
The model continues from the *sparse* output, so accuracy reflects what the oracle produces.
"""

from __future__ import annotations

import math

import torch

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks
from fluxion_dist.model.arch import ModelArch
from fluxion_dist.model.decoder import PrefillOutput
from fluxion_dist.quality.fidelity import (FidelityStats, block_mass, grouped_output, mask_fidelity, token_mask,
                                          true_attention)
from fluxion_dist.quality.policies import OracleTopK, StepView


def block_minmax(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest metadata ``k [T, Hkv, d]`` -> ``kmin, kmax [nb, Hkv, d]``; the last block covers its valid tokens."""
    t = k.shape[0]
    pad = num_blocks(t) * BLOCK_TOKENS - t
    shape = (-1, BLOCK_TOKENS) + tuple(k.shape[1:])
    lo = torch.cat([k, k.new_full((pad,) + tuple(k.shape[1:]), math.inf)]).view(shape).amin(1)
    hi = torch.cat([k, k.new_full((pad,) + tuple(k.shape[1:]), -math.inf)]).view(shape).amax(1)
    return lo, hi


def _as_stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The value the KV store keeps (bf16), in the harness's arithmetic dtype."""
    return x.to(torch.bfloat16).to(dtype)


class PolicyAttention:
    """The ``AttentionHook`` for one sequence of batch 1 under the oracle."""

    def __init__(self, prefill: PrefillOutput, arch: ModelArch, oracle: OracleTopK, stats: FidelityStats,
                 capacity: int, dtype: torch.dtype) -> None:
        t0 = prefill.keys[0].shape[0]
        if capacity < t0:
            raise ValueError(f"capacity {capacity} is below the prompt's {t0} tokens")
        self.arch, self.oracle, self.stats, self.dtype = arch, oracle, stats, dtype
        self.length = t0
        self.keys, self.values = [], []
        for k, v in zip(prefill.keys, prefill.values):
            kc = k.new_empty((capacity,) + tuple(k.shape[1:]), dtype=dtype)
            vc = v.new_empty((capacity,) + tuple(v.shape[1:]), dtype=dtype)
            kc[:t0], vc[:t0] = _as_stored(k, dtype), _as_stored(v, dtype)
            self.keys.append(kc)
            self.values.append(vc)
        self._appended = [False] * arch.num_hidden_layers

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
        self.keys[layer][t - 1], self.values[layer][t - 1] = _as_stored(k[0], self.dtype), _as_stored(v[0], self.dtype)
        self._appended[layer] = True

        hkv, g = self.arch.num_key_value_heads, self.arch.gqa_group
        keys, values = self.keys[layer][:t], self.values[layer][:t]
        probs, full = true_attention(q[0], keys, values)
        view = StepView(layer, t, block_mass(probs, hkv).double().cpu().numpy())
        mask = self.oracle.select(view)
        if mask.shape != (hkv, num_blocks(t)):
            raise ValueError(f"oracle returned blocks {mask.shape}; expected {(hkv, num_blocks(t))}")
        # the softmax over a subset of the tokens is the full softmax renormalised over it
        kept = probs * token_mask(mask, t, g, q.device)
        sparse = kept / kept.sum(-1, keepdim=True)
        out = grouped_output(sparse, values)
        self.stats.add(layer, *mask_fidelity(probs, full, out, mask))
        return out[None].to(q.dtype)
