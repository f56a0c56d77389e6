"""The KV layout contract shared by the KV store, the CPU path and the GPU kernels.

One request's KV for one layer is an array of shape
``[num_blocks, num_kv_heads, 2, BLOCK_TOKENS, head_dim]`` in bf16 (held as
``uint16`` where a library has no bf16 type). Index 0 of the third axis is K,
index 1 is V, so the K and V of one (block, head) are one contiguous run of
``2 * BLOCK_TOKENS * head_dim * 2`` bytes (8 KiB at d=128): the size at which a
scattered UVA read from the GPU runs near memcpy speed, and a whole unit of
work for one CPU thread.

Tokens past the end of the sequence in the last block are padding; readers
take the valid count from the sequence length, never from the bytes.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK_TOKENS = 16
"""Base granularity: tokens per block (Quest's page size)."""

COARSE_FACTORS = (1, 4, 16)
"""Granularities as multiples of the base block: 16, 64 and 256 tokens."""


def num_blocks(num_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    return -(-num_tokens // block_tokens)


def to_bf16_bits(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Round to bf16 (nearest even, as torch does) and return the raw bits as uint16."""
    t = torch.as_tensor(x).to(torch.bfloat16).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bits -> float32: the high half of an fp32 word, so a 16-bit shift."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def pack_kv_blocks(k: np.ndarray, v: np.ndarray,
                   block_tokens: int = BLOCK_TOKENS) -> np.ndarray:
    """``k, v [T, Hkv, d]`` (any float) -> paged bf16 bits ``[nb, Hkv, 2, bt, d]``.

    The tail of the last block is zero-filled: padding is never read as a token.
    """
    if k.shape != v.shape or k.ndim != 3:
        raise ValueError(f"k and v must both be [T, Hkv, d]; got {k.shape} and {v.shape}")
    t, hkv, d = k.shape
    nb = num_blocks(t, block_tokens)
    out = np.zeros((nb, hkv, 2, block_tokens, d), dtype=np.uint16)
    for which, x in enumerate((k, v)):
        padded = np.zeros((nb * block_tokens, hkv, d), dtype=np.float32)
        padded[:t] = x
        out[:, :, which] = to_bf16_bits(padded).reshape(nb, block_tokens, hkv, d).transpose(0, 2, 1, 3)
    return out


def unpack_kv_blocks(blocks: np.ndarray, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_kv_blocks`: ``[nb, Hkv, 2, bt, d]`` bits -> float32 ``k, v [T, Hkv, d]``."""
    nb, hkv, two, bt, d = blocks.shape
    if two != 2 or num_tokens > nb * bt:
        raise ValueError(f"blocks of shape {blocks.shape} cannot hold {num_tokens} tokens")
    f = from_bf16_bits(blocks).transpose(2, 0, 3, 1, 4).reshape(2, nb * bt, hkv, d)
    return f[0, :num_tokens].copy(), f[1, :num_tokens].copy()
