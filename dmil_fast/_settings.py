"""Settings the commands and the Python API share (a device, an output directory): checked once,
with an error naming the argument when one is not usable here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch

DeviceLike = Union[str, torch.device]


def check_device(device: DeviceLike, *, name: str = "device") -> torch.device:
    """``device`` (``"auto"``, a device string such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``, a
    ``torch.device``, or a GPU ordinal as torch takes it) as a ``torch.device`` this process can use.
    ``"auto"`` is the GPU when one is visible, else the CPU.

    Raises ValueError naming ``name`` for a string torch does not parse, or for a device that is
    not here: CUDA with a CPU-only build of torch or no GPU visible, a GPU index past the last one.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"{name} must be a GPU ordinal >= 0, got {device}")
        dev = torch.device("cuda", device)
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"{name} must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', "
                             f"got {device!r}") from None
    else:
        raise TypeError(f"{name} must be a str, a torch.device or a GPU ordinal, got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built_for_gpus = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
            why = "no GPU is visible to this process" if built_for_gpus else "this torch was built without CUDA"
            raise ValueError(f"{name} {str(dev)!r} is not available: {why}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name} {str(dev)!r} is not available: this process sees {count} GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"{name} {str(dev)!r} is not available in this torch build or on this machine")
    return dev


def check_out_dir(path: Union[str, os.PathLike], *, name: str = "--out") -> Path:
    """``path`` as a Path, refused (NotADirectoryError naming ``name``) when it is an existing file;
    a missing directory is fine: the command creates it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{name} {out} is a file; expected a directory (it is created if missing)")
    return out
