"""Shared pytest setup: without CUDA, Triton kernels run under Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is imported (``@triton.jit`` reads it when a
kernel module loads), hence here, before any test module imports a kernel.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/kernels_util.py, shared by the kernel tests
