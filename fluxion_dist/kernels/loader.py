"""Kernel sources and how they are compiled.

Every ``.cu`` file beside this module is listed in :data:`SOURCES` with the kernels it
defines and the ``-D`` constants it needs. The CuPy loader and the CPU-only compile check
(``tests/test_kernels_compile.py``) both build from :func:`source_text` and
:func:`compile_options`, so what CI compiles with nvcc is byte for byte what NVRTC compiles
on the GPU machine.

``#include "x.cuh"`` lines are expanded here rather than left to ``-I``: CuPy caches
compiled modules on disk keyed by the source text and options, so a header edit that does
not change the text would otherwise reuse a stale binary.

Nothing here imports CuPy at module level: the compile check runs where CuPy is absent.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from fluxion_dist.attention.layout import BLOCK_TOKENS

if TYPE_CHECKING:
    import cupy

KERNEL_DIR = Path(__file__).resolve().parent

BASE_OPTIONS = ("--std=c++17",)
"""Options common to NVRTC and nvcc; each source adds its ``-D`` constants."""

_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cuh)"\s*$', re.MULTILINE)


@dataclass(frozen=True, slots=True)
class KernelSource:
    file: str
    """File name inside :data:`KERNEL_DIR`."""
    kernels: tuple[str, ...]
    """``__global__`` functions it defines (C++ names, passed as name expressions)."""
    defines: tuple[str, ...]
    """``-D`` constants it needs besides BLOCK_TOKENS, which every source gets."""
    check_configs: tuple[tuple[tuple[str, int], ...], ...]
    """Representative ``-D`` values the compile check builds."""


_DIM_GROUP_CHECKS = (
    (("HEAD_DIM", 128), ("GROUP", 1)),
    (("HEAD_DIM", 128), ("GROUP", 4)),
    (("HEAD_DIM", 128), ("GROUP", 8)),
    (("HEAD_DIM", 64), ("GROUP", 4)),
)
_DIM_CHECKS = ((("HEAD_DIM", 128),), (("HEAD_DIM", 64),))

SOURCES: dict[str, KernelSource] = {
    "scoring": KernelSource("scoring.cu", ("quest_scores", "quest_scores_compact"), ("HEAD_DIM", "GROUP"),
                            _DIM_GROUP_CHECKS),
    "selection": KernelSource("selection.cu", ("select_blocks",), ("SELECT_THREADS", "BY_MASS"),
                              tuple((("BY_MASS", m), ("SELECT_THREADS", t)) for t, m in
                                    ((256, 0), (512, 1), (1024, 0), (1024, 1)))),
    "attention": KernelSource("attention.cu", ("sparse_attention_chunks",), ("HEAD_DIM", "GROUP"),
                              _DIM_GROUP_CHECKS),
    "merge": KernelSource("merge.cu", ("merge_partials",), ("HEAD_DIM",), _DIM_CHECKS),
    "append": KernelSource("append.cu", ("append_kv",), ("HEAD_DIM",), _DIM_CHECKS),
    "block_table": KernelSource("block_table.cu", ("force_blocks", "classify_entries", "admit_blocks", "advance_ring"), (), ((),)),
    "staging": KernelSource("staging.cu", ("stage_inputs", "stage_output"), (), ((),)),
    "rescore": KernelSource("rescore.cu", ("candidate_lse", "candidate_scores"), ("HEAD_DIM", "GROUP"),
                            _DIM_GROUP_CHECKS),
    "compact_metadata": KernelSource("compact_metadata.cu", ("quantize_metadata",), ("HEAD_DIM",), _DIM_CHECKS),
}


def source_text(name: str) -> str:
    """The source of ``SOURCES[name]`` with its local headers expanded (one level)."""
    text = (KERNEL_DIR / SOURCES[name].file).read_text()
    return _INCLUDE.sub(lambda m: (KERNEL_DIR / m.group(1)).read_text(), text)


def compile_options(name: str, defines: Mapping[str, int]) -> tuple[str, ...]:
    """NVRTC/nvcc options for ``SOURCES[name]`` built with ``defines``.

    Raises ValueError naming the missing or unexpected constants.
    """
    want = set(SOURCES[name].defines)
    got = set(defines)
    if got != want:
        raise ValueError(f"{SOURCES[name].file} needs -D {sorted(want)}; got {sorted(got)}")
    values = {"BLOCK_TOKENS": BLOCK_TOKENS, **defines}
    return BASE_OPTIONS + tuple(f"-D{k}={int(v)}" for k, v in sorted(values.items()))


@functools.cache
def _module(name: str, defines: tuple[tuple[str, int], ...]) -> "cupy.RawModule":
    import cupy

    return cupy.RawModule(
        code=source_text(name),
        options=compile_options(name, dict(defines)),
        name_expressions=list(SOURCES[name].kernels),
    )


def get_kernel(name: str, kernel: str, **defines: int) -> "cupy.RawKernel":
    """The compiled kernel ``kernel`` of source ``name``; compiled once per ``defines``."""
    if kernel not in SOURCES[name].kernels:
        raise ValueError(f"{SOURCES[name].file} defines {SOURCES[name].kernels}, not {kernel!r}")
    return _kernel(name, kernel, tuple(sorted(defines.items())))


@functools.cache
def _kernel(name: str, kernel: str, defines: tuple[tuple[str, int], ...]) -> "cupy.RawKernel":
    # get_function builds a new RawKernel each call; launchers sit on the decode hot path.
    return _module(name, defines).get_function(kernel)
