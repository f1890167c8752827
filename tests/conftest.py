"""Test configuration shared by every test module.

- On a machine without a GPU the Triton kernels run under Triton's CPU interpreter (set in the
  project root's conftest.py, before triton is imported), so kernel tests run there too; only
  the bfloat16 error checks wait for a GPU (see low_precision_dtypes).
- Hypothesis: a small derandomized "ci" profile (the default) and a larger "dev" profile
  (HYPOTHESIS_PROFILE=dev).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def devices():
    """Devices every op test sweeps: the CPU always, CUDA where present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def triton_device():
    """Where Triton kernels run in tests: the GPU if present, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def low_precision_dtypes():
    """The half dtypes a kernel test sweeps: float16 wherever Triton runs (the interpreter casts to
    it as the GPU does, rounding to nearest even) and bfloat16 on CUDA only, skipped on the CPU
    because the interpreter casts float32 to bfloat16 by truncation (toward zero), so its bf16
    error would be the interpreter's, not the kernel's."""
    return [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="Triton's interpreter rounds float32 to bfloat16 toward zero (the GPU rounds to nearest "
               "even): bfloat16 kernel error is checked on CUDA only"))]


def saved_storages(run):
    """Run ``run()`` and return ({data_ptr: nbytes} of every storage autograd saved for the
    backward while it built its graph, run's result)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return saved, out


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): the models of the training tests are tiny,
    and two threads that mostly synchronise on a shared CPU are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield

