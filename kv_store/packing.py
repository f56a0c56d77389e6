"""K, V of one layer -> paged bf16 blocks plus Quest metadata, as the store holds them.

The metadata is taken over the bf16-rounded keys (what the kernels will read), valid
tokens only, so ``kmin/kmax`` are exact in bf16 and a block's score bounds every key in it.
This is the vectorised twin of ``fluxion_dist.attention.reference.block_metadata``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from fluxion_dist.attention.layout import (BLOCK_TOKENS, from_bf16_bits, pack_kv_blocks,
                                           to_bf16_bits)
from kv_store.errors import LayoutError


class LayerKV(NamedTuple):
    """One request-layer as the store holds it (all ``uint16`` bf16 bits)."""

    blocks: np.ndarray  # [nb, Hkv, 2, 16, d]
    kmin: np.ndarray    # [nb, Hkv, d]
    kmax: np.ndarray    # [nb, Hkv, d]


def block_metadata_bits(blocks: np.ndarray, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel-wise min/max of K per (block, head) from paged bits, padding excluded."""
    nb = blocks.shape[0]
    if not (nb - 1) * BLOCK_TOKENS < num_tokens <= nb * BLOCK_TOKENS:
        raise LayoutError(f"{nb} blocks cannot hold exactly {num_tokens} tokens")
    k = from_bf16_bits(blocks[:, :, 0])  # [nb, Hkv, 16, d] float32
    valid = (np.arange(nb * BLOCK_TOKENS) < num_tokens).reshape(nb, 1, BLOCK_TOKENS, 1)
    kmin = np.where(valid, k, np.inf).min(axis=2)
    kmax = np.where(valid, k, -np.inf).max(axis=2)
    return to_bf16_bits(kmin), to_bf16_bits(kmax)


def pack_layer(k: np.ndarray | torch.Tensor, v: np.ndarray | torch.Tensor) -> LayerKV:
    """``k, v [T, Hkv, d]`` (any float, CPU) -> :class:`LayerKV`."""
    if isinstance(k, torch.Tensor):
        k = k.detach().float().cpu().numpy()
    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu().numpy()
    if k.ndim != 3 or k.shape != v.shape or k.shape[0] == 0:
        raise LayoutError(f"k and v must both be [T>0, Hkv, d]; got {k.shape} and {v.shape}")
    blocks = pack_kv_blocks(k, v)
    kmin, kmax = block_metadata_bits(blocks, k.shape[0])
    return LayerKV(blocks, kmin, kmax)
