"""Training: configuration, losses, the three-stage trainer, checkpoints and metrics."""

from .checkpoint import load_checkpoint, load_model, load_weights, read_state_dict, save_checkpoint, state_dict_digest
from .config import PRESETS, DMILConfig
from .data import FeatureData, Split, StreamSplit
from .distributed import DistContext, init_distributed
from .factory import METHODS, build_model
from .losses import baseline_loss, dmil_loss, lean_cross_entropy
from .media import MediaData, build_media_model
from .metrics import prediction_metrics
from .trainer import Trainer, seed_everything, stage_of_epoch, train

__all__ = [
    "DMILConfig", "PRESETS", "dmil_loss", "baseline_loss", "lean_cross_entropy", "Trainer", "train", "stage_of_epoch",
    "seed_everything", "FeatureData", "Split", "build_model", "METHODS", "save_checkpoint",
    "load_checkpoint", "load_model", "state_dict_digest", "prediction_metrics", "load_weights",
    "read_state_dict", "StreamSplit", "MediaData", "build_media_model", "DistContext", "init_distributed",
]
