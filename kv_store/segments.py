"""Message boundaries of one layer on the wire.

A UCX message lands in one contiguous buffer, and so must leave from one: a message
can only cover pages that are contiguous in the sending store *and* in the receiving
one. The segments are the stretches between the union of both stores' run boundaries;
with both layers allocated as one run (the usual case) a layer is one segment.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Sequence


def split_segments(ours: Sequence[int], theirs: Sequence[int]) -> list[int]:
    """Run lengths (pages) on both sides -> segment lengths, in logical order."""
    if sum(ours) != sum(theirs):
        raise ValueError(f"runs cover {sum(ours)} and {sum(theirs)} pages: not the same layer")
    cuts = sorted(set(accumulate(ours)) | set(accumulate(theirs)))
    return [b - a for a, b in zip([0, *cuts[:-1]], cuts)]
