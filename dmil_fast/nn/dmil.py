"""DMILModel: drop-in for the official DMIL model, built on the fused variational-bottleneck ops."""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import diagonal_gaussian_kl
from ..ops import BACKENDS, gaussian_sample
from ..ops._dispatch import _assume_constant_result, choose_backend, requested_backend
from ..ops.variational_bottleneck import variational_bottleneck_backend
from .bottleneck import VariationalBottleneck
from ._modes import eval_mode
from .decomposition import align_kl, first_level, recon_loss, second_level
from .inputs import check_embeddings, encode_inputs
from .parts import _plain_linear, linear_on_parts, sequential_on_parts

Tensor = torch.Tensor

#: Keys of the three classifiers ``clf_audio_fc``, ``clf_visual_fc``, ``clf_joint_fc`` that older
#: revisions of the official model built and never used. ``DMILModel.load_state_dict`` drops exactly
#: these keys, so old checkpoints load with ``strict=True``; no other key is touched.
LEGACY_STATE_DICT_KEYS = tuple(f"clf_{name}_fc.{p}" for name in ("audio", "visual", "joint")
                               for p in ("weight", "bias"))

#: Modules that stage 2 freezes (requires_grad False and eval mode), in the official order.
STAGE1_MODULES = ("visual_net", "audio_net", "embed_v", "embed_a", "IB_m1_tr", "IB_m1_ir", "IB_m2_tr",
                  "IB_m2_ir", "recon_1", "recon_2", "tr1_fc", "tr2_fc")

TRAIN_MODALITIES = ("both", "visual", "audio")

#: The fused ops the model's forward calls, and the backends they have (``"reference"`` everywhere,
#: ``"triton"`` on GPUs and under Triton's interpreter; no C++ or CUDA kernel).
MODEL_OPS = ("variational_bottleneck", "diagonal_gaussian_kl")
MODEL_BACKENDS = ("reference", "triton")


def model_backend(backend: Optional[str], device, dtype: torch.dtype = torch.float32) -> str:
    """The backend the model's ops run for ``dtype`` inputs on ``device`` when asked for ``backend``
    (``None``: ``DMIL_FAST_BACKEND``, else the automatic choice). Raises
    :class:`dmil_fast.ops.BackendUnavailableError`, with every backend's reason, when none can."""
    device = torch.device(device)
    chosen = {choose_backend(name, backend, device, dtype) for name in MODEL_OPS}
    return chosen.pop() if len(chosen) == 1 else "/".join(sorted(chosen))


@_assume_constant_result
def env_selects_reference() -> bool:
    """Whether ``DMIL_FAST_BACKEND`` asks for ``"reference"`` (unset or empty: no), read as the ops'
    backend choice reads it; under torch.compile it is read once, while tracing, as that choice is."""
    return requested_backend(None) == "reference"


def check_stage(stage) -> int:
    """``stage`` as a plain int, refusing anything but the integers 1, 2 and 3 (bools and floats too)."""
    if isinstance(stage, bool) or not isinstance(stage, numbers.Integral):
        raise ValueError(f"stage must be 1, 2 or 3 (an int), got {stage!r} of type {type(stage).__name__}")
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    return int(stage)


