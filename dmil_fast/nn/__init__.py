"""Modules: the variational bottleneck, the DMIL model, baselines and feature encoders."""

from .baselines import EnsembleModel, JointModel
from .bottleneck import VariationalBottleneck, grouped_sample
from .dmil import LEGACY_STATE_DICT_KEYS, STAGE1_MODULES, CrossModality, DMILModel
from .inputs import pool_encoder_output
from .encoders import MLPEncoder
from .resnet import ResNet18, resnet18

__all__ = [
    "VariationalBottleneck",
    "grouped_sample",
    "DMILModel",
    "CrossModality",
    "LEGACY_STATE_DICT_KEYS",
    "STAGE1_MODULES",
    "pool_encoder_output",
    "JointModel",
    "EnsembleModel",
    "MLPEncoder",
    "ResNet18",
    "resnet18",
]
