"""Checkpoints: atomic writes, verified loads, and rebuilding a trained model from one.

A checkpoint is a plain ``torch.save`` dict (readable with ``torch.load(path)["state_dict"]``):

    format            "dmil_fast.checkpoint/1"
    state_dict        the model's parameters and buffers (official names for DMIL)
    state_dict_sha256 digest of state_dict (names, dtypes, shapes, bytes), checked on load
    model             how to rebuild the model: method, data_kind, dims, num_classes, stage, config
    ...               whatever else the writer adds (epoch, optimizer, scheduler, rng, metrics)

Official DMIL checkpoints (``{"epoch", "state_dict", "optimizer", "scheduler"}``) and plain
state_dict files are read too (:func:`read_state_dict`, :func:`load_weights`, :func:`load_model`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..nn.dmil import LEGACY_STATE_DICT_KEYS

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


def _torch_load(path: Path, map_location) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, unpickling refusals
        raise ValueError(f"checkpoint {path} is unreadable (truncated or corrupt, or it holds objects other than "
                         f"tensors and plain containers): {type(exc).__name__}: {_load_reason(exc)}") from None


def _load_reason(exc: Exception) -> str:
    """The cause in torch.load's message, without its advice to load with ``weights_only=False``
    (which would run arbitrary code from the file)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n|$)", text, flags=re.S)
    if found is None:
        return text
    reason = " ".join(found.group(1).split())
    return reason.split(". ")[0].rstrip(".") if reason else text


def _verified(payload: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state_dict" not in payload:
        raise ValueError(f"{path} is not a dmil_fast checkpoint (expected format {FORMAT!r})")
    digest = payload.get("state_dict_sha256")
    if digest != state_dict_digest(payload["state_dict"]):
        raise ValueError(f"checkpoint {path} failed verification: its state_dict digest does not match")
    return payload


def load_checkpoint(path: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises FileNotFoundError when ``path`` does not exist and ValueError when it is not a
    readable checkpoint (truncated, corrupt, another format) or its state_dict digest differs.
    """
    path = Path(path)
    return _verified(_torch_load(path, map_location), path)


def read_state_dict(path: PathLike, *, map_location: Union[str, torch.device] = "cpu"
                    ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """Model weights from any checkpoint a DMIL user has -> (state_dict, model spec or None).

    Accepted: a checkpoint of :func:`save_checkpoint` (verified; the spec is its ``model``
    entry), an official DMIL checkpoint (``{"epoch", "state_dict", "optimizer", "scheduler"}``)
    and a plain ``state_dict`` file (``torch.save(model.state_dict(), path)``); the official
    and plain forms have no spec. A ``module.`` prefix (DataParallel) is removed. Raises
    FileNotFoundError or a ValueError naming ``path`` for an unreadable or foreign file.
    """
    path = Path(path)
    payload = _torch_load(path, map_location)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        payload = _verified(payload, path)
        return dict(payload["state_dict"]), payload.get("model")
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} holds neither a dmil_fast checkpoint nor a state_dict (a mapping of names "
                         "to tensors, alone or under 'state_dict')")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, None


def load_weights(model: torch.nn.Module, path: PathLike) -> torch.nn.Module:
    """Load the weights of the checkpoint at ``path`` (any form :func:`read_state_dict` reads) into
    ``model``, strictly except for the official model's unused classifiers
    (:data:`dmil_fast.nn.LEGACY_STATE_DICT_KEYS`), which one revision has and the next does not,
    dropped when the model has no such keys. Raises ValueError naming ``path`` and the keys on a
    mismatch. Returns ``model``."""
    state, _ = read_state_dict(path)
    return fit_state_dict(model, state, source=str(path))


def _synergy_hint(model: torch.nn.Module, state: Mapping[str, torch.Tensor], keys) -> str:
    """When the synergy modules differ (an official checkpoint has none of ``synergy_hidden``'s
    hidden layer, which the features preset adds), say which setting makes them fit."""
    mine = getattr(model, "synergy_hidden", None)
    if mine is None or not any(k.startswith("cross_modality.") for k in keys):
        return ""
    hidden = state.get("cross_modality.fc_hidden.weight")
    theirs = int(hidden.shape[0]) if hidden is not None else 0
    if theirs == mine:
        return ""
    official = " (the official synergy module; the features preset sets synergy_hidden=64)" if theirs == 0 else ""
    return (f"; its synergy module has synergy_hidden={theirs}{official}, this model {mine}: "
            f"set synergy_hidden: {theirs} in a --config file (DMILConfig.synergy_hidden)")


def fit_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> torch.nn.Module:
    """:func:`load_weights` for a state_dict in memory; ``source`` names it in errors."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or k not in LEGACY_STATE_DICT_KEYS}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("unexpected", unexpected), ("missing", missing),
                                              ("wrong shape", wrong)) if keys)
        raise ValueError(f"the weights in {source} do not fit this model ({detail})"
                         + _synergy_hint(model, state, unexpected + missing + wrong))
    model.load_state_dict(state, strict=False)
    return model


def official_architecture(state: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """What an official DMIL state_dict implies: embed_size, num_class, input_size and whether its
    encoders are the ResNet18s (``visual_net.*``/``audio_net.*`` keys) or absent (feature inputs)."""
    for key in ("embed_v.weight", "tr1_fc.weight"):
        if key not in state:
            raise ValueError(f"a DMIL state_dict needs {key!r}; this one has {sorted(state)[:4]} ...")
    embed_size, input_size = (int(d) for d in state["embed_v.weight"].shape)
    return {"embed_size": embed_size, "input_size": input_size, "num_class": int(state["tr1_fc.weight"].shape[0]),
            "resnet": "visual_net.conv1.weight" in state}


def load_model(path: PathLike, *, map_location: Union[str, torch.device] = "cpu",
               backend: Optional[str] = None) -> torch.nn.Module:
    """Rebuild the trained model stored in a checkpoint, in eval mode.

    A checkpoint of ``dmil-fast train`` rebuilds from its ``model`` entry (method, data kind,
    feature dims, number of classes, stage and the training config). An official DMIL checkpoint
    or plain state_dict rebuilds a stage-3 :class:`dmil_fast.nn.DMILModel` whose sizes come from
    the weights (:func:`official_architecture`): ResNet18 encoders when it has them, none
    (feature inputs) otherwise. Weights load with :func:`load_weights`. ``backend`` is passed to
    :class:`dmil_fast.nn.DMILModel`.
    """
    from ..nn import DMILModel
    from .config import DMILConfig
    from .factory import build_model

    state, spec = read_state_dict(path, map_location=map_location)
    if spec is None:
        arch = official_architecture(state)
        encoders = (None, None)
        if arch["resnet"]:
            from ..nn.resnet import resnet18

            encoders = (resnet18("visual"), resnet18("audio"))
        model = DMILModel(*encoders, embed_size=arch["embed_size"], num_class=arch["num_class"], stage=3,
                          input_size=arch["input_size"], backend=backend)
    else:
        config_values = dict(spec["config"])
        config_values["adam_betas"] = tuple(config_values.get("adam_betas", (0.9, 0.999)))
        config = DMILConfig(**config_values)
        if spec.get("data_kind", "features") == "cremad":
            from .media import build_media_model

            model = build_media_model(spec["method"], int(spec["num_classes"]), config, backend=backend)
        else:
            model = build_model(spec["method"], tuple(spec["dims"]), int(spec["num_classes"]), config, backend=backend)
        if spec["method"] == "dmil":
            model.configure_stage(int(spec.get("stage", 3)))
    fit_state_dict(model, state, source=str(path))
    return model.to(map_location).eval()
