"""Backend choice for the fused ops.

Each op declares, per backend, a capability check that returns ``None`` when the backend can
run these inputs and otherwise a short reason. The choice order is: an explicit ``backend=``
argument, then the ``DMIL_FAST_BACKEND`` environment variable, then the first backend in the
op's preference order for the inputs' device whose check passes. When nothing fits, the error
lists every backend with its reason (in the spirit of xformers' ``not_supported_reasons``).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

BACKENDS = ("reference", "triton", "cpp", "cuda")
ENV_VAR = "DMIL_FAST_BACKEND"

# Preference order when nothing is asked for. Triton on CPU runs only under its (slow)
# interpreter, so it comes last there; on GPUs the hand-written CUDA kernels come first.
CUDA_ORDER = ("cuda", "triton", "reference")
CPU_ORDER = ("cpp", "reference", "triton")


class BackendUnavailableError(RuntimeError):
    """Raised when no backend, or not the one asked for, can run the given inputs."""


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend asked for: ``backend`` when given, else ``DMIL_FAST_BACKEND`` (unset or empty: None)."""
    return backend if backend is not None else os.environ.get(ENV_VAR) or None


@functools.lru_cache(maxsize=None)
def extension_status() -> Optional[str]:
    """``None`` when ``dmil_fast._C`` imports, else the reason it does not."""
    try:
        importlib.import_module("dmil_fast._C")
    except Exception as exc:  # ImportError, OSError from a missing shared library, ...
        return f"the C++ extension dmil_fast._C is not importable ({type(exc).__name__}: {exc})"
    return None


def extension_built_with_cuda() -> bool:
    if extension_status() is not None:
        return False
    return bool(importlib.import_module("dmil_fast._C").built_with_cuda())


@functools.lru_cache(maxsize=None)
def triton_status() -> Optional[str]:
    """``None`` when Triton imports, else the reason it does not."""
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_device_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on ``device`` (``None`` if it can)."""
    reason = triton_status()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    return f"tensors are on {device.type}, Triton here supports cuda (or cpu with TRITON_INTERPRET=1)"


def cpp_device_reason(op_name: str, device: torch.device, *, has_cpp: bool) -> Optional[str]:
    if not has_cpp:
        return f"{op_name} has no C++ kernel"
    reason = extension_status()
    if reason is not None:
        return reason
    if device.type != "cpu":
        return f"the cpp backend runs CPU tensors, these are on {device.type}"
    return None


def cuda_device_reason(op_name: str, device: torch.device, *, has_cuda: bool) -> Optional[str]:
    if not has_cuda:
        return f"{op_name} has no CUDA kernel (its GPU path is the Triton kernel)"
    reason = extension_status()
    if reason is not None:
        return reason
    if not extension_built_with_cuda():
        return "dmil_fast._C was built without CUDA (needs a CUDA build of torch and nvcc at build time)"
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors, these are on {device.type}"
    return None


@dataclass
class OpBackends:
    """The backends of one op: for each, a check ``(device, dtype) -> reason or None``."""

    name: str
    checks: Dict[str, Callable[[torch.device, torch.dtype], Optional[str]]] = field(default_factory=dict)

    def reasons(self, device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[str]]:
        return {b: self.checks[b](device, dtype) for b in BACKENDS}

    def choose(self, backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
        requested = requested_backend(backend)
        if requested is not None and requested not in BACKENDS:
            source = "backend" if backend is not None else ENV_VAR
            raise ValueError(f"{source} must be one of {BACKENDS} or None, got {requested!r}")
        if requested is not None:
            reason = self.checks[requested](device, dtype)
            if reason is None:
                return requested
            raise BackendUnavailableError(
                f"{self.name}: backend {requested!r} cannot run {dtype} tensors on {device}: {reason}.\n"
                + self._table(device, dtype)
            )
        order = CUDA_ORDER if device.type == "cuda" else CPU_ORDER
        for name in order:
            if self.checks[name](device, dtype) is None:
                return name
        raise BackendUnavailableError(
            f"{self.name}: no backend can run {dtype} tensors on {device}.\n" + self._table(device, dtype)
        )

    def _table(self, device: torch.device, dtype: torch.dtype) -> str:
        lines = []
        for name, reason in self.reasons(device, dtype).items():
            lines.append(f"  {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
        return "\n".join(lines)


def dtype_reason(dtype: torch.dtype, device: torch.device, allowed_cpu: Sequence[torch.dtype],
                 allowed_cuda: Sequence[torch.dtype]) -> Optional[str]:
    allowed = allowed_cuda if device.type == "cuda" else allowed_cpu
    if dtype in allowed:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in allowed)
    return f"dtype {str(dtype).replace('torch.', '')} is not supported on {device.type} (supported: {names})"


_REGISTRY: Dict[str, OpBackends] = {}


def register(op: OpBackends) -> OpBackends:
    _REGISTRY[op.name] = op
    return op


def registered_ops() -> List[OpBackends]:
    return list(_REGISTRY.values())


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo here.

    The public decorator imports torch._dynamo (about 2 s, paid by every process that imports
    dmil_fast, DataLoader workers and torchrun ranks included) only to set the marker that
    torch.compile reads when it traces; setting the marker directly has the same effect. When
    torch._dynamo is already loaded the public decorator is used.
    tests/ops/test_dispatch_import.py fails if torch.compile stops honouring the marker.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def choose_backend(name: str, backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend for op ``name`` and these inputs.

    Under torch.compile the choice is made once while tracing and kept as a constant (the
    capability checks import modules and read the environment, which would break the graph),
    so changing ``DMIL_FAST_BACKEND`` after compiling takes effect only on recompilation.
    """
    return _REGISTRY[name].choose(backend, device, dtype)
