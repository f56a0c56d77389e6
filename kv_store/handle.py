"""A stored request's handle: where its pages are, layer by layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kv_store.allocator import PageRun


def _block_table(runs: tuple[PageRun, ...]) -> np.ndarray:
    table = np.concatenate([np.arange(r.start, r.stop, dtype=np.int32) for r in runs])
    table.flags.writeable = False
    return table


@dataclass(frozen=True, slots=True)
class KVHandle:
    """Pages of one request. ``block_table(l)[j]`` is the page of logical block ``j`` of layer
    ``l`` (vLLM's convention, as the kernels take it); ``runs[l]`` are the same pages as
    contiguous extents, in logical order, which is how the transport moves them."""

    request_id: str
    num_tokens: int
    runs: tuple[tuple[PageRun, ...], ...]
    block_tables: tuple[np.ndarray, ...]

    @classmethod
    def build(cls, request_id: str, num_tokens: int,
              runs: list[list[PageRun]]) -> "KVHandle":
        frozen = tuple(tuple(r) for r in runs)
        return cls(request_id, num_tokens, frozen, tuple(_block_table(r) for r in frozen))

    @property
    def num_layers(self) -> int:
        return len(self.runs)

    @property
    def num_blocks(self) -> int:
        """Pages per layer."""
        return int(self.block_tables[0].shape[0])

    @property
    def num_pages(self) -> int:
        return self.num_layers * self.num_blocks

    def block_table(self, layer: int) -> np.ndarray:
        """``int32 [num_blocks]``, read-only."""
        return self.block_tables[layer]

    def run_lengths(self, layer: int) -> list[int]:
        return [r.length for r in self.runs[layer]]
