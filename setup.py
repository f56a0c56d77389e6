"""Build hook for the CPU path's Cython extensions; all metadata lives in setup.cfg."""

from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# Float reductions only vectorise when gcc may reassociate them.
COMPILE_ARGS = ["-O3", "-fopenmp", "-fassociative-math", "-fno-trapping-math", "-fno-signed-zeros"]
LINK_ARGS = ["-fopenmp"]


def extensions() -> list[Extension]:
    return [
        Extension(
            "fluxion_dist.cpu." + pyx.stem,
            [str(pyx)],
            include_dirs=[np.get_include()],
            extra_compile_args=COMPILE_ARGS,
            extra_link_args=LINK_ARGS,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for pyx in sorted(Path("fluxion_dist/cpu").glob("*.pyx"))
    ]


setup(ext_modules=cythonize(extensions(), language_level=3))
