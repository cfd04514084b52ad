"""Builds the private extension ``kvpool._C`` from ``csrc/``.

The C++ core in ``csrc/*.cpp`` is framework-free C++17; only ``csrc/bindings.cpp`` includes pybind11.
Optional CUDA sources (``csrc/cuda/*.cu``) are a later addition and must stay optional: the package
builds, installs and imports on a machine with no GPU and no libcuda, and never links ``-lcuda``.
"""
import sys
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "kvpool._C",
    sorted(glob("csrc/*.cpp")),  # sorted: reproducible builds
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fvisibility=hidden"],
    # dlopen/dlsym (csrc/vmm_cuda.cpp loads libcuda.so.1 at run time): in libc from glibc 2.34, in
    # libdl before it. libcuda itself is never linked.
    libraries=["dl"] if sys.platform.startswith("linux") else [],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
