"""The models' inputs: encoder outputs pooled to (B, D) features, and the checks every model runs
on visual and audio before its encoders."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._validate import autocast_enabled

Tensor = torch.Tensor


def pool_encoder_output(x: Tensor, batch_size: int, name: str) -> Tensor:
    """Encoder output -> (B, C) features.

    (B, D) passes through; (B*T, C, H, W) maps are average-pooled over (T, H, W) per sample,
    the frames of sample b being rows [b*T, (b+1)*T) as the official ``normal_reshape`` reads them.
    """
    if x.dim() == 2:
        if x.shape[0] != batch_size:
            raise ValueError(f"{name} returned {x.shape[0]} rows for a batch of {batch_size}")
        return x
    if x.dim() == 4:
        n, c, h, w = x.shape
        if n % batch_size != 0:
            raise ValueError(f"{name} returned {n} maps, not a multiple of the batch size {batch_size}")
        x = x.view(batch_size, n // batch_size, c, h, w).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        return torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)  # (B, C)
    raise ValueError(f"{name} must return (B, D) features or (B*T, C, H, W) maps, got shape {tuple(x.shape)}")


def encode_inputs(model: nn.Module, visual: Tensor, audio: Tensor) -> Tuple[Tensor, Tensor]:
    """``model``'s encoders ``visual_net``/``audio_net`` and (T, H, W) pooling on checked inputs:
    -> (B, input_size) features v, a, ready for ``embed_v``/``embed_a``.

    visual, audio: tensors whose first dimension is the batch B >= 1. Raises TypeError when either
    is not a tensor or its features' dtype differs from the embedding's weight outside autocast,
    ValueError when a batch is empty or a feature width is not ``model.input_size``.
    """
    for name, x in (("visual", visual), ("audio", audio)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name} must be a batch of at least one sample (first dimension B >= 1), "
                             f"got shape {tuple(x.shape)}")
    batch = visual.size(0)
    v = pool_encoder_output(model.visual_net(visual), batch, "video_model (visual_net)")
    a = pool_encoder_output(model.audio_net(audio), batch, "audio_model (audio_net)")
    for name, feat, layer in (("visual", v, model.embed_v), ("audio", a, model.embed_a)):
        if feat.shape[1] != model.input_size:
            raise ValueError(f"the {name} encoder output has {feat.shape[1]} features, expected "
                             f"input_size={model.input_size}")
        check_parameter_dtype(f"the {name} features are", feat, layer.weight)
    return v, a


def check_parameter_dtype(subject: str, x: Tensor, weight: Tensor) -> None:
    """A TypeError unless ``x`` has the dtype of the model's parameters (``weight``) or autocast
    is on for its device; ``subject`` begins the message ("the visual features are")."""
    if x.dtype != weight.dtype and not autocast_enabled(x.device.type):
        raise TypeError(f"{subject} {x.dtype}, the model's parameters {weight.dtype}: "
                        f"cast the model (model.to({x.dtype})) or the inputs (.to({weight.dtype})), "
                        f"or run under torch.autocast")


def check_embeddings(model: nn.Module, v: Tensor, a: Tensor) -> None:
    """The checks on embeddings given to a stage directly (the official ``train_stage_*`` methods):
    v and a are (B, E) tensors, E = ``model.embed_size``, one batch B >= 1, in the parameters'
    dtype outside autocast. TypeError or ValueError naming the argument."""
    for name, x in (("v", v), ("a", a)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of embeddings (B, E), got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != model.embed_size or x.shape[0] == 0:
            raise ValueError(f"{name} must be embeddings of shape (B, E) with B >= 1 and E = embed_size = "
                             f"{model.embed_size} (the output of embed_v / embed_a), got shape {tuple(x.shape)}")
        check_parameter_dtype(f"{name} is", x, model.embed_v.weight)
    if v.shape[0] != a.shape[0]:
        raise ValueError(f"v and a must have the same batch size, got {v.shape[0]} and {a.shape[0]}")
