"""Every kernel source compiles for sm_90, on a machine without a GPU.

Builds exactly what the CuPy loader builds (the same expanded text and ``-D`` options) with
nvcc, so a kernel that does not compile cannot land. Also fails on register spills: a spill
in these memory-bound kernels is a performance bug that no CPU-side test would see.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fluxion_dist.kernels import loader

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (the CUDA toolkit is needed to compile-check kernels)")

CASES = [
    pytest.param(name, dict(config), id=f"{name}-" + "-".join(f"{k}{v}" for k, v in config) if config else name)
    for name, src in loader.SOURCES.items()
    for config in src.check_configs
]


def test_every_cu_file_is_registered():
    on_disk = {p.name for p in loader.KERNEL_DIR.glob("*.cu")}
    registered = {s.file for s in loader.SOURCES.values()}
    assert on_disk == registered, f"unregistered or missing kernel sources: {on_disk ^ registered}"


@pytest.mark.parametrize("name,defines", CASES)
def test_compiles_for_sm90(name: str, defines: dict[str, int], tmp_path: Path):
    src = tmp_path / loader.SOURCES[name].file
    src.write_text(loader.source_text(name))
    cmd = [NVCC, "-arch=sm_90", "--cubin", "-Xptxas", "-v", "-o", str(tmp_path / "out.cubin"),
           *loader.compile_options(name, defines), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{report}"
    for kernel in loader.SOURCES[name].kernels:
        assert kernel in report, f"{kernel} missing from the ptxas report:\n{report}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert not any(spills), f"register spills:\n{report}"
