"""Building the models of a training run (feature data: MLP encoders) from a config."""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

from torch import nn

from ..nn import DMILModel, EnsembleModel, JointModel, MLPEncoder
from .config import DMILConfig

METHODS = ("dmil", "joint", "ensemble")


def build_encoders(dims: Tuple[int, int], config: DMILConfig) -> Tuple[Optional[nn.Module], Optional[nn.Module], int]:
    """Per-modality MLP encoders (``encoder_depth`` layers, output ``input_size``) -> (enc_1, enc_2, input_size).

    ``encoder_depth == 0`` uses no encoder: the features feed ``embed_v``/``embed_a`` directly,
    which needs D1 == D2 (the official model has a single ``input_size``).
    """
    d1, d2 = dims
    if config.encoder_depth == 0:
        if d1 != d2:
            raise ValueError(f"encoder_depth=0 (identity encoders, the features preset) needs equal feature dims, "
                             f"got modality_1 {d1} and modality_2 {d2}; set encoder_depth >= 1 for MLP encoders "
                             f"that map both to input_size")
        return None, None, d1
    enc = [MLPEncoder(d, hidden=config.encoder_hidden, depth=config.encoder_depth, out_dim=config.input_size,
                      dropout=config.encoder_dropout) for d in (d1, d2)]
    return enc[0], enc[1], config.input_size


def build_model(method: str, dims: Optional[Tuple[int, int]], num_classes: int, config: DMILConfig, *,
                backend: Optional[str] = None,
                encoders: Optional[Tuple[nn.Module, nn.Module]] = None) -> nn.Module:
    """``method`` in ("dmil", "joint", "ensemble") on features of widths ``dims`` = (D1, D2).

    ``encoders``: prebuilt (enc_1, enc_2) modules (a ResNet18 pair, a pretrained network of your
    own) that map each modality's input to ``config.input_size`` features, used in place of the
    config's MLP encoders; ``dims`` is then unused and may be None.
    ``backend``: the ops backend of the DMIL model; the baselines have no fused ops and ignore it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if encoders is None:
        if dims is None:
            raise ValueError("dims (D1, D2) is needed unless encoders are given")
        if (not isinstance(dims, (tuple, list)) or len(dims) != 2
                or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in dims)):
            raise ValueError(f"dims must be the two feature widths (D1, D2), positive ints, got {dims!r}")
        enc_1, enc_2, input_size = build_encoders(dims, config)
    else:
        if not (isinstance(encoders, (tuple, list)) and len(encoders) == 2
                and all(isinstance(e, nn.Module) for e in encoders)):
            raise TypeError(f"encoders must be a pair of torch.nn.Module, got {encoders!r:.80}")
        (enc_1, enc_2), input_size = encoders, config.input_size
    size = dict(embed_size=config.embed_size, num_class=num_classes, input_size=input_size)
    if method == "dmil":
        return DMILModel(enc_1, enc_2, stage=1, backend=backend, synergy_hidden=config.synergy_hidden,
                         recompute=config.recompute, **size)
    if method == "joint":
        return JointModel(enc_1, enc_2, fusion_hidden=config.joint_fusion_hidden, **size)
    return EnsembleModel(enc_1, enc_2, **size)
