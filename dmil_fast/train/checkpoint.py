"""Checkpoints: atomic writes, verified loads, and rebuilding a trained model from one.

A checkpoint is a plain ``torch.save`` dict (readable with ``torch.load(path)["state_dict"]``):

    format            "dmil_fast.checkpoint/1"
    state_dict        the model's parameters and buffers (official names for DMIL)
    state_dict_sha256 digest of state_dict (names, dtypes, shapes, bytes), checked on load
    model             how to rebuild the model: method, dims, num_classes, stage, config (dict)
    ...               whatever else the writer adds (epoch, optimizer, scheduler, rng, metrics)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

FORMAT = "dmil_fast.checkpoint/1"
PathLike = Union[str, os.PathLike]


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every entry's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: PathLike, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` (must hold ``state_dict``) to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are flushed and fsync'ed, and the
    file is renamed over ``path`` with ``os.replace``: a reader (or a run killed mid-write)
    sees either the old checkpoint or the new one, never a partial file.
    """
    if "state_dict" not in payload:
        raise ValueError("payload must hold a 'state_dict'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, format=FORMAT, state_dict_sha256=state_dict_digest(payload["state_dict"]))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises FileNotFoundError when ``path`` does not exist and ValueError when it is not a
    readable checkpoint (truncated, corrupt, another format) or its state_dict digest differs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, unpickling refusals
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise ValueError(f"{path} is not a dmil_fast checkpoint (expected format {FORMAT!r})")
    digest = payload.get("state_dict_sha256")
    if digest != state_dict_digest(payload["state_dict"]):
        raise ValueError(f"checkpoint {path} failed verification: its state_dict digest does not match")
    return payload


def load_model(path: PathLike, *, map_location: Union[str, torch.device] = "cpu",
               backend: Optional[str] = None) -> torch.nn.Module:
    """Rebuild the trained model stored in a checkpoint, in eval mode.

    The architecture comes from the checkpoint's ``model`` entry (method, feature dims, number
    of classes, stage and the training config), the weights from its state_dict (strict).
    ``backend`` is passed to :class:`dmil_fast.nn.DMILModel`.
    """
    from .config import DMILConfig
    from .factory import build_model

    payload = load_checkpoint(path, map_location=map_location)
    spec = payload.get("model")
    if not isinstance(spec, dict):
        raise ValueError(f"checkpoint {path} has no 'model' entry describing the architecture")
    config_values = dict(spec["config"])
    config_values["adam_betas"] = tuple(config_values.get("adam_betas", (0.9, 0.999)))
    config = DMILConfig(**config_values)
    model = build_model(spec["method"], tuple(spec["dims"]), int(spec["num_classes"]), config, backend=backend)
    if spec["method"] == "dmil":
        model.configure_stage(int(spec.get("stage", 3)))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(map_location).eval()
