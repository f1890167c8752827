"""Training on raw CREMA-D (optional extra ``dmil-fast[av]``): the splits, a check of every media
file before training, the ResNet18 models, and ImageNet weights for their encoders.

A batch is ``x1`` visual frames (b, 3, T, 224, 224), ``x2`` audio log-spectrograms
(b, 1, 257, 188), ``y`` (b,) and ``idx`` (b,) (:class:`dmil_fast.data.CremaDDataset`).
Augmentation (random frames, crops, flips) draws from torch's RNG seeded per sample with
(seed, epoch, position), so a sample's augmentation does not depend on the DataLoader worker
that loads it or on where a resumed epoch starts.
"""

from __future__ import annotations

import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch

Tensor = torch.Tensor
#: Encoder output width of ResNet18 (the model's ``input_size``).
RESNET18_FEATURES = 512


def looks_like_cremad(path: Union[str, os.PathLike]) -> bool:
    """A CREMA-D root: a directory with ``train.csv`` and ``test.csv``."""
    path = Path(path)
    return path.is_dir() and (path / "train.csv").is_file() and (path / "test.csv").is_file()


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + position) % (2 ** 63 - 1)


class MediaSplit:
    """One CREMA-D split for the trainer (see :mod:`dmil_fast.train.data` for the protocol)."""

    stream = True
    types = None

    def __init__(self, dataset, name: str, *, seed: int = 0):
        self.dataset, self.name, self.seed, self.epoch = dataset, name, seed, 0
        self.y = torch.from_numpy(dataset.labels)
        self.idx = torch.from_numpy(dataset.indices)

    def __len__(self) -> int:
        return len(self.dataset)

    def to(self, device) -> "MediaSplit":
        return self

    def set_epoch(self, epoch: int) -> None:
        """Augmentation of the coming epoch (set before its loader is created)."""
        self.epoch = epoch

    def fetch(self, positions: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Positions (b,) int64 -> visual (b, 3, T, 224, 224), audio (b, 1, 257, 188), y (b,), idx (b,)."""
        items = []
        for p in positions.tolist():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(self.seed, self.epoch, p))
                try:
                    items.append(self.dataset[p])
                except Exception as exc:
                    raise ValueError(f"{self.name} split: {exc}") from exc
        visual, audio, y, idx = (torch.stack(parts) for parts in zip(*items))
        return visual, audio, y, idx


def _check_wav(path: Path) -> Optional[str]:
    try:
        with wave.open(str(path), "rb") as w:
            return None if w.getnframes() > 0 else "no samples"
    except wave.Error:  # not integer PCM: let the reader decode it (float WAV via scipy)
        from ..data.cremad import load_waveform

        try:
            load_waveform(path)
        except (ValueError, ImportError) as exc:
            return str(exc)
        return None
    except (OSError, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _check_image(path: Path) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types for a bad file
        return f"{type(exc).__name__}: {exc}"
    return None


def verify_media(dataset, name: str) -> None:
    """Check every WAV header and every frame image header of a CremaDDataset before training.

    Raises ValueError naming the split, sample index and file of up to 5 unreadable files.
    Decoding errors past the header (a truncated JPEG body) surface when the sample is loaded.
    """
    from ..data.cremad import FRAME_SUFFIXES

    bad: List[str] = []
    for i in range(len(dataset)):
        audio, frames = dataset.audio_path(i), dataset.frame_folder(i)
        problem = _check_wav(audio)
        if problem:
            bad.append(f"sample {i}: audio file {audio}: {problem}")
        files = sorted(p for p in Path(frames).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            bad.append(f"sample {i}: no frames ({', '.join(FRAME_SUFFIXES)}) in {frames}")
        for f in files:
            problem = _check_image(f)
            if problem:
                bad.append(f"sample {i}: frame {f}: {problem}")
        if len(bad) >= 5:
            break
    if bad:
        raise ValueError(f"unreadable CREMA-D media in the {name} split: " + "; ".join(bad))


@dataclass
class MediaData:
    """CREMA-D train / val / test splits (val and test both read ``test.csv``, as the official code)."""

    train: MediaSplit
    val: MediaSplit
    test: MediaSplit
    num_classes: int
    class_names: List[str]
    path: str
    num_frames: int
    dims = None
    type_names = None
    kind = "cremad"
    stream = True

    @classmethod
    def load(cls, root: Union[str, os.PathLike], *, num_frames: int = 1, frame_dir: str = "Image-01-FPS",
             seed: int = 0, verify: bool = True) -> "MediaData":
        """Open the three splits; with ``verify`` check every media file (:func:`verify_media`)."""
        from ..data.cremad import CremaDDataset

        splits = {}
        for name in ("train", "val", "test"):
            ds = CremaDDataset(root, name, num_frames=num_frames, frame_dir=frame_dir)
            if verify and name != "val":  # val reads the same clips as test
                verify_media(ds, name)
            splits[name] = MediaSplit(ds, name, seed=seed)
        train = splits["train"].dataset
        return cls(splits["train"], splits["val"], splits["test"], train.num_classes, list(train.class_names),
                   str(root), num_frames)

    def to(self, device) -> "MediaData":
        return self


def build_media_model(method: str, num_classes: int, config, *, backend: Optional[str] = None) -> torch.nn.Module:
    """``method`` ("dmil", "joint", "ensemble") with the official ResNet18 visual and audio encoders."""
    from ..nn.resnet import resnet18
    from .factory import METHODS, build_model

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if config.input_size != RESNET18_FEATURES:
        raise ValueError(f"input_size must be {RESNET18_FEATURES} (the ResNet18 output width) for raw CREMA-D, "
                         f"got {config.input_size}; use the 'published' preset")
    return build_model(method, None, num_classes, config, backend=backend,
                       encoders=(resnet18("visual"), resnet18("audio")))


def load_pretrained_encoders(model: torch.nn.Module, path: Union[str, os.PathLike]) -> torch.nn.Module:
    """ImageNet ResNet18 weights (torchvision's ``resnet18-f37072fd.pth``) into both encoders,
    the audio encoder's first convolution averaged over RGB (as the official code). Returns ``model``."""
    from ..nn.resnet import load_imagenet_weights
    from .checkpoint import read_state_dict

    state, _ = read_state_dict(path)
    for name in ("visual_net", "audio_net"):
        try:
            load_imagenet_weights(getattr(model, name), state)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return model
