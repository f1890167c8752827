"""Training objectives: DMIL's three stage losses (DESIGN section 1) and the baselines'."""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels import accumulation_dtype
from ..ops._validate import values_checked
from .config import DMILConfig

Tensor = torch.Tensor
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
_MEAN = 1  # ATen's reduction code for "mean"


def _log_probs(logits: Tensor) -> Tensor:
    """Log-softmax over classes in the accumulation dtype: the forward's, recomputed in the backward."""
    return torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)), dim=1)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (B, C) logits that keeps only the logits and labels for the backward.

    ``F.cross_entropy`` keeps its (B, C) log-softmax output; where the logits are kept anyway (DMIL's
    gate multiplies each part's logits, so autograd saves them), that is a second (B, C) array per
    loss. The backward here recomputes the log-softmax and then runs the same ATen backward ops as
    ``F.cross_entropy`` on it (so the gradient is the same, bit for bit); those ops are
    differentiable, so double backward works too.
    """

    generate_vmap_rule = True  # torch.func transforms see through it

    @staticmethod
    def forward(logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        log_probs = _log_probs(logits)
        return torch.ops.aten.nll_loss_forward(log_probs, labels, None, _MEAN, IGNORE_INDEX)  # loss, total_weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels = inputs
        total_weight = output[1]  # () how many labels count
        ctx.mark_non_differentiable(total_weight)
        ctx.save_for_backward(logits, labels, total_weight)

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_total_weight: Optional[Tensor] = None):
        logits, labels, total_weight = ctx.saved_tensors
        log_probs = _log_probs(logits)
        grad_log_probs = torch.ops.aten.nll_loss_backward(grad, log_probs, labels, None, _MEAN, IGNORE_INDEX,
                                                          total_weight)
        grad_logits = torch.ops.aten._log_softmax_backward_data(grad_log_probs, log_probs, 1, log_probs.dtype)
        return grad_logits.to(logits.dtype), None


def lean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``F.cross_entropy(logits, labels)`` (mean over the labels that are not -100) for (B, C) logits
    and (B,) integer labels that keeps the logits for the backward instead of a (B, C) log-softmax
    (see :class:`_CrossEntropy`): less memory where the logits are kept anyway, one more log-softmax
    in the backward. Value and gradient equal ``F.cross_entropy``'s bit for bit for float32 and
    float64 logits; bfloat16/float16 logits are reduced in float32 (as autocast does for
    ``F.cross_entropy``) and the loss is float32. Other inputs (class-probability targets, other
    ranks, label dtypes other than int64/uint8) go to ``F.cross_entropy`` unchanged, which accepts
    or rejects them as it does.
    """
    if not (isinstance(logits, Tensor) and isinstance(labels, Tensor) and logits.dim() == 2
            and labels.dim() == 1 and labels.dtype in (torch.int64, torch.uint8)
            and logits.is_floating_point()):
        return F.cross_entropy(logits, labels)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have one entry per row of logits ({logits.shape[0]}), "
                         f"got shape {tuple(labels.shape)}")
    return _CrossEntropy.apply(logits, labels.long())[0]


_STAGE_1_KEYS = ("out", "v_out", "a_out", "loss_IB", "loss_rec_input")
_STAGE_2_KEYS = ("out", "loss_red", "loss_inter", "loss_uni", "loss_rec_tr", "out_synergy", "out_red", "out_unique")
#: The outputs each stage's objective reads.
STAGE_KEYS = {1: _STAGE_1_KEYS, 2: _STAGE_2_KEYS, 3: _STAGE_1_KEYS + _STAGE_2_KEYS[1:]}


def _check_outputs(outputs: Mapping, labels: Tensor, keys: Tuple[str, ...], needed_by: str, hint: str) -> None:
    if not isinstance(outputs, Mapping):
        raise TypeError(f"outputs must be the dict the model's forward returns, got {type(outputs).__name__}")
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise KeyError(f"outputs lack {', '.join(map(repr, missing))}, which {needed_by} needs; {hint}")
    logits = outputs["out"]
    if isinstance(labels, Tensor) and labels.dtype.is_floating_point:  # class probabilities, as F.cross_entropy
        if labels.shape != logits.shape:
            raise ValueError(f"class-probability labels must have the shape of outputs['out'] "
                             f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
        return
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.uint8):
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        hint = "; convert them with labels.long()" if isinstance(labels, Tensor) and not (
            labels.dtype.is_complex or labels.dtype == torch.bool) else ""
        raise TypeError(f"labels must be int64 (or uint8) class indices, or float class probabilities "
                        f"(as F.cross_entropy takes), got {kind}{hint}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},) (one class index per row of "
                         f"outputs['out']), got {tuple(labels.shape)}")
    # The range is read where the ops read values (values_checked): always on the CPU, where it
    # costs no sync; on a GPU only under anomaly detection, since F.cross_entropy's device assert
    # is otherwise the only check there (the Trainer checks the labels when it loads the data).
    if labels.numel() and values_checked(labels.device, labels):
        low, high = (int(v) for v in torch.aminmax(labels))  # one pass over the labels
        if low < 0 or high >= logits.shape[-1]:
            raise ValueError(f"labels must lie in [0, C) = [0, {logits.shape[-1]}) (C: the columns of "
                             f"outputs['out']), got values from {low} to {high}")


