"""Data for dmil_fast: feature datasets on disk, synthetic sets with per-sample ground truth,
logic-gate tasks with known interactions, and (optional extra) raw CREMA-D.

    from dmil_fast.data import make_synthetic, FeatureDataset
    path = make_synthetic("data/syn", n=6000, seed=0)
    train = FeatureDataset(path, "train")        # (x1, x2, label, row index) per item
"""

import importlib as _importlib

from .features import INTERACTION_TYPES, FeatureDataset, hash_split
from .logic_gates import LOGIC_GATE_TRUTH, LOGIC_GATES, logic_gate
from .synthetic import make_synthetic

# The raw CREMA-D reader needs Pillow; it loads on first access.
_LAZY = {"CremaDDataset": "dmil_fast.data.cremad", "CREMAD_CLASSES": "dmil_fast.data.cremad"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmil_fast.data' has no attribute {name!r}")


__all__ = [
    "FeatureDataset", "make_synthetic", "hash_split", "INTERACTION_TYPES",
    "logic_gate", "LOGIC_GATES", "LOGIC_GATE_TRUTH", "CremaDDataset", "CREMAD_CLASSES",
]
