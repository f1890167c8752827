"""Shared by tests/ and benchmarks/ (pytest loads this before either suite's conftest).

On a machine without a GPU the Triton kernels run under Triton's CPU interpreter, so no kernel
test is skipped there and the benchmarks' untimed smoke run calls every Triton provider once.
TRITON_INTERPRET=1 must be set before triton is first imported, hence here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
