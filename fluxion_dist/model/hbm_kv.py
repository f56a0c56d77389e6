"""The dense all-HBM decode baseline: every sequence's whole KV cache on the model's device and
full attention over it (flash decoding on a GPU), the ``attend`` hook a dense engine such as
vLLM's runs, which the hybrid operator over host KV is measured against.

Its state is static device tensors (per layer ``[slots, Hkv, max_len + 1, d]``, each batch
row's slot and write column, the runner's positions), so the whole decode step captures as one
CUDA graph: the new token's K/V land at ``[slot, :, position]`` and attention reads
``position + 1`` keys. Padded rows of a captured batch (position 0, per the runner) write slot
0's spare last column, which no real row reads: one column per slot instead of a whole
scratch slot, which at 128k would cost as much HBM as a request.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fluxion_dist.model.arch import ModelArch


class DenseHBMKV:
    capturable = True  # the decode runner may replay steps over it as CUDA graphs

    def __init__(self, arch: ModelArch, num_slots: int, max_len: int, device: torch.device | str,
                 max_batch_size: int, dtype: torch.dtype = torch.bfloat16) -> None:
        if num_slots < 1 or max_len < 1 or max_batch_size < 1:
            raise ValueError(f"DenseHBMKV: num_slots, max_len and max_batch_size must be >= 1; got "
                             f"{num_slots}, {max_len}, {max_batch_size}")
        self.arch, self.num_slots, self.max_len = arch, num_slots, max_len
        self.device = torch.device(device)
        shape = (num_slots, arch.num_key_value_heads, max_len + 1, arch.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(arch.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(arch.num_hidden_layers)]
        self.row_slot = torch.zeros((max_batch_size,), dtype=torch.long, device=self.device)
        self.row_padded = torch.ones((max_batch_size,), dtype=torch.bool, device=self.device)
        pin = self.device.type == "cuda"
        self._slots_h = torch.empty(max_batch_size, dtype=torch.long, pin_memory=pin)
        self._padded_h = torch.empty(max_batch_size, dtype=torch.bool, pin_memory=pin)
        self._positions: torch.Tensor | None = None
        self._rows: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def adopt(self, slot: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """A prompt's per-layer K/V ``[T, Hkv, d]`` (post-RoPE) into ``slot``."""
        self._check_slot(slot)
        t = keys[0].shape[0]
        if t > self.max_len:
            raise ValueError(f"DenseHBMKV: a {t}-token prompt exceeds max_len {self.max_len}")
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.k[layer][slot, :, :t] = k.transpose(0, 1).to(self.device, self.k[layer].dtype)
            self.v[layer][slot, :, :t] = v.transpose(0, 1).to(self.device, self.v[layer].dtype)

    def set_rows(self, slots: Sequence[int]) -> None:
        """The step's batch rows -> their slots (rows past ``len(slots)`` are padding)."""
        rows = tuple(int(s) for s in slots)
        if rows == self._rows:
            return
        for s in rows:
            self._check_slot(s)
        n, self._rows = len(rows), rows
        self._slots_h[:n] = torch.as_tensor(rows, dtype=torch.long)
        self._slots_h[n:] = 0
        self._padded_h[:n], self._padded_h[n:] = False, True
        self.row_slot.copy_(self._slots_h, non_blocking=True)
        self.row_padded.copy_(self._padded_h, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the pinned staging is rewritten next step

    def bind(self, positions: torch.Tensor) -> None:
        """The runner's positions ``[B]`` (device): each row's new token goes there, and attends
        ``positions + 1`` keys."""
        self._positions = positions

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bsz = q.shape[0]
        if self._positions is None or self._positions.shape[0] != bsz:
            raise ValueError(f"DenseHBMKV: bind the step's positions for {bsz} rows first")
        pos, slots = self._positions, self.row_slot[:bsz]
        kc, vc = self.k[layer], self.v[layer]
        col = torch.where(self.row_padded[:bsz], self.max_len, pos)
        kc[slots, :, col] = k.to(kc.dtype)
        vc[slots, :, col] = v.to(vc.dtype)
        if q.is_cuda:
            from fluxion_dist.model.flash_decode import flash_decode

            return flash_decode(q, kc, vc, slots, (pos + 1).to(torch.int32))
        outs = []
        for b, (s, p) in enumerate(zip(slots.tolist(), pos.tolist())):
            o = F.scaled_dot_product_attention(q[b][None, :, None], kc[s, :, :p + 1][None].to(q.dtype),
                                               vc[s, :, :p + 1][None].to(q.dtype), enable_gqa=True)
            outs.append(o[0, :, 0])
        return torch.stack(outs)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"DenseHBMKV: slot {slot} is outside [0, {self.num_slots})")
