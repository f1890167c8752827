"""Training configuration: the official ``cfgs/methods/DMIL.yaml`` and ``cfgs/train.yaml`` settings
under their official names, plus the few settings feature data needs.

Two presets:

- ``"published"`` (the default, :class:`DMILConfig` ()): the published CREMA-D configuration, for
  raw inputs and pretrained ResNet18 encoders.
- ``"features"`` (:meth:`DMILConfig.for_features`): pre-extracted features (see that method for
  what changes and why, with the measurements).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Tuple, Union, get_type_hints

PRESETS = ("published", "features")
OPTIMIZERS = ("SGD", "Adam")

# Keys of the official train.yaml / optimizer files that configure Hydra, paths or hardware of the
# official scripts; they are accepted in a YAML file and have no effect here.
IGNORED_OFFICIAL_KEYS = frozenset({
    "defaults", "hydra", "n_classes", "n_threads", "test_checkpoint", "train", "device", "gpu_device",
    "tensorboard", "result_path", "pretrained_path", "dataset", "encoder_v", "encoder_a",
    "data_paths", "cremad", "_target_",
})
# Official optimizer-file keys and the fields they set.
_OPTIMIZER_KEYS = {"momentum": "momentum", "weight_decay": "weight_decay", "betas": "adam_betas",
                   "eps": "adam_eps", "lr": "lr"}


@dataclass
class DMILConfig:
    """Every setting of a training run. Defaults: the published configuration (DESIGN section 1).

    Official names (``cfgs/methods/DMIL.yaml``): ``method_name``, ``lamb`` (lambda), the stage
    epochs and learning rates, and the loss weights ``beta_cls``, ``stage1_*``, ``stage2_*``,
    ``stage3_*``.

    Loss weights: those of the current official method file, which go with a model that returns
    unweighted KLs (as :class:`dmil_fast.nn.DMILModel` does): ``lamb`` 0.02 and reconstruction
    weights ``stage1_visual_beta_rec`` 1.0, ``stage1_audio_beta_rec`` 5.0, ``stage2_beta_rec_tr``
    2.5, ``stage3_beta_rec_stage1`` 3.0, ``stage3_beta_rec_tr`` 1.0. Older official revisions
    scaled every KL by 0.1 inside the model and set ``lamb`` 0.2 and the reconstruction weights
    0.1, 0.5, 0.25, 0.3, 0.1: the same effective objective (every KL weighted 0.1 * 0.2 = 0.02 *
    beta, every reconstruction term lamb * beta_rec unchanged). ``stage2_beta_all`` (only in
    those older files, never read by the official trainer) is accepted and unused. Official names (``cfgs/train.yaml`` and ``cfgs/optimizer/*.yaml``):
    ``batch_size``, ``lr``, ``n_epochs``, ``random_seed`` (``seed`` in a YAML file),
    ``val_freq``, ``embed_size`` (the CREMA-D dataset config sets 32), ``optimizer`` ("SGD" or
    "Adam"), ``momentum``, ``weight_decay``, ``adam_betas``/``adam_eps`` (the Adam file's
    ``betas``/``eps``).

    Settings the official code hard-codes, made explicit: ``input_size`` (encoder output width,
    512 for ResNet18), the ReduceLROnPlateau ``factor``/``patience`` of each stage
    (``stage{k}_plateau_*``) and of the baselines (``plateau_*``).

    Feature-data settings (not official): ``encoder_hidden``, ``encoder_depth``,
    ``encoder_dropout`` of the per-modality :class:`~dmil_fast.nn.MLPEncoder`,
    ``joint_fusion_hidden`` of the concatenation baseline, and ``synergy_hidden`` (0, the default,
    builds the published synergy module; H > 0 an optional hidden layer of width H in it, see
    :class:`~dmil_fast.nn.CrossModality`). ``lr`` is the baselines' learning rate.

    Memory against compute (not official, no effect on values): ``recompute`` (True, the default)
    builds :class:`~dmil_fast.nn.DMILModel` with ``recompute=True``, which rebuilds the variational
    heads' projections in the backward instead of keeping them; ``false`` in a YAML file keeps them.
    """

    # --- cfgs/methods/DMIL.yaml
    method_name: str = "DMIL"
    lamb: float = 0.02
    stage1_epochs: int = 10
    stage2_epochs: int = 5
    stage1_lr: float = 4e-3
    stage2_lr: float = 1e-3
    stage3_lr: float = 1e-5
    beta_cls: float = 1.0
    stage1_visual_beta_kl: float = 0.4
    stage1_visual_beta_rec: float = 1.0
    stage1_audio_beta_kl: float = 2.0
    stage1_audio_beta_rec: float = 5.0
    stage2_beta_red: float = 1.0
    stage2_beta_inter: float = 1.0
    stage2_beta_uni: float = 1.0
    stage2_beta_rec_tr: float = 2.5
    stage2_beta_all: float = 0.5  # in older official method files only; never read
    stage3_beta_kl_stage1: float = 1.0
    stage3_beta_rec_stage1: float = 3.0
    stage3_beta_cls_stage1: float = 0.5
    stage3_beta_red: float = 0.4
    stage3_beta_inter: float = 0.4
    stage3_beta_uni: float = 0.4
    stage3_beta_rec_tr: float = 1.0
    # --- cfgs/train.yaml, cfgs/optimizer/{SGD,Adam}.yaml
    batch_size: int = 64
    lr: float = 4e-3
    n_epochs: int = 70
    random_seed: int = 2024
    val_freq: int = 1
    embed_size: int = 32
    optimizer: str = "SGD"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # --- hard-coded in the official code
    input_size: int = 512
    stage1_plateau_factor: float = 0.2
    stage1_plateau_patience: int = 2
    stage2_plateau_factor: float = 0.1
    stage2_plateau_patience: int = 1
    stage3_plateau_factor: float = 0.1
    stage3_plateau_patience: int = 10
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    # --- feature data (MLP encoders) and baselines
    encoder_hidden: int = 256
    encoder_depth: int = 2
    encoder_dropout: float = 0.0
    joint_fusion_hidden: int = 0
    synergy_hidden: int = 0
    recompute: bool = True
    preset: str = field(default="published")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------ presets

    @classmethod
    def for_features(cls, **overrides) -> "DMILConfig":
        """Defaults for pre-extracted features (``preset="features"``), tuned on ``dmil-fast demo``.

        Benchmark: ``make_synthetic(n=12000, mix=(0.25, 0.25, 0.25, 0.25))``, 6 classes, 32-d
        modalities; synergistic samples carry operand prototypes of their own (y = (a + b) mod 6)
        and the noise-only side of a unique sample is pure noise. Test accuracy overall / on
        synergistic samples (chance 0.17; 1800 test samples, standard error up to 0.012), data
        and training seed 0, seed 1 in brackets; single runs:

        ======================================================  ===============  ===============
        setting (SGD, momentum 0.9, batch 128 unless said)      DMIL             joint
        ======================================================  ===============  ===============
        preset of an earlier synthetic set: MLP encoders        0.78 / 0.17      0.78 / 0.17
        (2 layers), rates 4e-2 / 2e-2 / 1e-2, epochs 6/3/21,    (ensemble 0.78 / 0.18)
        joint fusion 64 at lr 4e-2
        MLP encoders, joint lr 0.1                              -                0.96 / 0.93
        MLP encoders, stage-3 lr 3e-2 / 1e-1                    0.79 / 0.21,     -
                                                                0.77 / 0.16
        MLP encoders: stages 2/2/26; E 128; encoder dropout     0.78 /           -
        0.5; 1-layer encoders; Adam 3e-3 on every stage         0.17-0.19
        MLP encoders, stage-3 lr 1e-1 with ``synergy_hidden``   diverges (NaN)   -
        64 or with stage-1 lr 1e-1
        identity encoders, published synergy module,            0.91 / 0.79      -
        stage-3 lr 5e-2, epochs 6/3/41                          (0.90 / 0.74)
        same, E 32 / E 128 / stage-3 plateau patience 5         0.90 / 0.77,     -
                                                                0.89 / 0.76,
                                                                0.91 / 0.79
        identity, ``synergy_hidden`` 64, published rates        0.69 / 0.17      -
        4e-3 / 1e-3 / 1e-5, epochs 6/3/31
        identity, ``synergy_hidden`` 64, stage-3 lr 1e-3        0.76 / 0.18      -
        identity, ``synergy_hidden`` 64, stage-3 lr 1e-1,       0.87 / 0.63      -
        epochs 6/3/31                                           (0.84 / 0.50)
        identity, ``synergy_hidden`` 64, stage-3 lr 5e-2,       0.93 / 0.85      -
        stage-3 plateau patience 10 (published)                 (0.96 / 0.89)
        same with ``synergy_hidden`` 128 / stage-3 lr 3e-2      0.93 / 0.87,     -
                                                                0.94 / 0.86
        **this preset** (``dmil-fast demo``): identity          0.941 / 0.875    0.941 / 0.882
        encoders, ``synergy_hidden`` 64, rates 4e-2 / 2e-2 /    (0.958 / 0.903)  (0.938 / 0.847)
        5e-2, epochs 6/3/41, stage-3 plateau patience 4;
        joint fusion 512, lr 0.1
        identity, joint fusion 64 / 128 / 256, lr 0.1           -                0.92 / 0.82,
                                                                                 0.93 / 0.83,
                                                                                 0.94 / 0.87
                                                                                 (0.93 / 0.83)
        identity, joint fusion 64 at lr 4e-2 / 5e-2; fusion     -                0.91 / 0.79,
        256 at lr 2e-1 / with plateau patience 4                                 0.90 / 0.79;
                                                                                 0.94 / 0.86;
                                                                                 0.94 / 0.86
        ======================================================  ===============  ===============

        The ensemble stays at chance on synergistic samples in every setting (this preset: 0.773
        overall, synergy 0.182; seed 1: 0.764, 0.155). The demo takes 35-60 s on a 2-core CPU
        machine, single-threaded (more when the machine is busy), most of it DMIL's.

        Findings:

        - Encoders: with MLP encoders DMIL never learns the synergistic samples: the per-modality
          objectives (the tr classifiers and the unique heads, which must predict y from one
          modality) drive the shared encoders to memorise the synergistic training samples (train
          accuracy 0.99, validation 0.75), and the synergy path follows. The concatenation model,
          which has no per-modality objective on its encoders, generalises (0.96 at lr 0.1). With
          identity encoders (the features go straight into ``embed_v``/``embed_a``: the official
          model on pre-extracted features) both models get the same linear embeddings and DMIL
          learns synergy. This preset uses them (``encoder_depth`` 0); the comparison in the
          demo is at equal encoders, and the concatenation model with MLP encoders is stronger
          than either here.
        - Synergy module: the published ``cross_modality`` (one Linear on [z1, z2, z1 * z2])
          learns the modular sum slowly and unevenly (0.79, seed 1 0.74); a hidden layer of 64
          (``synergy_hidden``, an option; the default model keeps the published module) reads
          operand pairs like the concatenation model's hidden layer and reaches 0.88 / 0.90.
          Trained alone on synergistic samples the published module memorises with SGD and
          generalises with Adam; trained on all types (as in DMIL) only the hidden layer learns.
        - Learning rates: the published ones (tuned for fine-tuning pretrained ResNet18s) leave
          stage 3 frozen at 1e-5 and synergy at chance; stage 2 alone cannot learn synergy from
          the sampled task-irrelevant latents (collapsed by the stage-1 KL: spread of their means
          0.08 against a sampling variance 1.1). End-to-end stage 3 learns it after a plateau of
          about ten epochs at 5e-2; 1e-3 is still on that plateau after 41 epochs; 1e-1 is noisier
          (and diverges with MLP encoders).
        - Schedule: 50 epochs (stage 1: 6, stage 2: 3, stage 3: 41) at batch 128; a stage-3
          plateau patience of 4 (published 10) lowers the rate once validation stops improving
          (+0.01 on seed 0).
        - Baselines: the same encoders and embeddings and the same 50 epochs, at ``lr`` 0.1 (the
          best of 0.04, 0.05, 0.1, 0.2) with their published plateau patience 2 (4 is no better),
          the concatenation model with its best fusion width (512 of 64, 128, 256, 512).

        Everything else stays published (loss weights, lambda, SGD with momentum 0.9 and weight
        decay 1e-4, the stage-1/2 plateau schedules); ``embed_size`` is 64 (32 and 128 did no
        better); ``input_size`` and ``encoder_hidden`` only matter when ``encoder_depth`` > 0.
        """
        values: Dict[str, Any] = dict(
            preset="features", n_epochs=50, stage1_epochs=6, stage2_epochs=3, batch_size=128,
            stage1_lr=4e-2, stage2_lr=2e-2, stage3_lr=5e-2, lr=1e-1,
            embed_size=64, input_size=128, encoder_hidden=256, encoder_depth=0, joint_fusion_hidden=512,
            synergy_hidden=64, stage3_plateau_patience=4,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DMILConfig":
        """``"published"`` -> ``DMILConfig(**overrides)``; ``"features"`` -> :meth:`for_features`."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
        return cls.for_features(**overrides) if name == "features" else cls(**overrides)

    # ------------------------------------------------------------ derived settings

    @property
    def seed(self) -> int:
        return self.random_seed

    def scaled(self, n_epochs: int) -> "DMILConfig":
        """A copy with ``n_epochs`` total epochs and the stage epochs scaled proportionally.

        Stage 1 gets ``max(1, round(stage1_epochs * n_epochs / self.n_epochs))`` epochs, stage 2
        the same (at least 1 when it is enabled and the run is long enough), stage 3 the rest. A
        schedule that stops after stage 1 (``stage2_epochs=0``) gives stage 1 all ``n_epochs``.
        """
        if isinstance(n_epochs, bool) or not isinstance(n_epochs, int) or n_epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {n_epochs!r}")
        if self.stage2_epochs == 0:  # DMIL stops after stage 1: the epochs asked for are all stage 1's
            return dataclasses.replace(self, n_epochs=n_epochs, stage1_epochs=n_epochs)
        ratio = n_epochs / self.n_epochs
        s1 = min(n_epochs, max(1, round(self.stage1_epochs * ratio)))
        s2 = 0
        if self.stage2_epochs > 0 and n_epochs > s1:
            s2 = min(n_epochs - s1, max(1, round(self.stage2_epochs * ratio)))
        return dataclasses.replace(self, n_epochs=n_epochs, stage1_epochs=s1, stage2_epochs=s2)

    def stage_lr(self, stage: int) -> float:
        return {1: self.stage1_lr, 2: self.stage2_lr, 3: self.stage3_lr}[stage]

    def plateau(self, stage: int) -> Tuple[float, int]:
        """(factor, patience) of the ReduceLROnPlateau of DMIL stage 1-3, or 0 for the baselines."""
        if stage == 0:
            return self.plateau_factor, self.plateau_patience
        return getattr(self, f"stage{stage}_plateau_factor"), getattr(self, f"stage{stage}_plateau_patience")

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    # ------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        positive_ints = ("stage1_epochs", "n_epochs", "batch_size", "val_freq", "embed_size", "input_size",
                         "encoder_hidden")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("stage2_epochs", "encoder_depth", "joint_fusion_hidden", "synergy_hidden", "random_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.n_epochs < self.stage1_epochs:
            raise ValueError(f"n_epochs ({self.n_epochs}) is shorter than stage1_epochs ({self.stage1_epochs})")
        if self.stage2_epochs > 0 and self.n_epochs < self.stage1_epochs + self.stage2_epochs:
            raise ValueError(f"n_epochs ({self.n_epochs}) must cover stage1_epochs + stage2_epochs "
                             f"({self.stage1_epochs} + {self.stage2_epochs})")
        if self.embed_size < 2:
            raise ValueError(f"embed_size must be at least 2, got {self.embed_size}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
            if (f.name.startswith("beta_") or "_beta_" in f.name) and value < 0:  # beta_cls, stage1_visual_beta_kl, ...
                raise ValueError(f"{f.name} must be >= 0 (a loss weight), got {value!r}")
        for name in ("lamb", "stage1_lr", "stage2_lr", "stage3_lr", "lr", "momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for stage in (1, 2, 3, 0):
            prefix = f"stage{stage}_" if stage else ""
            factor, patience = self.plateau(stage)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
                raise ValueError(f"{prefix}plateau_factor must lie in (0, 1) (the learning rate is multiplied "
                                 f"by it on a plateau), got {factor!r}")
            if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
                raise ValueError(f"{prefix}plateau_patience must be an int >= 0 (epochs without improvement), "
                                 f"got {patience!r}")
        betas = self.adam_betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
        if self.adam_eps < 0:
            raise ValueError(f"adam_eps must be >= 0, got {self.adam_eps!r}")
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be true or false, got {self.recompute!r}")
        if not 0 <= self.encoder_dropout < 1:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")

    # ------------------------------------------------------------ YAML

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike], *, preset: str = "published") -> "DMILConfig":
        """Settings from a YAML file on top of a preset's defaults.

        The file is a mapping of field names (the official names, see the class docstring). It
        may also be an official Hydra file: a ``methods:`` or ``optimizer:`` section is read as
        if flat, ``_target_: torch.optim.SGD`` selects the optimizer, ``${...}`` interpolations
        are left at the default, and the keys in ``IGNORED_OFFICIAL_KEYS`` (Hydra, paths,
        hardware) are skipped. Numbers written like ``4e-3`` (strings to YAML 1.1) are converted.
        An unknown key raises ValueError naming the key and the file.

        A method file of an older official revision (``lamb: 0.2``, written for a model whose KL
        outputs carried a factor 0.1) loads as written and then weights every KL 10 times more
        than it did there; for its old objective use ``lamb`` / 10 and every ``*_beta_rec*`` x 10
        (the current official file does exactly that).
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
        values = _coerce(_flatten_official(raw, path), path)
        preset = values.pop("preset", preset)
        try:
            return cls.from_preset(preset, **values)
        except ValueError as exc:
            message = str(exc)
            hint = ""
            if "is shorter than" in message or "must cover" in message:  # the stage schedule does not fit
                unset = [k for k in ("n_epochs", "stage1_epochs", "stage2_epochs")
                         if k not in values and k in message]
                if unset:
                    hint = f" ({', '.join(unset)} not in the file: the {preset!r} preset's value)"
            raise ValueError(f"{path}: {message}{hint}") from None


def _flatten_official(raw: Dict[str, Any], path: Path) -> Dict[str, Any]:
    names = {f.name for f in fields(DMILConfig)} | {"seed"}
    out: Dict[str, Any] = {}

    def put(key, value, where):
        if isinstance(value, str) and value.strip().startswith("${"):
            return  # an official interpolation: keep the default
        if key == "seed":
            key = "random_seed"
        if key not in names:
            raise ValueError(f"unknown setting {where!r} in {path}; known settings are the fields of "
                             "dmil_fast.train.DMILConfig")
        out[key] = value

    for key, value in raw.items():
        key = str(key)
        if key == "methods" and isinstance(value, dict):
            for k, v in value.items():
                put(str(k), v, f"methods.{k}")
        elif key == "optimizer" and isinstance(value, dict):
            for k, v in value.items():
                k = str(k)
                if k == "_target_":
                    out["optimizer"] = str(v).rsplit(".", 1)[-1]
                elif k in _OPTIMIZER_KEYS:
                    put(_OPTIMIZER_KEYS[k], v, f"optimizer.{k}")
                else:
                    raise ValueError(f"unknown setting 'optimizer.{k}' in {path}")
        elif key in IGNORED_OFFICIAL_KEYS:
            continue
        else:
            put(key, value, key)
    return out


def _coerce(values: Dict[str, Any], path: Path) -> Dict[str, Any]:
    hints = get_type_hints(DMILConfig)
    out = {}
    for key, value in values.items():
        kind = hints[key]
        try:
            if kind is bool:  # YAML's true / false only
                if not isinstance(value, bool):
                    raise ValueError
                out[key] = value
            elif kind is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                out[key] = int(float(value))
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                out[key] = float(value)
            elif kind is str:
                out[key] = str(value)
            else:  # Tuple[float, float]
                if len(value) != 2:
                    raise ValueError
                out[key] = (float(value[0]), float(value[1]))
        except (TypeError, ValueError, OverflowError):  # OverflowError: .inf or 1e400 for an int
            raise ValueError(f"setting {key!r} in {path} must be {getattr(kind, '__name__', kind)}, "
                             f"got {value!r}") from None
    return out
