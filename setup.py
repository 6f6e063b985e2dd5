"""Build hook for the one compiled part: the C prose cleaner z2all/data/_cleanc.c (-> z2all.data._cleanc).
pyproject.toml holds all the metadata. The extension is optional: where it does not compile (no C compiler),
the install goes on and clean.py's Python code, the reference, does the cleaning."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("z2all.data._cleanc", ["z2all/data/_cleanc.c"], optional=True)])
