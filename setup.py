"""Build hook for the CPU path's Cython extensions; all metadata lives in setup.cfg."""

from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# Float reductions only vectorise when gcc may reassociate them. No -mavx2 here: the AVX2+FMA
# kernels are compiled under `#pragma GCC target` and picked at run time (bf16_simd.h), so one
# build runs on any x86-64 CPU (the portable body elsewhere) and never faults on an older one.
# -fno-wrapv undoes the -fwrapv in Python's own CFLAGS: wrapping int arithmetic keeps gcc from
# widening the kernels' index arithmetic and cost 20% of the attention kernel's speed.
COMPILE_ARGS = ["-O3", "-fno-wrapv", "-fopenmp", "-fassociative-math", "-fno-trapping-math",
                "-fno-signed-zeros"]
LINK_ARGS = ["-fopenmp"]
CPU_DIR = Path("fluxion_dist/cpu")
HEADERS = [str(h) for h in sorted(CPU_DIR.glob("*.h"))]  # rebuild when a kernel header changes


def extensions() -> list[Extension]:
    return [
        Extension(
            "fluxion_dist.cpu." + pyx.stem,
            [str(pyx)],
            include_dirs=[np.get_include()],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            depends=HEADERS,
        )
        for pyx in sorted(CPU_DIR.glob("*.pyx"))
    ]


setup(ext_modules=cythonize(extensions(), language_level=3))
