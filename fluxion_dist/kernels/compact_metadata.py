"""A reduced-precision mirror of the Quest block metadata: int8 boxes, rounded outward.

The bf16 metadata is, per (page, KV head), the channel-wise min and max of K:
``4 * d`` bytes. The mirror keeps, per (page, head), one positive scale ``s`` (bf16) and the box
corners as int8 multiples of it,
the min rounded down and the max rounded up, so the mirror's box contains the
bf16 box: ``q_lo * s <= min`` and ``q_hi * s >= max`` channel by channel. A
Quest bound over a containing box is at least the bound over the box (for
every q, ``max(q*a, q*b)`` over the wider interval is no smaller), so a block
scored from the mirror never scores below any of its tokens: the mirror is a
valid, looser, upper bound. ``2 * d + 2`` bytes per (page, head).

Exactness: ``s`` has an 8-bit significand and ``|q| <= 127`` a 7-bit one, so
``q * s`` is exact in float32 (above float32's subnormal floor, since bf16 has
float32's exponent range), and the kernel's dequantisation is the reference's,
bit for bit. ``s`` is the smallest bf16 with ``127 * s >= max |corner|``, and at least
float32's least normal (2^-126).

Subnormals: CuPy compiles every kernel with ``-ftz=true``, which flushes subnormal inputs of
float arithmetic and comparisons to zero, so the kernel could not round a subnormal corner
outward (nor dequantise with a subnormal scale). A subnormal corner is therefore first moved
outward to the nearest value that is zero or normal (a min to -2^-126 or 0, a max to 2^-126
or 0), here and in the kernel alike, and the scale never goes below 2^-126.

Layout (what the scoring kernel reads with one 16-byte load per lane):
``values int8 [P, Hkv, d/8, 2, 8]`` stored as ``[P, Hkv, 2*d]``: for each
8-channel group, the 8 rounded-down minima then the 8 rounded-up maxima; and
``scales uint16 [P, Hkv]`` (bf16 bits). ``quantize`` / ``dequantize`` are NumPy (this
module imports without CuPy); ``quantize_pages`` rebuilds chosen pages' rows on the GPU
(compact_metadata.cu), bit for bit as ``quantize``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from fluxion_dist.attention.layout import from_bf16_bits

if TYPE_CHECKING:
    import cupy

QMAX = 127
"""Largest |int8| used: the range is symmetric so a negated box stays representable."""

MAX_MAGNITUDE = 2.0 ** 127
"""Largest |corner| mirrored: 127 * s stays finite in float32 below it (a corner at inf would
make the kernel's (max + min) / 2 NaN). Real K metadata is many orders of magnitude below."""

GROUP = 8
"""Channels per interleaved group: one lane of the scoring kernel."""


class CompactMetadata(NamedTuple):
    values: np.ndarray  # int8 [P, Hkv, 2*d]: per 8-channel group, 8 minima then 8 maxima
    scales: np.ndarray  # uint16 [P, Hkv]: bf16 bits of the positive per-(page, head) scale


def nbytes_per_row(head_dim: int) -> tuple[int, int]:
    """(bf16 metadata bytes, mirror bytes) of one (page, head)."""
    return 4 * head_dim, 2 * head_dim + 2


def _bits(kmin: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(kmin, np.ndarray) or kmin.dtype != np.uint16 or kmin.ndim != 3:
        raise TypeError(f"{name} must be a uint16 (bf16 bits) numpy array [P, Hkv, d]; got "
                        f"{getattr(kmin, 'dtype', type(kmin).__name__)} {getattr(kmin, 'shape', '')}")
    return kmin


LEAST_NORMAL = 2.0 ** -126
"""Float32's least normal: the least scale, and where subnormal corners move (see above)."""

_LEAST_NORMAL_BITS = 0x0080


def _outward_of_subnormals(x: np.ndarray, up: bool) -> np.ndarray:
    """Subnormal ``x`` moved outward (``up``: towards +inf) to 0 or +-2^-126; others kept."""
    sub = (x != 0) & (np.abs(x) < LEAST_NORMAL)
    if not sub.any():
        return x
    out = np.where(x > 0, LEAST_NORMAL, 0.0) if up else np.where(x < 0, -LEAST_NORMAL, 0.0)
    return np.where(sub, out, x)


def _scale_bits(amax: np.ndarray) -> np.ndarray:
    """The smallest bf16 s >= 2^-126 with 127 * s >= amax (exactly), as bits."""
    f = (amax.astype(np.float64) / QMAX).astype(np.float32)
    f = np.where(f.astype(np.float64) * QMAX < amax, np.nextafter(f, np.float32(np.inf)), f)
    u = f.view(np.uint32)
    bits = (u >> 16) + ((u & 0xFFFF) != 0)  # round the float32 up to bf16 (positive: bits up)
    bits = np.maximum(bits, _LEAST_NORMAL_BITS).astype(np.uint32)  # never subnormal (see the module doc)
    for _ in range(4):  # the roundings above leave at most a step to take; never loops on
        short = from_bf16_bits(bits.astype(np.uint16)).astype(np.float64) * QMAX < amax
        if not short.any():
            break
        bits = bits + short
    return bits.astype(np.uint16)


def quantize(kmin: np.ndarray, kmax: np.ndarray) -> CompactMetadata:
    """The mirror of bf16-bit metadata ``kmin, kmax [P, Hkv, d]`` (d a multiple of 8).

    Raises ValueError for a corner that is NaN, infinite or beyond MAX_MAGNITUDE, or a box
    whose min exceeds its max."""
    _bits(kmin, "kmin")
    _bits(kmax, "kmax")
    if kmax.shape != kmin.shape:
        raise ValueError(f"kmax must have kmin's shape {kmin.shape}; got {kmax.shape}")
    p, hkv, d = kmin.shape
    if d % GROUP:
        raise ValueError(f"head_dim must be a multiple of {GROUP}; got {d}")
    lo = from_bf16_bits(kmin).reshape(kmin.shape).astype(np.float64)
    hi = from_bf16_bits(kmax).reshape(kmax.shape).astype(np.float64)
    for name, x in (("kmin", lo), ("kmax", hi)):
        bad = ~(np.abs(x) <= MAX_MAGNITUDE)  # NaN too
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name}{list(at)} = {x[at]} cannot be mirrored (finite, |x| <= 2^127)")
    if (lo > hi).any():
        at = tuple(int(i) for i in np.argwhere(lo > hi)[0])
        raise ValueError(f"kmin{list(at)} = {lo[at]} exceeds kmax = {hi[at]}")
    lo, hi = _outward_of_subnormals(lo, up=False), _outward_of_subnormals(hi, up=True)
    amax = np.maximum(np.abs(lo), np.abs(hi)).max(axis=-1, initial=0.0)
    scales = _scale_bits(amax)
    s = from_bf16_bits(scales).reshape(scales.shape).astype(np.float64)[..., None]
    # Both products are exact in float64 (7- and 8-bit significands), so the fix-ups below
    # make the rounding direction exact whatever the division rounded to.
    qlo = np.floor(lo / s)
    qlo -= qlo * s > lo
    qhi = np.ceil(hi / s)
    qhi += qhi * s < hi
    values = np.empty((p, hkv, d // GROUP, 2, GROUP), np.int8)
    values[..., 0, :] = qlo.reshape(p, hkv, d // GROUP, GROUP)
    values[..., 1, :] = qhi.reshape(p, hkv, d // GROUP, GROUP)
    return CompactMetadata(values.reshape(p, hkv, 2 * d), scales)


def dequantize(meta: CompactMetadata) -> tuple[np.ndarray, np.ndarray]:
    """The mirror's boxes as float32 ``lo, hi [P, Hkv, d]``: exactly what the kernel computes."""
    values, scales = meta
    p, hkv, two_d = values.shape
    d = two_d // 2
    s = from_bf16_bits(scales).reshape(p, hkv)[..., None, None, None]
    v = values.reshape(p, hkv, d // GROUP, 2, GROUP).astype(np.float32) * s
    return v[..., 0, :].reshape(p, hkv, d), v[..., 1, :].reshape(p, hkv, d)


def outward_bf16(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 boxes -> bf16 bits ``kmin, kmax`` of the smallest bf16 box containing each (the
    min rounded down, the max rounded up). Finite inputs below bf16's largest value."""
    out = []
    for x, up in ((np.asarray(lo, np.float32), False), (np.asarray(hi, np.float32), True)):
        bits = x.view(np.uint32)
        kept = (bits >> 16).astype(np.uint16)
        inexact = (bits & 0xFFFF) != 0
        # truncation moves toward zero: away from it is one more in magnitude, the same sign
        away = inexact & ((x > 0) if up else (x < 0))
        out.append(kept + away.astype(np.uint16))
    return out[0], out[1]


def mirror_boxes(kmin: np.ndarray, kmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16-bit boxes containing the mirror's (``quantize`` then ``dequantize``, rounded outward
    to bf16): what a bf16 scorer (the CPU path, the quality harness) reads to select as the
    mirror would, up to one more bf16 step outward."""
    return outward_bf16(*dequantize(quantize(kmin, kmax)))


_WARPS = 4  # QUANT_WARPS in compact_metadata.cu


def quantize_pages(kmin: "cupy.ndarray", kmax: "cupy.ndarray", pages: "cupy.ndarray", values: "cupy.ndarray",
                   scales: "cupy.ndarray") -> None:
    """Rebuild, on the GPU, the mirror rows of ``pages`` (int32 [n]) from the bf16 metadata
    ``kmin, kmax [P, Hkv, d]`` into ``values`` int8 [P, Hkv, 2*d] and ``scales`` bf16 bits
    [P, Hkv], in place and asynchronously: after a prefill loads pages, or after an append
    widens a page's box. Pages must lie in [0, P) and their corners be finite with
    |x| <= MAX_MAGNITUDE (``quantize`` checks that on the host; reading device memory here
    would cost a round trip, so the kernel trusts it)."""
    from fluxion_dist.kernels import loader
    from fluxion_dist.kernels.checks import BF16_BITS, expect

    expect("kmin", kmin, BF16_BITS, (None, None, None))
    p, hkv, d = kmin.shape
    if d % GROUP:
        raise ValueError(f"head_dim must be a multiple of {GROUP}; got {d}")
    expect("kmax", kmax, BF16_BITS, (p, hkv, d))
    expect("pages", pages, np.int32, (None,))
    expect("values", values, np.int8, (p, hkv, 2 * d))
    expect("scales", scales, BF16_BITS, (p, hkv))
    n = pages.shape[0]
    if n == 0:
        return
    kernel = loader.get_kernel("compact_metadata", "quantize_metadata", HEAD_DIM=d)
    kernel((-(-n * hkv // _WARPS),), (_WARPS * 32,),
           (kmin, kmax, pages, np.int32(n), np.int32(hkv), values, scales))
