"""Dense attention over an in-process KV cache: the decode hook of the plain model, and the oracle
that every sparse decode path is compared with end to end."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fluxion_dist.model.decoder import PrefillOutput


class DenseKVCache:
    """Per sequence and layer, the growing K/V ``[T, Hkv, d]``; attends over all of it."""

    def __init__(self, num_layers: int, kv_dtype: torch.dtype | None = None) -> None:
        self.num_layers = num_layers
        self.kv_dtype = kv_dtype  # bf16 reproduces what a host KV store keeps
        self.keys: list[list[torch.Tensor]] = []  # [seq][layer]
        self.values: list[list[torch.Tensor]] = []

    def add_sequence(self, prefill: PrefillOutput) -> int:
        """Adopt a prompt's K/V; returns the sequence's slot in the batch."""
        cast = (lambda t: t) if self.kv_dtype is None else (lambda t: t.to(self.kv_dtype))
        self.keys.append([cast(k) for k in prefill.keys])
        self.values.append([cast(v) for v in prefill.values])
        return len(self.keys) - 1

    def seq_len(self, seq: int) -> int:
        return self.keys[seq][0].shape[0]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != len(self.keys):
            raise ValueError(f"batch of {q.shape[0]} queries for {len(self.keys)} cached sequences")
        outs = []
        for b in range(q.shape[0]):
            kc = torch.cat([self.keys[b][layer], k[b:b + 1].to(self.keys[b][layer].dtype)])
            vc = torch.cat([self.values[b][layer], v[b:b + 1].to(self.values[b][layer].dtype)])
            self.keys[b][layer], self.values[b][layer] = kc, vc
            g = q.shape[1] // kc.shape[1]
            o = F.scaled_dot_product_attention(
                q[b][:, None], kc.repeat_interleave(g, 1).transpose(0, 1).to(q.dtype),
                vc.repeat_interleave(g, 1).transpose(0, 1).to(q.dtype))
            outs.append(o[:, 0])
        return torch.stack(outs)
