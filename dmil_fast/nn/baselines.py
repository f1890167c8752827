"""Baselines with the same encoders and embedding layers as DMIL: concatenation fusion and a
late-fusion ensemble of unimodal classifiers.

Both return dicts with ``out`` (the multimodal logits), ``v_out`` and ``a_out`` (unimodal
logits), so they train and evaluate in the same harness as :class:`DMILModel`, and both offer
``interaction_outputs`` for per-sample interaction scoring.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._modes import eval_mode
from .inputs import encode_inputs

Tensor = torch.Tensor


class _TwoEncoders(nn.Module):
    """Encoders + ``embed_v``/``embed_a`` exactly as in DMILModel (same names)."""

    def __init__(self, video_model, audio_model, embed_size: int, num_class: int, input_size: int):
        super().__init__()
        for name, value in (("embed_size", embed_size), ("num_class", num_class), ("input_size", input_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.audio_net = audio_model if audio_model is not None else nn.Identity()
        self.visual_net = video_model if video_model is not None else nn.Identity()
        self.embed_size, self.num_class, self.input_size = embed_size, num_class, input_size
        self.embed_v = nn.Linear(input_size, embed_size)
        self.embed_a = nn.Linear(input_size, embed_size)

    def embed(self, visual: Tensor, audio: Tensor) -> Tuple[Tensor, Tensor]:
        """-> e1, e2: (B, E). The inputs are checked as DMILModel checks them
        (:func:`dmil_fast.nn.inputs.encode_inputs`)."""
        v, a = encode_inputs(self, visual, audio)
        return self.embed_v(v), self.embed_a(a)

    def interaction_outputs(self, visual: Tensor, audio: Tensor) -> Dict[str, Tensor]:
        """Eval-mode ``logits_1``, ``logits_2``, ``logits_12``: (B, C) and ``embed_1``, ``embed_2``: (B, E).

        Submodule train/eval modes are restored afterwards.
        """
        with eval_mode(self):
            e1, e2 = self.embed(visual, audio)
            out = self._heads(e1, e2)
        return {"logits_1": out["v_out"], "logits_2": out["a_out"], "logits_12": out["out"],
                "embed_1": e1, "embed_2": e2}

    def forward(self, visual: Tensor, audio: Tensor, train_modality: str = "both") -> Dict[str, Tensor]:
        """-> dict(out, v_out, a_out), each (B, C). ``train_modality`` is accepted and ignored."""
        e1, e2 = self.embed(visual, audio)
        return self._heads(e1, e2)

    def _heads(self, e1: Tensor, e2: Tensor) -> Dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class JointModel(_TwoEncoders):
    """Concatenation fusion: ``fusion`` classifies [e1, e2] (one classifier, cross-entropy).

    ``fusion`` is Linear(2E, H) -> ReLU -> Linear(H, C) with H = ``fusion_hidden``
    (default E), or one Linear(2E, C) when ``fusion_hidden=0``.

    Unimodal logits for analysis (``v_out``, ``a_out``, and ``logits_1``/``logits_2`` of
    :meth:`interaction_outputs`) come from auxiliary linear probes ``probe_v``/``probe_a``
    trained with cross-entropy on the *detached* embeddings: they read what the jointly trained
    embeddings hold about each modality without changing the joint model.
    """

    def __init__(self, video_model, audio_model, embed_size: int = 512, num_class: int = 101,
                 input_size: int = 512, *, fusion_hidden: Optional[int] = None):
        super().__init__(video_model, audio_model, embed_size, num_class, input_size)
        hidden = embed_size if fusion_hidden is None else fusion_hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"fusion_hidden must be an int >= 0 or None, got {fusion_hidden!r}")
        self.fusion_hidden = hidden
        if hidden == 0:
            self.fusion = nn.Linear(2 * embed_size, num_class)
        else:
            self.fusion = nn.Sequential(nn.Linear(2 * embed_size, hidden), nn.ReLU(), nn.Linear(hidden, num_class))
        self.probe_v = nn.Linear(embed_size, num_class)
        self.probe_a = nn.Linear(embed_size, num_class)

    def _heads(self, e1: Tensor, e2: Tensor) -> Dict[str, Tensor]:
        return {"out": self.fusion(torch.cat((e1, e2), dim=1)),  # (B, 2E) -> (B, C)
                "v_out": self.probe_v(e1.detach()), "a_out": self.probe_a(e2.detach())}


class EnsembleModel(_TwoEncoders):
    """Late fusion of independently trained unimodal classifiers.

    ``clf_visual_fc``/``clf_audio_fc`` classify e1/e2; the branches share no parameter, so the
    summed cross-entropy trains each on its own. ``out`` is the log of the averaged class
    probabilities, log((softmax(v_out) + softmax(a_out)) / 2): (B, C) log-probabilities.
    """

    def __init__(self, video_model, audio_model, embed_size: int = 512, num_class: int = 101,
                 input_size: int = 512):
        super().__init__(video_model, audio_model, embed_size, num_class, input_size)
        self.clf_visual_fc = nn.Linear(embed_size, num_class)
        self.clf_audio_fc = nn.Linear(embed_size, num_class)

    def _heads(self, e1: Tensor, e2: Tensor) -> Dict[str, Tensor]:
        v_out, a_out = self.clf_visual_fc(e1), self.clf_audio_fc(e2)
        stacked = torch.stack((F.log_softmax(v_out, dim=1), F.log_softmax(a_out, dim=1)))  # (2, B, C)
        return {"out": torch.logsumexp(stacked, dim=0) - math.log(2.0), "v_out": v_out, "a_out": a_out}
