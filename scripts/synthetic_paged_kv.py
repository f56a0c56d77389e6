"""The end-to-end benchmark's host KV: the decode engine's ``PagedKV`` over a synthetic arena of
random bf16 K/V with each page's exact Quest min/max, page-locked on a GPU machine."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxion_dist.attention.layout import BLOCK_TOKENS, num_blocks  # noqa: E402
from fluxion_dist.cpu.synthetic_arena import page_aligned  # noqa: E402
from fluxion_dist.model.arch import ModelArch  # noqa: E402


class BenchPages:
    """The engine's ``PagedKV`` over a synthetic arena: request ``b`` owns pages
    ``[(b * L + layer) * nb, ... + nb)`` per layer (prompt and the decode steps' blocks)."""

    def __init__(self, arch: ModelArch, batch: int, prompt_len: int, extra_tokens: int, gpu: bool) -> None:
        L, hkv, d = arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim
        self.nb = num_blocks(prompt_len + extra_tokens)
        pages = batch * L * self.nb
        self.pages = page_aligned(pages * hkv * 2 * BLOCK_TOKENS * d, np.uint16).reshape(pages, hkv, 2, BLOCK_TOKENS, d)
        self.kmin = np.empty((pages, hkv, d), np.uint16)
        self.kmax = np.empty((pages, hkv, d), np.uint16)
        self.prompt_len, self.L = prompt_len, L
        t0 = time.perf_counter()
        _fill(self.pages, self.kmin, self.kmax, gpu)
        self.fill_s = time.perf_counter() - t0
        self._tables = {f"r{b}": [list(range((b * L + i) * self.nb, (b * L + i + 1) * self.nb)) for i in range(L)]
                        for b in range(batch)}

    def block_tables(self, request_id: str) -> list[list[int]]:
        return self._tables[request_id]

    def ensure_tokens(self, request_id: str, num_tokens: int) -> None:
        if num_tokens > self.nb * BLOCK_TOKENS:
            raise RuntimeError(f"{request_id}: {num_tokens} tokens exceed the {self.nb} blocks sized for the run")


def _fill(pages: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, gpu: bool, chunk: int = 2048) -> None:
    """Random bf16 K/V (N(0, 1)), and each page's exact per-(head, dim) min/max of its K."""
    host = torch.from_numpy(pages.view(np.int16))
    lo, hi = torch.from_numpy(kmin.view(np.int16)), torch.from_numpy(kmax.view(np.int16))
    if gpu:  # generated on the device, copied down: a pinned arena fills at PCIe speed
        from fluxion_dist.kernels.uva import map_host_array
        map_host_array(pages)  # page-locks it (the operator's pipeline finds it locked)
    gen = torch.Generator(device="cuda" if gpu else "cpu").manual_seed(0)
    for s in range(0, pages.shape[0], chunk):
        n = min(chunk, pages.shape[0] - s)
        x = torch.randn((n, *pages.shape[1:]), generator=gen, device=gen.device).to(torch.bfloat16)
        k = x[:, :, 0]
        lo[s:s + n].copy_(k.amin(dim=2).view(torch.int16))
        hi[s:s + n].copy_(k.amax(dim=2).view(torch.int16))
        host[s:s + n].copy_(x.view(torch.int16))