class CrossModality(nn.Module):
    """Synergy latent from [x1, x2, x1 * x2] (x1, x2: (B, E)) -> (B, E).

    ``hidden == 0`` (the default) is the official module: ``fc_out`` = Linear(3E, E). ``hidden > 0``
    is an optional larger module, not the published architecture: ``fc_hidden`` = Linear(3E, H),
    ReLU, ``fc_out`` = Linear(H, E) (its state_dict adds ``fc_hidden.*`` and ``fc_out.weight`` is
    (E, H)).
    """

    def __init__(self, embed_size: int, *, hidden: int = 0, device=None, dtype=None):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden must be an int >= 0, got {hidden!r}")
        self.embed_size, self.hidden = embed_size, hidden
        if hidden:
            self.fc_hidden = nn.Linear(3 * embed_size, hidden, device=device, dtype=dtype)
        self.fc_out = nn.Linear(hidden or 3 * embed_size, embed_size, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"embed_size={self.embed_size}, hidden={self.hidden}"

    def forward(self, x1: Tensor, x2: Tensor, *, split: bool = False) -> Tensor:
        """``split``: run the first layer on the parts of [x1, x2, x1 * x2] (:func:`linear_on_parts`:
        the same values and gradients, and no (B, 3E) copy kept for the backward) where x1 and x2
        require grad, so that the product's backward keeps them anyway, and that layer is a plain
        ``nn.Linear`` without hooks. (With inputs that need no grad, as from stage 2's frozen heads,
        the parts would be kept for this layer alone, and may be views of larger tensors.)"""
        parts = (x1, x2, x1 * x2)
        first = self.fc_hidden if self.hidden else self.fc_out
        if split and x1.requires_grad and x2.requires_grad and _plain_linear(first):
            h = linear_on_parts(first, parts)
        else:
            h = first(torch.cat(parts, dim=1))  # (B, H) or (B, E)
        return self.fc_out(F.relu(h)) if self.hidden else h  # (B, E)


def _recon_net(embed_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * embed_size, embed_size // 2), nn.ReLU(),
                         nn.Linear(embed_size // 2, embed_size))


class DMILModel(nn.Module):
    """Decomposition-based multimodal interaction learning (DESIGN section 1), drop-in.

    Same constructor, submodule and parameter names as the official ``DMILModel`` (its
    state_dict loads here with ``strict=True`` and ours there), same ``configure_stage``, same
    ``forward(visual, audio, train_modality='both')`` and output keys:

    - stage 1: ``v_out``, ``a_out`` (B, C) logits of z_tr; ``out`` = their mean;
      ``loss_IB`` (v, a) = KL_tr + KL_ir per modality; ``loss_rec_input`` (v, a).
    - stages 2 and 3: ``out`` (gated), ``out_synergy``, ``out_red``, ``out_unique`` (1, 2),
      ``loss_inter`` (1, 2), ``loss_rec_tr`` (1, 2), ``loss_uni`` (1, 2), ``loss_red``,
      ``gate_weights`` (B, 4) in the order (U1, U2, R, S), ``v_out``, ``a_out`` (stage 2: the
      classifiers on the means mu_tr; stage 3: on the samples z_tr); stage 3 also ``loss_IB``
      and ``loss_rec_input``.

    Every loss value is a (1,) tensor. Every KL is unweighted (the mean KL of DESIGN section 1),
    as the official model returns it; all weighting lives in the objective
    (:func:`dmil_fast.train.dmil_loss`).

    The official model's other public methods are here too, for code that calls them: ``get_loss``
    (a sample and its KL), and the stages on embeddings ``train_stage_1_vib(v, a,
    train_modality)``, ``train_stage_2_decomposition_routing(v, a)`` and
    ``train_stage_3_joint_finetune(v, a)`` (v, a: the (B, E) outputs of ``embed_v`` / ``embed_a``).

    Older checkpoints: revisions of the official model before the current one also built three
    unused classifiers ``clf_audio_fc``, ``clf_visual_fc`` and ``clf_joint_fc``. Their keys
    (:data:`LEGACY_STATE_DICT_KEYS`) are dropped on load, so such a state_dict loads here with
    ``strict=True`` too (also when this model is a submodule); any other unexpected key is still an
    error. A state_dict of this model lacks those keys, so it loads into such an older official
    model only with ``strict=False``. Those revisions also scaled every KL output by 0.1 and
    paired it with ``lamb: 0.2`` in their config; the current config ``lamb: 0.02`` gives the same
    objective with the unweighted KLs (see :class:`dmil_fast.train.DMILConfig`).

    Args:
        video_model, audio_model: encoders returning (B, input_size) features or
            (B*T, input_size, H, W) maps; ``None`` means the inputs already are features.
        embed_size: E. num_class: C. input_size: the encoders' output width.
        method: accepted for compatibility (the official config object); not required, not used.
        stage: 1, 2 or 3; the constructor applies ``configure_stage(stage)``.
        backend: ``None`` takes ``DMIL_FAST_BACKEND`` (read at each forward) and otherwise lets the
            fused ops choose by device; ``"reference"``, given here or by ``DMIL_FAST_BACKEND``,
            runs plain PyTorch drawing eps with ``torch.randn_like`` in the official order, so with
            the same torch seed (and weights) it reproduces the official model; any other name of
            ``MODEL_BACKENDS`` (``"triton"``) is forwarded to the ops; :meth:`check_backend` says,
            before a forward, whether it can run on a device.
        synergy_hidden: 0 (default) builds the published synergy module ``cross_modality``
            (Linear(3E, E)); H > 0 an optional larger one with a hidden layer of width H (see
            :class:`CrossModality`; its state_dict then differs from the official one).
        recompute: fused path, where the heads' op runs its Triton backend (the GPU path): the
            variational heads' projections h = x W^T + b are rebuilt in the backward (one more
            GEMM per head group and step) instead of being kept, and the parts of them that later
            layers use are copied out. At B = 4096, E = 256 this
            keeps 32 / 16 / 40 MiB less for the backward in stages 1 / 2 / 3, counted by
            ``benchmarks/activation_memory.py``. ``False`` keeps the projections (less
            compute, more memory). Values and gradients are the same either way.

    Differences from the official code: nothing is printed; ``train()`` keeps the stage-1
    modules in eval mode while ``stage == 2``; leaving stage 2 through ``configure_stage`` puts
    them back in the model's current mode; the constructor validates ``stage`` and applies it;
    pooled (B, D) encoder outputs are accepted besides 4-D maps. For a smaller activation
    memory, the fused path (any backend but ``"reference"``) runs the first layers of
    ``gating_network`` and ``recon_tr_1``/``recon_tr_2`` on the parts of their concatenated
    input, and ``cross_modality``'s first layer on [z_ir1, z_ir2, z_ir1 * z_ir2]
    (:func:`sequential_on_parts`, :class:`CrossModality`; the same values and gradients; a module
    is called on the concatenation instead when it carries hooks or is not a plain
    ``nn.Linear``/``nn.Sequential``), and copies the stage-2 means mu_tr out of the frozen heads' projections
    (see also ``recompute``).
    """

    def __init__(self, video_model: Optional[nn.Module], audio_model: Optional[nn.Module],
                 embed_size: int = 512, num_class: int = 101, method=None, stage: int = 1,
                 input_size: int = 512, *, backend: Optional[str] = None, synergy_hidden: int = 0,
                 recompute: bool = True):
        super().__init__()
        if not isinstance(recompute, bool):
            raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
        if backend is not None and backend not in MODEL_BACKENDS:
            why = (f" (the model's ops, {' and '.join(MODEL_OPS)}, have no {backend} kernel)"
                   if backend in BACKENDS else "")
            raise ValueError(f"backend must be None or one of {MODEL_BACKENDS}, got {backend!r}{why}")
        for name, value in (("embed_size", embed_size), ("num_class", num_class), ("input_size", input_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_size < 2:
            raise ValueError(f"embed_size must be at least 2 (the reconstruction MLPs use E // 2), got {embed_size}")
        if isinstance(synergy_hidden, bool) or not isinstance(synergy_hidden, int) or synergy_hidden < 0:
            raise ValueError(f"synergy_hidden must be an int >= 0, got {synergy_hidden!r}")
        E = embed_size
        self.backend = backend
        self.method_name = getattr(method, "method_name", None)
        # Construction order follows the official model, so one torch seed gives both the same init.
        self.audio_net = audio_model if audio_model is not None else nn.Identity()
        self.visual_net = video_model if video_model is not None else nn.Identity()
        self.embed_size = E
        self.num_class = num_class
        self.input_size = input_size
        self.synergy_hidden = synergy_hidden
        self.recompute = recompute
        self.stage = None  # set by configure_stage below
        self.embed_v = nn.Linear(input_size, E)
        self.embed_a = nn.Linear(input_size, E)
        self.IB_m1_tr = VariationalBottleneck(E, E)
        self.IB_m1_ir = VariationalBottleneck(E, E)
        self.IB_m2_tr = VariationalBottleneck(E, E)
        self.IB_m2_ir = VariationalBottleneck(E, E)
        self.IB_redundancy = VariationalBottleneck(2 * E, E)
        self.IB_m1_r = VariationalBottleneck(E, E)
        self.IB_m2_r = VariationalBottleneck(E, E)
        self.IB_m1_unique = VariationalBottleneck(E, E)
        self.IB_m2_unique = VariationalBottleneck(E, E)
        self.cross_modality = CrossModality(E, hidden=synergy_hidden)
        self.recon_1 = _recon_net(E)
        self.recon_2 = _recon_net(E)
        self.recon_tr_1 = _recon_net(E)
        self.recon_tr_2 = _recon_net(E)
        self.tr1_fc = nn.Linear(E, num_class)
        self.tr2_fc = nn.Linear(E, num_class)
        self.red_fc = nn.Linear(E, num_class)
        self.unique1_fc = nn.Linear(E, num_class)
        self.unique2_fc = nn.Linear(E, num_class)
        self.synergy_fc = nn.Linear(E, num_class)
        self.gating_network = nn.Sequential(nn.Linear(4 * E, E), nn.ReLU(), nn.Linear(E, 4), nn.Softmax(dim=1))
        self.configure_stage(stage)

    # ------------------------------------------------------------ stage control

    def extra_repr(self) -> str:
        return (f"embed_size={self.embed_size}, num_class={self.num_class}, stage={self.stage}, "
                f"backend={self.backend}, synergy_hidden={self.synergy_hidden}, recompute={self.recompute}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # ``state_dict`` is load_state_dict's own copy: popping here leaves the caller's dict intact.
        for key in LEGACY_STATE_DICT_KEYS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _stage1_modules(self):
        return [getattr(self, name) for name in STAGE1_MODULES]

    def configure_stage(self, stage: int) -> None:
        """Select the training stage and apply its freezing.

        Stage 2 freezes the encoders, embeddings and all stage-1 modules (``STAGE1_MODULES``):
        ``requires_grad=False`` and eval mode (so BatchNorm statistics stay fixed). Stages 1 and 3
        make them trainable again; leaving stage 2 also gives them the model's current mode.
        ``stage`` is an int (a numpy integer is stored as a plain int); bools and floats are refused.
        """
        stage = check_stage(stage)
        was_frozen = getattr(self, "stage", None) == 2
        self.stage = stage
        trainable = stage != 2
        for module in self._stage1_modules():
            for p in module.parameters():
                p.requires_grad_(trainable)
            if not trainable:
                module.eval()
            elif was_frozen:
                module.train(self.training)

    def train(self, mode: bool = True):
        """``nn.Module.train``, except that in stage 2 the frozen stage-1 modules stay in eval mode."""
        super().train(mode)
        if mode and self.stage == 2:
            for module in self._stage1_modules():
                module.eval()
        return self

    # ------------------------------------------------------------ forward

    @property
    def _reference(self) -> bool:
        """The plain-PyTorch path in the official draw order: ``backend="reference"``, or
        ``backend=None`` with ``DMIL_FAST_BACKEND=reference`` (the same choice, read at each call)."""
        if self.backend is None:
            return env_selects_reference()
        return self.backend == "reference"

    @property
    def _op_backend(self) -> Optional[str]:
        return None if self._reference else self.backend

    def check_backend(self, device=None, dtype: Optional[torch.dtype] = None) -> str:
        """The backend the model's ops will run for ``dtype`` inputs on ``device`` (defaults: the
        parameters' device, and the parameters' dtype, that of ``embed_v.weight``), found without
        running them. Raises
        :class:`dmil_fast.ops.BackendUnavailableError`, listing every backend with its reason, when
        the model's ``backend`` (or ``DMIL_FAST_BACKEND``) cannot run there, so that a training run
        can refuse before its first step."""
        if self._reference:
            return "reference"
        device = next(self.parameters()).device if device is None else device
        return model_backend(self._op_backend, device, self.embed_v.weight.dtype if dtype is None else dtype)

    def _recomputes(self, x: Tensor) -> bool:
        """Whether the heads' op will rebuild its projections in the backward for inputs like x:
        only its Triton backend does, so only then are views of them worth copying out."""
        if not self.recompute or self._reference:
            return False
        return variational_bottleneck_backend(x, self._op_backend) == "triton"

    def embed(self, visual: Tensor, audio: Tensor) -> Tuple[Tensor, Tensor]:
        """Encoders, (T, H, W) pooling and ``embed_v``/``embed_a``: -> e1, e2 of shape (B, E)."""
        v, a = encode_inputs(self, visual, audio)
        return self.embed_v(v), self.embed_a(a)

    def forward(self, visual: Tensor, audio: Tensor, train_modality: str = "both") -> Dict[str, object]:
        """visual, audio: encoder inputs with the same batch size B -> dict of outputs (class docstring).

        ``train_modality`` ('both', 'visual' or 'audio') selects the modalities of stage 1, as in
        the official code (one modality: ``v_out = a_out = out`` and the other's losses are 0);
        stages 2 and 3 ignore it.
        """
        if self.stage == 1 and train_modality not in TRAIN_MODALITIES:
            raise ValueError(f"train_modality must be one of {TRAIN_MODALITIES}, got {train_modality!r}")
        e1, e2 = self.embed(visual, audio)
        return self._run_stage(e1, e2, train_modality)

    def _run_stage(self, e1: Tensor, e2: Tensor, train_modality: str) -> Dict[str, object]:
        recompute = self._recomputes(e1)  # decided once per forward, for every head group
        if self.stage == 1:
            return self._stage1(e1, e2, train_modality, recompute)
        if self.stage == 2:
            return self._stage2(e1, e2, recompute)
        if self.stage == 3:
            return self._stage3(e1, e2, recompute)
        raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")

    def _first_level(self, pairs, *, draw: str, recompute: bool):
        return first_level(pairs, sample=self.training, reference=self._reference, draw=draw,
                           backend=self._op_backend, recompute=recompute)

    def _stage1(self, e1: Tensor, e2: Tensor, train_modality: str, recompute: bool) -> Dict[str, object]:
        branches = []
        if train_modality in ("both", "visual"):
            branches.append((e1, (self.IB_m1_tr, self.IB_m1_ir), self.recon_1, self.tr1_fc))
        if train_modality in ("both", "audio"):
            branches.append((e2, (self.IB_m2_tr, self.IB_m2_ir), self.recon_2, self.tr2_fc))
        pairs = self._first_level([(x, heads) for x, heads, _, _ in branches], draw="per_modality",
                                  recompute=recompute)
        results = []
        for (x, _, recon, clf), hp in zip(branches, pairs):
            rec = recon(hp.z_cat)  # [z_tr, z_ir]: (B, 2E) -> (B, E)
            kl = hp.kl[0].reshape(1) + hp.kl[1].reshape(1)
            results.append((clf(hp.z_tr), kl, recon_loss(x, rec, reference=self._reference)))
        if train_modality == "both":
            (v_out, kl_v, rec_v), (a_out, kl_a, rec_a) = results
            return {"v_out": v_out, "a_out": a_out, "out": (v_out + a_out) / 2,
                    "loss_IB": (kl_v, kl_a), "loss_rec_input": (rec_v, rec_a)}
        (logits, kl, rec), zero = results[0], e1.new_zeros(1)
        losses = ((kl, zero), (rec, zero)) if train_modality == "visual" else ((zero, kl), (zero, rec))
        return {"v_out": logits, "a_out": logits, "out": logits,
                "loss_IB": losses[0], "loss_rec_input": losses[1]}

    def _stage2(self, e1: Tensor, e2: Tensor, recompute: bool) -> Dict[str, object]:
        with torch.no_grad():  # stage-1 modules are frozen: no graph through them
            m1, m2 = self._first_level([(e1, (self.IB_m1_tr, self.IB_m1_ir)),
                                        (e2, (self.IB_m2_tr, self.IB_m2_ir))], draw="ir_only",
                                       recompute=recompute)
        mu_tr1, mu_tr2 = m1.mu_tr, m2.mu_tr
        if not self._reference:
            # Compact copies: the fused means are views of each head pair's whole (B, 4E)
            # projection, which the second level would otherwise keep alive for its backward.
            # (The reference path keeps the official layout: its GEMMs then round the same way.)
            mu_tr1, mu_tr2 = mu_tr1.contiguous(), mu_tr2.contiguous()
        outputs = self._second_level(mu_tr1, mu_tr2, m1.z_ir, m2.z_ir, recompute)
        outputs["v_out"] = self.tr1_fc(mu_tr1)
        outputs["a_out"] = self.tr2_fc(mu_tr2)
        return outputs

    def _stage3(self, e1: Tensor, e2: Tensor, recompute: bool) -> Dict[str, object]:
        m1, m2 = self._first_level([(e1, (self.IB_m1_tr, self.IB_m1_ir)),
                                    (e2, (self.IB_m2_tr, self.IB_m2_ir))], draw="tr_then_ir",
                                   recompute=recompute)
        rec_1 = self.recon_1(m1.z_cat)  # [z_tr1, z_ir1]: (B, 2E) -> (B, E)
        rec_2 = self.recon_2(m2.z_cat)
        mu_tr1, mu_tr2 = m1.mu_tr, m2.mu_tr
        if recompute:
            # Compact copies (differentiable): the fused first level then keeps no (B, 4E)
            # projection for the backward (it recomputes them), so these views would be all
            # that keeps them alive.
            mu_tr1, mu_tr2 = mu_tr1.contiguous(), mu_tr2.contiguous()
        outputs = self._second_level(mu_tr1, mu_tr2, m1.z_ir, m2.z_ir, recompute)
        ref = self._reference
        outputs.update({
            "v_out": self.tr1_fc(m1.z_tr),
            "a_out": self.tr2_fc(m2.z_tr),
            "loss_IB": (m1.kl[0].reshape(1) + m1.kl[1].reshape(1), m2.kl[0].reshape(1) + m2.kl[1].reshape(1)),
            "loss_rec_input": (recon_loss(e1, rec_1, reference=ref), recon_loss(e2, rec_2, reference=ref)),
        })
        return outputs

    def _second_level(self, mu_tr1: Tensor, mu_tr2: Tensor, z_ir1: Tensor, z_ir2: Tensor,
                      recompute: bool) -> Dict[str, object]:
        """Redundancy, uniqueness, synergy and gating on (B, E) inputs (DESIGN section 1, stage 2)."""
        ref, backend = self._reference, self._op_backend
        h = second_level(self, mu_tr1, mu_tr2, sample=self.training, reference=ref, backend=backend,
                         recompute=recompute)
        # The reference path concatenates as the official model does; the fused path runs the first
        # layer on the parts (sequential_on_parts, CrossModality(split=True)), so no (B, 2E), (B, 3E)
        # or (B, 4E) copy is kept for the backward: the parts are kept by the classifiers (and
        # x1 * x2's backward) anyway.
        # (B, 2E) -> (B, E)
        rec_tr_1 = sequential_on_parts(self.recon_tr_1, (h.z_red, h.z_unique_1), split=not ref)
        rec_tr_2 = sequential_on_parts(self.recon_tr_2, (h.z_red, h.z_unique_2), split=not ref)
        cross = self.cross_modality  # split where it is ours (a replaced module is called as it is)
        z_synergy = cross(z_ir1, z_ir2, split=not ref) if type(cross) is CrossModality else cross(z_ir1, z_ir2)
        out_red = self.red_fc(h.z_red)
        out_unique_1 = self.unique1_fc(h.z_unique_1)
        out_unique_2 = self.unique2_fc(h.z_unique_2)
        out_synergy = self.synergy_fc(z_synergy)
        gate = sequential_on_parts(self.gating_network, (h.z_unique_1, h.z_unique_2, h.z_red, z_synergy),
                                   split=not ref)  # (B, 4)
        out = (gate[:, 0:1] * out_unique_1 + gate[:, 1:2] * out_unique_2
               + gate[:, 2:3] * out_red + gate[:, 3:4] * out_synergy)
        return {
            "out": out,
            "out_synergy": out_synergy,
            "out_red": out_red,
            "out_unique": (out_unique_1, out_unique_2),
            "loss_inter": (align_kl(h, 1, reference=ref, backend=backend).reshape(1),
                           align_kl(h, 2, reference=ref, backend=backend).reshape(1)),
            "loss_rec_tr": (recon_loss(mu_tr1, rec_tr_1, reference=ref), recon_loss(mu_tr2, rec_tr_2, reference=ref)),
            "loss_uni": (h.kl_unique_1.reshape(1), h.kl_unique_2.reshape(1)),
            "loss_red": h.kl_red.reshape(1),
            "gate_weights": gate,
        }

    # ------------------------------------------------------------ the official model's methods

    def get_loss(self, z_mean: Tensor, z_log_var: Tensor, r_mean=0.0, r_log_var=0.0,
                 lamb: Optional[float] = None) -> Tuple[Tensor, Tensor]:
        """The official helper: ``(z, kl)`` with ``kl`` the unweighted KL(N(z_mean, exp(z_log_var)) ||
        N(r_mean, exp(r_log_var))), the mean over every element, of shape (1,), and ``z`` a sample
        z_mean + exp(z_log_var / 2) * eps in training mode, ``z_mean`` in eval mode. ``lamb``: the
        factor that older revisions of the official helper took (default 0.1 there) and multiplied
        the KL by; given, the KL is multiplied by it here too; left out, the KL is unweighted, as
        the current revision returns it.

        The priors are taken as ``dm.diagonal_gaussian_kl`` takes them (numbers or tensors). On the
        reference path eps is ``torch.randn_like(z_mean)``, the official draw; on the fused path it is
        drawn in the kernel (:func:`dmil_fast.ops.gaussian_sample`).
        """
        backend = "reference" if self._reference else self.backend
        kl = diagonal_gaussian_kl(z_mean, z_log_var, r_mean, r_log_var, backend=backend).reshape(1)
        if lamb is not None:
            if isinstance(lamb, bool) or not isinstance(lamb, numbers.Real) or not math.isfinite(lamb):
                raise TypeError(f"lamb must be a finite number (the KL's factor) or None, got {lamb!r}")
            kl = lamb * kl
        if not self.training:
            return z_mean, kl
        if self._reference:
            return z_mean + torch.exp(z_log_var / 2) * torch.randn_like(z_mean), kl
        return gaussian_sample(z_mean, z_log_var, backend=backend), kl

    def train_stage_1_vib(self, v: Tensor, a: Tensor, train_modality: str = "both") -> Dict[str, object]:
        """Stage 1 on embeddings v, a (B, E), the outputs of ``embed_v`` / ``embed_a``, whatever
        ``self.stage`` is: the official method, with the outputs of ``forward`` in stage 1."""
        if train_modality not in TRAIN_MODALITIES:
            raise ValueError(f"train_modality must be one of {TRAIN_MODALITIES}, got {train_modality!r}")
        check_embeddings(self, v, a)
        return self._stage1(v, a, train_modality, self._recomputes(v))

    def train_stage_2_decomposition_routing(self, v: Tensor, a: Tensor) -> Dict[str, object]:
        """Stage 2 on embeddings v, a (B, E), whatever ``self.stage`` is (the stage-1 modules run
        without gradients, in the mode they are in: ``configure_stage(2)`` puts them in eval mode)."""
        check_embeddings(self, v, a)
        return self._stage2(v, a, self._recomputes(v))

    def train_stage_3_joint_finetune(self, v: Tensor, a: Tensor) -> Dict[str, object]:
        """Stage 3 on embeddings v, a (B, E), whatever ``self.stage`` is."""
        check_embeddings(self, v, a)
        return self._stage3(v, a, self._recomputes(v))

    # ------------------------------------------------------------ analysis

    def interaction_outputs(self, visual: Tensor, audio: Tensor) -> Dict[str, Tensor]:
        """Logits and embeddings for per-sample interaction scoring (LSMI), eval semantics.

        The model runs in eval mode (no sampling, BatchNorm running statistics) for this call;
        each submodule's train/eval mode is restored afterwards. Gradients follow the caller's
        grad mode.

        Returns a dict of:
            logits_1: (B, C) ``tr1_fc(mu_tr1)``, the visual (modality-1) prediction.
            logits_2: (B, C) ``tr2_fc(mu_tr2)``, the audio (modality-2) prediction.
            logits_12: (B, C) the multimodal prediction ``out`` of the current stage (stages 2
                and 3: the gated mixture; stage 1: the mean of the two unimodal logits).
            embed_1, embed_2: (B, E) the embeddings after ``embed_v`` / ``embed_a``.
        """
        with eval_mode(self):
            e1, e2 = self.embed(visual, audio)
            outputs = self._run_stage(e1, e2, "both")
        # In eval mode z = mu, so v_out / a_out are tr{1,2}_fc(mu_tr{1,2}) in every stage.
        return {"logits_1": outputs["v_out"], "logits_2": outputs["a_out"], "logits_12": outputs["out"],
                "embed_1": e1, "embed_2": e2}
