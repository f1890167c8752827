"""Device arguments: parsed once, with an error naming the argument when one is not usable here."""

from __future__ import annotations

from typing import Union

import torch

DeviceLike = Union[str, torch.device]


def check_device(device: DeviceLike, *, name: str = "device") -> torch.device:
    """``device`` (``"auto"``, a device string such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``, or a
    ``torch.device``) as a ``torch.device`` this process can use. ``"auto"`` is the GPU when one is
    visible, else the CPU.

    Raises ValueError naming ``name`` for a string torch does not parse, or for a device that is
    not here: CUDA with a CPU-only build of torch or no GPU visible, a GPU index past the last one.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"{name} must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                             f"got {device!r}") from None
    else:
        raise TypeError(f"{name} must be a str or a torch.device, got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible to this process")
            raise ValueError(f"{name} {str(device)!r} is not available: {why}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name} {str(device)!r} is not available: this process sees {count} GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"{name} {str(device)!r} is not available in this torch build or on this machine")
    return dev
