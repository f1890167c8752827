"""Argument checks shared by the public ops: every error names the argument and what was expected."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, value, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, allow_empty: bool = False) -> torch.Tensor:
    """Check that ``value`` is a tensor of the expected rank and dtype; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {_dtype_name(value.dtype)}")
    if not allow_empty and value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); expected at least one element")
    return value


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the same shape as {ref_name} {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors on one device; return it."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = items[0]
    for name, value in items[1:]:
        if value.device != first.device:
            raise ValueError(
                f"{name} is on {value.device} but {first_name} is on {first.device}; "
                "all tensor arguments must be on one device"
            )
    return first.device


def check_label_dtype(name: str, y: torch.Tensor) -> None:
    """A TypeError naming ``name`` unless ``y`` holds integers (floating, complex and bool labels are refused)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")


def check_fake_devices(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """In a fake kernel (which also serves as the op's meta kernel): the real kernels' check that
    every tensor argument is on one device, so that a call with one argument on ``meta`` and the
    others on the CPU raises, as PyTorch's own ops do, instead of returning empty memory."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        shown = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise RuntimeError(f"{op}: every tensor argument must be on one device, got {shown}")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for device types autocast does not know
    (``meta``), where ``torch.is_autocast_enabled`` raises."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # an older torch without the device-type argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:
        return False


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = items[0]
    for name, value in items[1:]:
        if value.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {_dtype_name(value.dtype)} but {first_name} has "
                f"{_dtype_name(first.dtype)}; expected one floating dtype for all of them"
            )
    return first.dtype


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


class NaNInputError(ValueError):
    """An op's input holds NaN: a ValueError naming the argument (``.argument``). The trainer
    turns it into the FloatingPointError of a diverged run."""

    def __init__(self, argument: str):
        super().__init__(f"{argument} contains NaN; expected finite values")
        self.argument = argument

    def __reduce__(self):  # pickled across processes (a DDP worker's error) with its argument
        return type(self), (self.argument,)


def _values_hidden(tensors) -> bool:
    """Whether a transform or tracer stands between the op and the values: torch.func transforms
    (vmap's batched tensors cannot be read into a Python bool) or fake tensors (make_fx)."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and functorch.maybe_current_level() is not None:
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) for t in tensors)


def values_checked(device: torch.device, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the Gaussian ops look at the values (NaN) of ``tensors``: always for CPU tensors,
    where the check is a read of each input; for GPU tensors only under anomaly detection
    (``torch.autograd.detect_anomaly()`` or ``set_detect_anomaly(True)``), as the check waits for
    the device (a host sync in every call of a training step otherwise). Never under
    ``torch.compile``, whose graphs carry no value checks, under torch.func transforms or for
    fake tensors, nor for meta tensors, which hold no values."""
    if torch.compiler.is_compiling() or device.type == "meta":
        return False
    if device.type != "cpu" and not torch.is_anomaly_enabled():
        return False
    return not _values_hidden(tensors)


def check_no_nan(**tensors: Optional[torch.Tensor]) -> None:
    """Raise :class:`NaNInputError` naming the first of ``tensors`` (non-empty, or None) that holds
    NaN. One reduction per tensor and one host transfer when none does."""
    items = [(name, t.detach()) for name, t in tensors.items() if t is not None]
    # max() propagates NaN at a fraction of isnan().any()'s cost on large CPU tensors
    if not bool(torch.stack([t.max().float() for _, t in items]).isnan().any()):
        return
    for name, value in items:
        if bool(torch.isnan(value).any()):
            raise NaNInputError(name)