def _pair(outputs: Mapping, key: str) -> Tuple[Tensor, Tensor]:
    first, second = outputs[key]
    return first.sum(), second.sum()  # (1,) -> (), as the official trainer's torch.sum


CrossEntropy = Callable[[Tensor, Tensor], Tensor]


def dmil_loss(outputs: Mapping[str, object], labels: Tensor, *, stage: int, config: DMILConfig,
              cross_entropy: Optional[CrossEntropy] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The official trainer's objective of ``stage`` (DESIGN section 1) applied to the model's outputs.

    The KL outputs (``loss_IB``, ``loss_red``, ``loss_uni``, ``loss_inter``) are the unweighted
    mean KLs, as the current official model returns them; every weight is applied here (each (1,)
    value is summed to a scalar, as the official trainer's ``torch.sum`` does); reconstruction
    outputs likewise. CE is the mean cross-entropy over the batch. With ``lam = config.lamb``
    (0.02 in the published configuration) and the config's betas:

    - stage 1: ``beta_cls (ce_v + ce_a) + lam (stage1_visual_beta_kl kl_v + stage1_audio_beta_kl kl_a
      + 0.1 stage1_visual_beta_rec rec_v + 0.1 stage1_audio_beta_rec rec_a)``
    - stage 2: ``beta_cls ce_out + lam (stage2_beta_red red + stage2_beta_inter (inter_1 + inter_2)
      + stage2_beta_uni (uni_1 + uni_2) + 0.1 stage2_beta_rec_tr (rec_tr_1 + rec_tr_2))
      + 0.5 (ce_synergy + ce_red + ce_unique_1 + ce_unique_2)``
    - stage 3: ``beta_cls ce_out + stage3_beta_cls_stage1 (ce_v + ce_a)
      + lam stage3_beta_kl_stage1 (kl_v + kl_a) + 0.05 lam stage3_beta_rec_stage1 (rec_v + rec_a)
      + lam (stage3_beta_red red + stage3_beta_inter (inter_1 + inter_2) + stage3_beta_uni (uni_1 + uni_2)
      + 0.05 stage3_beta_rec_tr (rec_tr_1 + rec_tr_2)) + 0.8 (ce_synergy + ce_red + ce_unique_1 + ce_unique_2)``

    where ``ce_out``/``ce_v``/``ce_a``/``ce_synergy``/``ce_red``/``ce_unique_m`` are the CEs of
    ``out``/``v_out``/``a_out``/``out_synergy``/``out_red``/``out_unique[m-1]``, ``kl_v, kl_a`` =
    ``loss_IB``, ``rec_v, rec_a`` = ``loss_rec_input``, ``red`` = ``loss_red``, ``inter_m`` =
    ``loss_inter``, ``uni_m`` = ``loss_uni``, ``rec_tr_m`` = ``loss_rec_tr``.

    Args:
        outputs: the dict of :class:`dmil_fast.nn.DMILModel` (or the official model) for ``stage``.
        labels: (B,) int64 class indices.
        stage: 1, 2 or 3.
        config: the betas and ``lamb``.
        cross_entropy: ``(logits, labels) -> mean CE`` for every term. By default
            ``F.cross_entropy``, the official trainer's op, except for the four parts' logits of
            stages 2 and 3 (``ce_synergy``, ``ce_red``, ``ce_unique_m``): the gate keeps those for
            its backward anyway, so they get :func:`lean_cross_entropy` (the same values and
            gradients) and no (B, C) log-softmax is kept beside them.

    Returns:
        total: () the weighted sum above; parts: the unweighted terms named above, detached,
        plus ``ce_out`` in every stage (it enters the total in stages 2 and 3 only).
    """
    if stage not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    if not isinstance(config, DMILConfig) and not hasattr(config, "lamb"):
        raise TypeError(f"config must be a DMILConfig (its betas and lamb weight the terms), got "
                        f"{type(config).__name__}")
    _check_outputs(outputs, labels, STAGE_KEYS[stage], f"the stage-{stage} objective",
                   f"pass the dict DMILModel.forward returns in stage {stage} (model.configure_stage({stage}))")
    c, lam = config, config.lamb
    ce, ce_parts = (F.cross_entropy, lean_cross_entropy) if cross_entropy is None else (cross_entropy,) * 2
    parts: Dict[str, Tensor] = {"ce_out": ce(outputs["out"], labels)}
    if stage in (1, 3):
        parts["ce_v"] = ce(outputs["v_out"], labels)
        parts["ce_a"] = ce(outputs["a_out"], labels)
        parts["kl_v"], parts["kl_a"] = _pair(outputs, "loss_IB")
        parts["rec_v"], parts["rec_a"] = _pair(outputs, "loss_rec_input")
    if stage in (2, 3):
        parts["red"] = outputs["loss_red"].sum()
        parts["inter_1"], parts["inter_2"] = _pair(outputs, "loss_inter")
        parts["uni_1"], parts["uni_2"] = _pair(outputs, "loss_uni")
        parts["rec_tr_1"], parts["rec_tr_2"] = _pair(outputs, "loss_rec_tr")
        parts["ce_synergy"] = ce_parts(outputs["out_synergy"], labels)
        parts["ce_red"] = ce_parts(outputs["out_red"], labels)
        parts["ce_unique_1"] = ce_parts(outputs["out_unique"][0], labels)
        parts["ce_unique_2"] = ce_parts(outputs["out_unique"][1], labels)
    p = parts
    if stage == 1:
        total = c.beta_cls * (p["ce_v"] + p["ce_a"]) + lam * (
            c.stage1_visual_beta_kl * p["kl_v"] + c.stage1_audio_beta_kl * p["kl_a"]
            + 0.1 * c.stage1_visual_beta_rec * p["rec_v"] + 0.1 * c.stage1_audio_beta_rec * p["rec_a"])
    else:
        components = p["ce_synergy"] + p["ce_red"] + p["ce_unique_1"] + p["ce_unique_2"]
        inter, uni, rec_tr = p["inter_1"] + p["inter_2"], p["uni_1"] + p["uni_2"], p["rec_tr_1"] + p["rec_tr_2"]
        if stage == 2:
            total = c.beta_cls * p["ce_out"] + lam * (
                c.stage2_beta_red * p["red"] + c.stage2_beta_inter * inter + c.stage2_beta_uni * uni
                + 0.1 * c.stage2_beta_rec_tr * rec_tr) + 0.5 * components
        else:
            total = (c.beta_cls * p["ce_out"] + c.stage3_beta_cls_stage1 * (p["ce_v"] + p["ce_a"])
                     + lam * c.stage3_beta_kl_stage1 * (p["kl_v"] + p["kl_a"])
                     + 0.05 * lam * c.stage3_beta_rec_stage1 * (p["rec_v"] + p["rec_a"])
                     + lam * (c.stage3_beta_red * p["red"] + c.stage3_beta_inter * inter
                              + c.stage3_beta_uni * uni + 0.05 * c.stage3_beta_rec_tr * rec_tr)
                     + 0.8 * components)
    return total, {k: v.detach() for k, v in parts.items()}


def baseline_loss(outputs: Mapping[str, Tensor], labels: Tensor, *, method: str) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Objective of the baselines (:mod:`dmil_fast.nn.baselines`).

    - ``"joint"``: ``ce_out + ce_v + ce_a``; ``v_out``/``a_out`` are linear probes on detached
      embeddings, so their terms train the probes only.
    - ``"ensemble"``: ``ce_v + ce_a``, i.e. each unimodal classifier on its own (the branches
      share no parameter). ``out`` (log of averaged probabilities) is not trained.

    Returns (total, parts) with parts ``ce_out``, ``ce_v``, ``ce_a`` detached.
    """
    if method not in ("joint", "ensemble"):
        raise ValueError(f"method must be 'joint' or 'ensemble', got {method!r}")
    _check_outputs(outputs, labels, ("out", "v_out", "a_out"), f"the {method} objective",
                   "pass the dict the baseline model's forward returns")
    parts = {"ce_out": F.cross_entropy(outputs["out"], labels),
             "ce_v": F.cross_entropy(outputs["v_out"], labels),
             "ce_a": F.cross_entropy(outputs["a_out"], labels)}
    total = parts["ce_v"] + parts["ce_a"]
    if method == "joint":
        total = total + parts["ce_out"]
    return total, {k: v.detach() for k, v in parts.items()}
