"""Evaluation metrics: accuracy overall, per class, per ground-truth interaction type, and Syn."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def _rate(mask: np.ndarray) -> Optional[float]:
    """Mean of a boolean array, ``None`` for an empty one (JSON has no NaN)."""
    return float(mask.mean()) if mask.size else None


def prediction_metrics(logits_1: Tensor, logits_2: Tensor, logits_12: Tensor, labels: Tensor, *,
                       class_names: Sequence[str], types: Optional[np.ndarray] = None,
                       type_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Metrics of one evaluated split.

    Args:
        logits_1, logits_2: (N, C) unimodal logits (modality 1, modality 2); logits_12: (N, C)
            the multimodal prediction. labels: (N,) int64. class_names: C names.
        types: optional (N,) int ground-truth interaction type codes; type_names: their names.

    Returns a dict with
        ``accuracy``: multimodal top-1 accuracy; ``accuracy_1``/``accuracy_2``: unimodal;
        ``per_class_accuracy``: {class name: accuracy or None when the class has no sample};
        ``per_type_accuracy``: {type name: accuracy or None}, empty without ``types``;
        ``syn``: fraction of all N samples that the multimodal prediction gets right while both
        unimodal predictions are wrong.
    """
    y = labels.detach().cpu().numpy()
    p1, p2, p12 = (t.detach().argmax(dim=1).cpu().numpy() for t in (logits_1, logits_2, logits_12))
    right12 = p12 == y
    out: Dict[str, object] = {
        "accuracy": _rate(right12),
        "accuracy_1": _rate(p1 == y),
        "accuracy_2": _rate(p2 == y),
        "per_class_accuracy": {name: _rate(right12[y == k]) for k, name in enumerate(class_names)},
        "per_type_accuracy": {},
        "syn": _rate(right12 & (p1 != y) & (p2 != y)),
    }
    if types is not None:
        types = np.asarray(types)
        if types.shape != y.shape:
            raise ValueError(f"types must have shape {y.shape}, got {types.shape}")
        names = list(type_names) if type_names is not None else [str(k) for k in range(int(types.max()) + 1)]
        out["per_type_accuracy"] = {name: _rate(right12[types == k]) for k, name in enumerate(names)}
    return out
