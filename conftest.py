"""Shared by tests/ and benchmarks/ (pytest loads this before either suite's conftest).

On a machine without a GPU the Triton kernels run under Triton's CPU interpreter, so no kernel
test is skipped there and the benchmarks' untimed smoke run calls every Triton provider once.
TRITON_INTERPRET=1 must be set before triton is first imported, hence here, first.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_problem():
    """``None`` when Triton's interpreter runs a loop with a runtime bound, else what went wrong.

    Triton 3.6's interpreter cannot do so with NumPy 2.4 or newer: every kernel test would then
    fail with "only 0-dimensional arrays can be converted to Python scalars" and no hint why.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None  # the Triton tests say so themselves

    @triton.jit
    def runtime_loop_bound(out_ptr, n):
        total = tl.zeros((1,), dtype=tl.int32)
        for _ in range(0, n):
            total += 1
        tl.store(out_ptr + tl.arange(0, 1), total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        runtime_loop_bound[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any failure here is reported below
        return f"{type(exc).__name__}: {exc}"
    return None if int(out) == 3 else f"a loop of 3 iterations counted {int(out)}"


def pytest_sessionstart(session):
    problem = _interpreter_problem()
    if problem is not None:
        import numpy
        import triton

        pytest.exit(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) does not run the "
            f"kernels with NumPy {numpy.__version__}: {problem}. Install NumPy < 2.4 "
            "(pip install 'numpy<2.4') or a newer Triton (3.9 runs with NumPy 2.4).",
            returncode=4,
        )
