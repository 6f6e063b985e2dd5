"""Build hook for the compiled parts, both optional (where one does not compile, e.g. no C compiler, the install
goes on and the Python/torch code, the reference, does the work). pyproject.toml holds all the metadata.
  - z2all/data/_cleanc.c  -> z2all.data._cleanc: the prose cleaner's one scan per document (data/clean.py);
  - z2all/model/_decodec.c -> z2all.model._decodec: a decode step's RoPE, cache write and attention in one
    call per layer (model/generate.py FastDecode, attention="c"); -O3 with `omp simd` loops vectorizes it."""

import sys

from setuptools import Extension, setup

simd = [] if sys.platform == "win32" else ["-O3", "-fopenmp-simd", "-Wno-psabi"]
setup(ext_modules=[Extension("z2all.data._cleanc", ["z2all/data/_cleanc.c"], optional=True),
                   Extension("z2all.model._decodec", ["z2all/model/_decodec.c"], optional=True,
                             extra_compile_args=simd)])
