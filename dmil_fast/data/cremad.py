"""Raw CREMA-D (audio-visual emotion recognition, 6 classes) as the official DMIL pipeline feeds it.

Layout under ``root``::

    train.csv, test.csv          rows "<clip_id>,<label>", label in NEU HAP SAD FEA DIS ANG
    AudioWAV/<clip_id>.wav       the audio track
    Image-01-FPS/<clip_id>/*.jpg frames extracted from the video (folder name configurable)

Audio: mono, resampled to 22,050 Hz, tiled and cut to 3 s, clipped to [-1, 1], then
``log(|STFT| + 1e-7)`` with n_fft 512, hop 353, a periodic Hann window of 512 samples and
centred frames (zero padding of n_fft / 2 on both sides): (1, 257, 188) float32.
Visual: ``num_frames`` frames (evenly spaced in eval, random in training), each transformed as
in the official pipeline (train: random resized crop to 224 with scale (0.08, 1) and aspect
(3/4, 4/3), random horizontal flip; eval: resize to 224 x 224; both then scaled to [0, 1] and
normalised with the ImageNet mean/std): (3, T, 224, 224) float32, channels first as the visual
ResNet expects.

Optional dependencies, imported on first use: Pillow (frames) and scipy (resampling audio that is
not already at 22,050 Hz; WAV files that are not integer PCM). WAV is read with the stdlib ``wave``.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
import wave
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch.utils.data import Dataset

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
SAMPLE_RATE = 22050
SECONDS = 3
N_FFT = 512
HOP_LENGTH = 353
IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def _pil_image():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading CREMA-D frames needs Pillow: pip install pillow (or 'dmil-fast[av]')") from exc
    return Image


def _decode_pcm(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Integer PCM bytes -> (frames, channels) float32 in [-1, 1)."""
    usable = len(raw) - len(raw) % (width * channels)
    raw = raw[:usable]
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"unsupported sample width of {width} bytes")
    return x.reshape(-1, channels)


