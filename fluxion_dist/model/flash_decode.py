"""Flash decoding (split-K) for one query token per sequence over a dense K/V cache in HBM.

The dense baseline's attention: ``q [B, Hq, d]`` against ``k, v [S, Hkv, L, d]`` (bf16), row
``b`` reading slot ``slots[b]`` up to ``lengths[b]`` tokens. Every (sequence, KV head) is cut
into splits so that the grid fills the GPU even at batch 1 (one program per split walks its
keys in tiles, the GQA group's query rows sharing each K/V tile); the splits' partials are
then merged by log-sum-exp. Only the keys below a row's length are read, and the lengths live
on the device, so a CUDA graph captured once replays for every step as the sequences grow.

Triton (imported on first use): nothing here runs without a CUDA device.
"""

from __future__ import annotations

import functools
import math

import torch

_TILE = 64  # keys per inner iteration
_PER_SM = 4  # programs per SM
_WARPS = 4
_GROUP_ROWS = 16  # the query tile's rows: tl.dot's minimum, the GQA group padded up


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, K, V, Slots, Lens, O, LSE, scale,
                     sq_b, sq_h, sk_s, sk_h, sk_t, so_r, so_s, sl_r,
                     HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                     CHUNK: tl.constexpr, BN: tl.constexpr):
        r = tl.program_id(0)
        s = tl.program_id(1)
        b = r // HKV
        h = r % HKV
        slot = tl.load(Slots + b).to(tl.int64)
        length = tl.load(Lens + b)
        start = s * CHUNK
        end = tl.minimum(start + CHUNK, length)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        gmask = offs_g < G
        q = tl.load(Q + b * sq_b + (h * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                    mask=gmask[:, None], other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        kbase = K + slot * sk_s + h * sk_h
        vbase = V + slot * sk_s + h * sk_h
        for t0 in range(start, end, BN):
            offs_t = t0 + tl.arange(0, BN)
            tmask = offs_t < end
            k = tl.load(kbase + offs_t[:, None].to(tl.int64) * sk_t + offs_d[None, :], mask=tmask[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k)) * scale
            sc = tl.where(tmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(vbase + offs_t[:, None].to(tl.int64) * sk_t + offs_d[None, :], mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        ok = l > 0
        o = tl.where(ok[:, None], acc / tl.where(ok, l, 1.0)[:, None], 0.0)
        lse = tl.where(ok, m + tl.log(tl.where(ok, l, 1.0)), float("-inf"))
        tl.store(O + r * so_r + s * so_s + offs_g[:, None] * D + offs_d[None, :], o, mask=gmask[:, None])
        tl.store(LSE + r * sl_r + s * GP + offs_g, lse, mask=gmask)

    return split_kernel


def num_splits(batch: int, kv_heads: int, max_len: int, sm_count: int, programs_per_sm: int = _PER_SM,
               tile: int = _TILE) -> tuple[int, int]:
    """``(splits, chunk)``: about ``programs_per_sm`` programs per SM over the batch, chunks of whole tiles."""
    want = max(1, (programs_per_sm * sm_count) // max(batch * kv_heads, 1))
    chunk = max(tile * 4, -(-max_len // want))
    chunk = -(-chunk // tile) * tile
    return -(-max_len // chunk), chunk


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 lengths: torch.Tensor, *, programs_per_sm: int = _PER_SM, tile: int = _TILE,
                 num_warps: int = _WARPS, num_stages: int = 3) -> torch.Tensor:
    """``q [B, Hq, d]``, caches ``[S, Hkv, L, d]``, ``slots`` int64 and ``lengths`` int32 ``[B]``
    (on the device) -> ``[B, Hq, d]`` in q's dtype. Capturable: no host reads of the inputs."""
    bsz, hq, d = q.shape
    _, hkv, max_len, dk = k_cache.shape
    if dk != d or hq % hkv or not k_cache.is_contiguous() or k_cache.shape != v_cache.shape:
        raise ValueError(f"flash_decode: q {tuple(q.shape)} against caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)} (contiguous [S, Hkv, L, d] needed)")
    group = hq // hkv
    if group > _GROUP_ROWS:
        raise ValueError(f"flash_decode: GQA group {group} exceeds {_GROUP_ROWS}")
    qc = q.to(k_cache.dtype).contiguous()
    sm = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits, chunk = num_splits(bsz, hkv, max_len, sm, programs_per_sm, tile)
    rows = bsz * hkv
    o = torch.empty((rows, splits, _GROUP_ROWS, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((rows, splits, _GROUP_ROWS), dtype=torch.float32, device=q.device)
    _kernel()[(rows, splits)](
        qc, k_cache, v_cache, slots, lengths, o, lse, 1.0 / math.sqrt(d),
        qc.stride(0), qc.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        o.stride(0), o.stride(1), lse.stride(0),
        HKV=hkv, G=group, GP=_GROUP_ROWS, D=d, CHUNK=chunk, BN=tile, num_warps=num_warps, num_stages=num_stages)
    o, lse = o[:, :, :group], lse[:, :, :group]
    top = lse.amax(dim=1, keepdim=True)
    w = torch.exp(lse - top)  # every row has at least one key: top is finite
    out = (o * w[..., None]).sum(1) / w.sum(1)[..., None]
    return out.view(bsz, hq, d).to(q.dtype)
