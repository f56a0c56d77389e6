"""Shared by the CPU-path tests: the kernel bodies this CPU can run, each skipped with its reason."""

import pytest

from fluxion_dist.cpu import _attention

ISAS = ["scalar",
        pytest.param("avx2", marks=pytest.mark.skipif(
            _attention.cpu_isa() == "scalar", reason="this CPU has no AVX2+FMA")),
        pytest.param("avx512", marks=pytest.mark.skipif(
            _attention.cpu_isa() != "avx512", reason="this CPU has no AVX-512F"))]