def _read_wav(path: Path):
    """(samples (N,) float32 mono, rate). Integer PCM through ``wave``, anything else through scipy."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            frames = _decode_pcm(w.readframes(w.getnframes()), width, channels)
        return frames.mean(axis=1), rate
    except wave.Error as exc:
        wave_error = exc
    try:
        from scipy.io import wavfile
    except ImportError:
        raise ValueError(f"not an integer-PCM WAV file ({wave_error}); reading other WAV formats needs scipy")
    rate, data = wavfile.read(str(path))
    data = np.asarray(data)
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        data = (data.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    data = data.astype(np.float32).reshape(len(data), -1)
    return data.mean(axis=1), rate


def load_waveform(path: Union[str, os.PathLike], *, sample_rate: int = SAMPLE_RATE, seconds: int = SECONDS) -> np.ndarray:
    """Read a WAV file as the model input waveform: (sample_rate * seconds,) float32.

    Channels are averaged, the signal is resampled to ``sample_rate`` (polyphase filter, scipy),
    repeated until it is long enough, cut to ``seconds`` and clipped to [-1, 1]. Raises ValueError
    naming the file when it cannot be decoded or holds no samples.
    """
    path = Path(path)
    try:
        samples, rate = _read_wav(path)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read audio file {path}: {exc}") from exc
    if samples.size == 0 or rate <= 0:
        raise ValueError(f"audio file {path} holds no samples")
    if rate != sample_rate:
        try:
            from scipy.signal import resample_poly
        except ImportError as exc:
            raise ImportError(
                f"resampling {path} from {rate} Hz to {sample_rate} Hz needs scipy: pip install scipy"
            ) from exc
        g = math.gcd(int(rate), int(sample_rate))
        samples = resample_poly(samples, sample_rate // g, rate // g).astype(np.float32)
    target = sample_rate * seconds
    samples = np.tile(samples, -(-target // len(samples)))[:target]
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def log_spectrogram(waveform) -> torch.Tensor:
    """``log(|STFT| + 1e-7)`` of a waveform (L,) -> (1, N_FFT // 2 + 1, 1 + L // HOP_LENGTH) float32.

    Equivalent NumPy: zero-pad N_FFT // 2 samples on both sides, cut frames of N_FFT every
    HOP_LENGTH samples, multiply by the periodic Hann window 0.5 - 0.5 cos(2 pi n / N_FFT),
    ``np.log(np.abs(np.fft.rfft(frames)) + 1e-7)``, transposed to (freq, time).
    """
    x = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
    spec = torch.stft(x, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=N_FFT,
                      window=torch.hann_window(N_FFT, periodic=True), center=True, pad_mode="constant",
                      return_complex=True)
    return torch.log(spec.abs() + 1e-7).unsqueeze(0)  # (1, F, T)


def random_resized_crop_box(width: int, height: int, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random crop (left, top, w, h) covering ``scale`` of the area with aspect ``ratio`` (w / h),
    drawn from torch's global RNG: up to 10 tries, then the largest centred crop within ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1]))
        aspect = math.exp(float(torch.empty(1).uniform_(log_lo, log_hi)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,)))
            left = int(torch.randint(0, width - w + 1, (1,)))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def transform_frame(img, *, train: bool, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A PIL RGB image -> (3, size, size) float32, the official train / eval transform."""
    Image = _pil_image()
    bilinear = getattr(Image, "Resampling", Image).BILINEAR  # Pillow < 9.1 has no Resampling enum
    if train:
        left, top, w, h = random_resized_crop_box(*img.size)
        img = img.resize((size, size), bilinear, box=(left, top, left + w, top + h))
        if float(torch.rand(())) < 0.5:
            img = img.transpose(getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT)
    else:
        img = img.resize((size, size), bilinear)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def select_frames(count: int, num_frames: int, *, train: bool) -> list:
    """Indices of the frames to use among ``count`` sorted frames: random (sorted; with repeats only
    when there are fewer frames than asked) in training, evenly spaced centres in eval."""
    if train:
        if count >= num_frames:
            picks = torch.randperm(count)[:num_frames]
        else:
            picks = torch.randint(0, count, (num_frames,))
        return sorted(int(i) for i in picks)
    return [((2 * k + 1) * count) // (2 * num_frames) for k in range(num_frames)]


class CremaDDataset(Dataset):
    """Raw CREMA-D clips: item ``i`` is ``(visual, audio, label, index)``.

    ``visual`` (3, num_frames, 224, 224) float32, ``audio`` (1, 257, 188) float32 log-spectrogram,
    ``label`` int64 scalar (index into ``CREMAD_CLASSES``), ``index`` int64 scalar (= i).

    Args:
        root: dataset root (see the module docstring).
        split: ``"train"`` reads train.csv; ``"val"`` and ``"test"`` both read test.csv, as the
            official code does.
        num_frames: frames per clip (>= 1).
        frame_dir: folder of frame folders under ``root`` (the official DMIL code reads
            ``"Image-05-FPS"``; other CREMA-D pipelines ``"Image-01-FPS"``).
        audio_dir: folder of WAV files under ``root``.
        train: random frames and augmentation; default ``split == "train"``.
        on_missing: ``"skip"`` drops clips whose WAV or frame folder is absent (with one warning, like
            the official loader) or ``"error"`` raises FileNotFoundError naming the first.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", *, num_frames: int = 1,
                 frame_dir: str = "Image-01-FPS", audio_dir: str = "AudioWAV", train=None,
                 on_missing: str = "skip"):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        if on_missing not in ("skip", "error"):
            raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
        self.root = Path(root)
        self.split = split
        self.num_frames = num_frames
        self.train = (split == "train") if train is None else bool(train)
        self.num_classes = len(CREMAD_CLASSES)
        self.class_names = list(CREMAD_CLASSES)
        self.modality_names = ["visual", "audio"]
        self.interaction_type = None

        csv_path = self.root / ("train.csv" if split == "train" else "test.csv")
        if not csv_path.is_file():
            raise FileNotFoundError(f"CREMA-D list not found: {csv_path}")
        self.clip_ids, self._audio, self._frames, labels, missing = [], [], [], [], []
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 2:
                    raise ValueError(f"{csv_path}, line {line}: expected '<clip_id>,<label>', got {row!r}")
                clip, label = row[0].strip(), row[1].strip()
                if label not in CREMAD_CLASSES:
                    raise ValueError(f"{csv_path}, line {line}: unknown label {label!r}; expected one of {CREMAD_CLASSES}")
                audio, frames = self.root / audio_dir / f"{clip}.wav", self.root / frame_dir / clip
                absent = [p for p in (audio, frames) if not p.exists()]
                if absent:
                    if on_missing == "error":
                        raise FileNotFoundError(f"CREMA-D clip {clip!r} ({csv_path}, line {line}): missing {absent[0]}")
                    missing.append(absent[0])
                    continue
                self.clip_ids.append(clip)
                self._audio.append(audio)
                self._frames.append(frames)
                labels.append(CREMAD_CLASSES.index(label))
        if missing:
            warnings.warn(f"{len(missing)} CREMA-D clip(s) listed in {csv_path} skipped for missing files, "
                          f"e.g. {missing[0]}", stacklevel=2)
        if not labels:
            raise ValueError(f"no usable CREMA-D clips in {csv_path}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(labels), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def _position(self, i) -> int:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"i must be an int sample index, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} CREMA-D clips")
        return int(i) % n

    def audio_path(self, i: int) -> Path:
        """The WAV file of clip ``i``."""
        return self._audio[self._position(i)]

    def frame_folder(self, i: int) -> Path:
        """The folder of clip ``i``'s frames."""
        return self._frames[self._position(i)]

    def load_audio(self, i: int) -> torch.Tensor:
        """(1, 257, 188) float32 log-spectrogram of clip ``i``."""
        try:
            waveform = load_waveform(self._audio[i])
        except ValueError as exc:
            raise ValueError(f"CREMA-D sample {i}: {exc}") from exc
        return log_spectrogram(waveform)

    def load_visual(self, i: int) -> torch.Tensor:
        """(3, num_frames, 224, 224) float32 frames of clip ``i``."""
        Image = _pil_image()
        folder = self._frames[i]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise ValueError(f"CREMA-D sample {i}: no frames ({', '.join(FRAME_SUFFIXES)}) in {folder}")
        out = []
        for k in select_frames(len(files), self.num_frames, train=self.train):
            try:
                with Image.open(files[k]) as img:
                    rgb = img.convert("RGB")
            except (OSError, ValueError, SyntaxError) as exc:
                raise ValueError(f"CREMA-D sample {i}: cannot read frame {files[k]}: {exc}") from exc
            out.append(transform_frame(rgb, train=self.train))
        return torch.stack(out, dim=1)  # (3, T, H, W)

    def __getitem__(self, i):
        i = self._position(int(i) if isinstance(i, torch.Tensor) else i)
        return (self.load_visual(i), self.load_audio(i),
                torch.tensor(int(self.labels[i]), dtype=torch.int64), torch.tensor(i, dtype=torch.int64))
