"""interaction_scores: per-sample pointwise interaction decomposition (LSMI or MMI redundancy).

Backends: ``reference`` (PyTorch, any float dtype and device), ``cpp`` (fused C++ kernel for
float32/float64 CPU tensors), ``cuda`` (fused CUDA kernel for float16/bfloat16/float32/float64,
float accumulation below float64), ``triton`` (float16/bfloat16/float32 on CUDA, float16/float32/
float64 on CPU under TRITON_INTERPRET=1, whose bfloat16 casts truncate). The C++ op
``torch.ops.dmil_fast.interaction_scores`` gets its fake (meta) kernel and autograd formula here;
its backward is the named op ``torch.ops.dmil_fast.interaction_scores_backward``. The Triton kernels are the custom ops
``dmil_fast::interaction_scores_triton{,_backward}`` with the same schemas (``custom_op`` rather
than ``triton_op``, as for the Gaussian ops: see ``dmil_fast/ops/gaussian_sample.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kernels import accumulation_dtype
from ..reference.interactions import InteractionScores, interaction_scores_ref
from ._dispatch import (
    OpBackends,
    choose_backend,
    cpp_device_reason,
    cuda_device_reason,
    dtype_reason,
    extension_status,
    register,
    triton_device_reason,
)
from ._validate import (FLOAT_DTYPES, NaNInputError, check_choice, check_fake_devices, check_no_nan, check_same_device,
                        check_same_dtype, check_tensor, values_checked)

__all__ = ["interaction_scores", "adjust_interactions", "InteractionScores"]

_NAME = "interaction_scores"
_OP = "dmil_fast::interaction_scores"
_OP_BACKWARD = "dmil_fast::interaction_scores_backward"
_REDUNDANCY_CODES = {"lsmi": 0, "mmi": 1}
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_CPP_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = FLOAT_DTYPES
_TRITON_DTYPES_CPU = (torch.float16, torch.float32, torch.float64)  # no bf16: see gaussian_sample.py
_TRITON_DTYPES_CUDA = (torch.float16, torch.bfloat16, torch.float32)
_INTERACTION_FIELDS = ("redundancy", "unique_1", "unique_2", "synergy")


def _op_reason() -> Optional[str]:
    """``None`` when the C++ op is registered, else why it is not."""
    reason = extension_status()
    if reason is not None:
        return reason
    if not hasattr(torch.ops.dmil_fast, _NAME):
        return "dmil_fast._C has no interaction_scores op (rebuild the extension)"
    return None


def _cpp_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return (cpp_device_reason(_NAME, device, has_cpp=True) or _op_reason()
            or dtype_reason(dtype, device, _CPP_DTYPES, _CUDA_DTYPES))


def _cuda_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return (cuda_device_reason(_NAME, device, has_cuda=True) or _op_reason()
            or dtype_reason(dtype, device, _CPP_DTYPES, _CUDA_DTYPES))


def _triton_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return triton_device_reason(device) or dtype_reason(dtype, device, _TRITON_DTYPES_CPU,
                                                        _TRITON_DTYPES_CUDA)


BACKENDS = register(OpBackends(_NAME, {
    "reference": lambda device, dtype: None,
    "triton": _triton_reason,
    "cpp": _cpp_reason,
    "cuda": _cuda_reason,
}))


# ---- torch.library glue: fake kernels and autograd of the fused ops ---------------------------

def _fake_forward(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2, log_prior,
                  redundancy, save_lse=True):
    check_fake_devices("interaction_scores", logits_1=logits_1, logits_2=logits_2, logits_12=logits_12, labels=labels,
                       entropy_1=entropy_1, entropy_2=entropy_2, log_prior=log_prior)
    batch = logits_1.shape[0]
    scores = logits_1.new_empty((batch, 7))
    # max + log-sum, exact in float64; none for a forward without a backward
    lse = logits_1.new_empty((batch if save_lse else 0, 3), dtype=torch.float64)
    return scores, lse


def _fake_backward(grad_scores, scores, lse, logits_1, logits_2, logits_12, labels, entropy_1,
                   entropy_2, redundancy):
    check_fake_devices("interaction_scores_backward", grad_scores=grad_scores, scores=scores, lse=lse,
                       logits_1=logits_1, logits_2=logits_2, logits_12=logits_12, labels=labels,
                       entropy_1=entropy_1, entropy_2=entropy_2)
    grad_entropy = logits_1.new_empty((logits_1.shape[0], 2), dtype=accumulation_dtype(logits_1.dtype))
    return (torch.empty_like(logits_1, memory_format=torch.contiguous_format),
            torch.empty_like(logits_2, memory_format=torch.contiguous_format),
            torch.empty_like(logits_12, memory_format=torch.contiguous_format),
            grad_entropy)


def _setup_context(ctx, inputs, output):
    logits_1, logits_2, logits_12, labels, entropy_1, entropy_2, _log_prior, redundancy = inputs[:8]
    scores, lse = output
    ctx.save_for_backward(scores, lse, logits_1, logits_2, logits_12, labels, entropy_1,
                          entropy_2)
    ctx.redundancy = redundancy
    ctx.mark_non_differentiable(lse)


def _backward_through(backward_op):
    """The autograd backward of a fused forward op, calling its named backward op."""

    def backward(ctx, grad_scores, _grad_lse):
        scores, lse, logits_1, logits_2, logits_12, labels, entropy_1, entropy_2 = ctx.saved_tensors
        g1, g2, g12, g_entropy = backward_op(grad_scores, scores, lse, logits_1, logits_2,
                                             logits_12, labels, entropy_1, entropy_2,
                                             ctx.redundancy)
        g_e1 = g_entropy[:, 0] if entropy_1 is not None else None
        g_e2 = g_entropy[:, 1] if entropy_2 is not None else None
        return g1, g2, g12, None, g_e1, g_e2, None, None

    return backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError(f"{_OP_BACKWARD} has no derivative: the fused interaction_scores backends are "
                       "differentiable once (use backend='reference' for higher-order gradients)")


def _register_library_glue() -> None:
    """Fake kernels and autograd for the C++ ops; nothing when the extension is missing."""
    if _op_reason() is not None:
        return
    torch.library.register_fake(_OP)(_fake_forward)
    torch.library.register_fake(_OP_BACKWARD)(_fake_backward)
    torch.library.register_autograd(
        _OP, _backward_through(torch.ops.dmil_fast.interaction_scores_backward),
        setup_context=_setup_context)
    # Without an autograd kernel of its own, the backward op would run under PyTorch's fallback,
    # which warns and then gives zero second derivatives: a second backward through it is refused.
    torch.library.register_autograd(_OP_BACKWARD, _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


_register_library_glue()


@torch.library.custom_op("dmil_fast::interaction_scores_triton", mutates_args=())
def _triton_forward(logits_1: torch.Tensor, logits_2: torch.Tensor, logits_12: torch.Tensor,
                    labels: torch.Tensor, entropy_1: Optional[torch.Tensor],
                    entropy_2: Optional[torch.Tensor], log_prior: Optional[torch.Tensor],
                    redundancy: int, save_lse: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.interaction_scores import interaction_scores_fwd

    return interaction_scores_fwd(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2,
                                  log_prior, redundancy, save_lse)


@torch.library.custom_op("dmil_fast::interaction_scores_triton_backward", mutates_args=())
def _triton_backward(grad_scores: torch.Tensor, scores: torch.Tensor, lse: torch.Tensor,
                     logits_1: torch.Tensor, logits_2: torch.Tensor, logits_12: torch.Tensor,
                     labels: torch.Tensor, entropy_1: Optional[torch.Tensor],
                     entropy_2: Optional[torch.Tensor], redundancy: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.interaction_scores import interaction_scores_bwd

    return interaction_scores_bwd(grad_scores, scores, lse, logits_1, logits_2, logits_12, labels,
                                  entropy_1, entropy_2, redundancy)


_triton_forward.register_fake(_fake_forward)
_triton_backward.register_fake(_fake_backward)
_triton_forward.register_autograd(_backward_through(_triton_backward),
                                  setup_context=_setup_context)


# ---- validation --------------------------------------------------------------------------------

def _check_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2, log_prior,
                redundancy) -> None:
    check_tensor("logits_1", logits_1, ndim=2)
    check_tensor("logits_2", logits_2, ndim=2)
    check_tensor("logits_12", logits_12, ndim=2)
    for name, value in (("logits_2", logits_2), ("logits_12", logits_12)):
        if value.shape != logits_1.shape:
            raise ValueError(f"{name} must have the shape of logits_1 (B, C) = "
                             f"{tuple(logits_1.shape)}, got {tuple(value.shape)}")
    check_same_dtype(logits_1=logits_1, logits_2=logits_2, logits_12=logits_12)
    batch, num_classes = logits_1.shape
    check_tensor("labels", labels, ndim=1, dtypes=_LABEL_DTYPES)
    if labels.shape[0] != batch:
        raise ValueError(f"labels must have length B = {batch} (the rows of logits_1), "
                         f"got shape {tuple(labels.shape)}")
    check_choice("redundancy", redundancy, tuple(_REDUNDANCY_CODES))
    for name, value in (("entropy_1", entropy_1), ("entropy_2", entropy_2)):
        if value is None:
            if redundancy == "lsmi":
                raise ValueError(f"redundancy='lsmi' needs {name}: pointwise entropies of shape "
                                 f"(B,) = ({batch},); pass them or use redundancy='mmi'")
            continue
        check_tensor(name, value, ndim=1)
        if value.shape[0] != batch:
            raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(value.shape)}")
    if log_prior is not None:
        check_tensor("log_prior", log_prior, ndim=1)
        if log_prior.shape[0] != num_classes:
            raise ValueError(f"log_prior must have shape (C,) = ({num_classes},), "
                             f"got {tuple(log_prior.shape)}")
    check_same_device(logits_1=logits_1, logits_2=logits_2, logits_12=logits_12, labels=labels,
                      entropy_1=entropy_1, entropy_2=entropy_2, log_prior=log_prior)


def _check_label_range(low: int, high: int, num_classes: int) -> None:
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, C) = [0, {num_classes}), got values from {low} to {high}")


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """The labels' range, before a backend that indexes with them (a host sync)."""
    if not torch.compiler.is_compiling() and labels.device.type != "meta":  # meta tensors hold no values
        low, high = torch.aminmax(labels)
        _check_label_range(int(low), int(high), num_classes)


def _check_outputs(scores: torch.Tensor, labels: Optional[torch.Tensor], num_classes: int,
                   **inputs: Optional[torch.Tensor]) -> None:
    """Raise when the scores or an input hold NaN, naming the input, and (``labels`` given: the
    CUDA kernels, which leave a row with a bad label NaN without reading through it) when a label
    is out of range. A NaN entropy can vanish in min(), so the (B,)/(C,) inputs are checked
    themselves; the logits only through the scores. One host sync, after the kernel is queued."""
    if torch.compiler.is_compiling() or scores.device.type == "meta":
        return
    # max() propagates NaN and costs a fraction of isnan().any() on large CPU tensors; all of
    # these tensors are non-empty (checked in _check_args).
    peaks = [scores.max()] + [inputs[name].max() for name in ("entropy_1", "entropy_2", "log_prior")
                              if inputs.get(name) is not None]
    nan_flag = torch.stack(peaks).isnan().any()
    if labels is None:
        any_nan = bool(nan_flag)
    else:  # the flag and the labels' range in one transfer
        stats = torch.cat([nan_flag.reshape(1).long(), torch.stack(torch.aminmax(labels)).long()])
        any_nan, low, high = stats.tolist()
        _check_label_range(low, high, num_classes)
    if not any_nan:
        return
    for name, value in inputs.items():
        if value is not None and bool(torch.isnan(value).any()):
            raise NaNInputError(name)
    infinite = [name for name in ("log_prior", "entropy_1", "entropy_2")
                if inputs.get(name) is not None and bool(torch.isinf(inputs[name]).any())]
    if infinite:  # e.g. a log_prior of -inf: a class of prior probability 0 at some sample's label
        raise ValueError(f"the scores are NaN: {' and '.join(infinite)} "
                         f"{'holds' if len(infinite) == 1 else 'hold'} infinities; expected finite values")
    raise ValueError("the scores are NaN although no input is: logits_1, logits_2 or logits_12 "
                     "hold infinities (+inf, or -inf at the label or over a whole row); expected "
                     "finite values")


# ---- public ops ----------------------------------------------------------------------------------

def _fused_op_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2, log_prior,
                  redundancy: str) -> tuple:
    """The fused ops' arguments (all but save_lse) for checked inputs: int64 labels, the
    entropies (LSMI only) and the log prior (not differentiated) in the accumulation dtype, the
    redundancy as its code."""
    acc = accumulation_dtype(logits_1.dtype)
    lsmi = redundancy == "lsmi"
    return (logits_1, logits_2, logits_12, labels.long(),
            entropy_1.to(acc) if lsmi else None, entropy_2.to(acc) if lsmi else None,
            log_prior.detach().to(acc) if log_prior is not None else None,
            _REDUNDANCY_CODES[redundancy])


def interaction_scores(logits_1: torch.Tensor, logits_2: torch.Tensor, logits_12: torch.Tensor,
                       labels: torch.Tensor, *, entropy_1: Optional[torch.Tensor] = None,
                       entropy_2: Optional[torch.Tensor] = None,
                       log_prior: Optional[torch.Tensor] = None, redundancy: str = "lsmi",
                       backend: Optional[str] = None) -> InteractionScores:
    """Per-sample interaction scores in nats.

    Args:
        logits_1, logits_2, logits_12: (B, C) classifier logits from modality 1, modality 2 and
            both; one floating dtype, any strides.
        labels: (B,) integer class indices in [0, C).
        entropy_1, entropy_2: (B,) pointwise entropies -log p(x_m) of a density model, any float
            dtype (used in the accumulation dtype); required for ``redundancy="lsmi"``, not used
            by ``"mmi"`` (but checked when given). Differentiable.
        log_prior: (C,) log class prior; default log(1/C). Not differentiated.
        redundancy: ``"lsmi"`` (r = min(h1, h2) - min(h1 - i1, h2 - i2)) or ``"mmi"``
            (r = min(i1, i2)); min takes its first argument on ties, and so does the gradient.
        backend: None (automatic), "reference", "cpp", "cuda" or "triton" (see
            ``python -m dmil_fast.info``).

    Returns:
        InteractionScores of (B,) tensors in the logits dtype (columns of one (B, 7) tensor for the
        fused backends): pmi_1, pmi_2, pmi_12, redundancy, unique_1, unique_2, synergy.
        Differentiable w.r.t. the three logits and both entropies.

    The fused backends keep each row's log-sum-exp in float64 for the backward (the float maximum
    plus the log-sum, exactly), so the gradients keep float32 accuracy at any offset of the logits,
    and re-decide the min branches from the pmis in the accumulation dtype (float16 and bfloat16
    scores, rounded, can tie where the forward's pmis did not). They are differentiable once: a
    second backward raises (the reference backend has higher derivatives). Their seven fields are
    views of one (B, 7) tensor: clone a field before changing it in place under autograd.
    Under ``torch.compile`` the checks that need the values (the labels' range, NaN) are left out
    of the graph: there a bad label raises a RuntimeError and NaN inputs give NaN scores.

    Equivalent PyTorch::

        i_k = log_softmax(logits_k.float(), -1).gather(-1, labels[:, None])[:, 0] - log_prior[labels]
        r = min(h1, h2) - min(h1 - i1, h2 - i2)          # or min(i1, i2)
        u1, u2 = i1 - r, i2 - r
        s = i12 - r - u1 - u2
    """
    _check_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2, log_prior, redundancy)
    choice = choose_backend(BACKENDS.name, backend, logits_1.device, logits_1.dtype)
    num_classes = logits_1.shape[1]
    nan_sources = dict(logits_1=logits_1, logits_2=logits_2, logits_12=logits_12,
                       entropy_1=entropy_1, entropy_2=entropy_2, log_prior=log_prior)
    # The reference and the C++ CPU kernel index with the labels, so their range is checked first;
    # the CUDA kernels (Triton's and ours) NaN a row with a bad label instead, so on the GPU the
    # check joins the NaN check after the launch: one host sync per call.
    labels_after = choice != "reference" and labels.device.type == "cuda"
    if not labels_after:
        _check_labels(labels, num_classes)
    if choice == "reference":
        out = interaction_scores_ref(
            logits_1, logits_2, logits_12, labels, entropy_1=entropy_1, entropy_2=entropy_2,
            log_prior=log_prior.detach() if log_prior is not None else None, redundancy=redundancy)
        _check_outputs(torch.stack(tuple(out)), None, num_classes, **nan_sources)
        return out
    fused = (torch.ops.dmil_fast.interaction_scores_triton if choice == "triton"
             else torch.ops.dmil_fast.interaction_scores)
    args = _fused_op_args(logits_1, logits_2, logits_12, labels, entropy_1, entropy_2, log_prior,
                         redundancy)
    h1, h2 = args[4:6]  # the entropies as the op takes them
    # The backward's log-sum-exps are written only when a backward can follow.
    save_lse = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (logits_1, logits_2, logits_12, h1, h2))
    scores, _ = fused(*args, save_lse)
    _check_outputs(scores, labels if labels_after else None, num_classes, **nan_sources)
    return InteractionScores(*scores.unbind(1))  # seven (B,) columns


def _shifted(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        return (x.float() + c.float()).to(x.dtype)
    return x + c.to(x.dtype)


def adjust_interactions(scores: InteractionScores) -> InteractionScores:
    """Dataset-level shift of per-sample scores (means taken over all of them, in float64).

    With means R, U1, U2, S: if R < 0 or S < 0, c = -min(R, S); elif U1 < 0 or U2 < 0,
    c = min(U1, U2); else c = 0. Returns the scores with r + c, s + c, u1 - c, u2 - c
    (pmi fields unchanged); c is a constant for autograd.

    Args:
        scores: InteractionScores whose redundancy, unique_1, unique_2 and synergy are (B,)
            floating tensors, B >= 1, on one device, without NaN.

    A NaN in one of those four fields raises :class:`NaNInputError` naming it (``scores.synergy``)
    on CPU tensors, as the Gaussian ops check theirs (on GPU tensors only under anomaly detection;
    never under ``torch.compile``, torch.func transforms, fake or meta tensors). The pmi fields are
    passed through unread.
    """
    if not isinstance(scores, InteractionScores):
        raise TypeError(f"scores must be an InteractionScores (from interaction_scores), "
                        f"got {type(scores).__name__}")
    ref = check_tensor("scores.redundancy", scores.redundancy, ndim=1)
    for name in _INTERACTION_FIELDS[1:]:
        value = check_tensor(f"scores.{name}", getattr(scores, name), ndim=1)
        if value.shape != ref.shape:
            raise ValueError(f"scores.{name} must have the shape of scores.redundancy "
                             f"{tuple(ref.shape)}, got {tuple(value.shape)}")
    fields = {f"scores.{n}": getattr(scores, n) for n in _INTERACTION_FIELDS}
    device = check_same_device(**fields)
    if values_checked(device, *fields.values()):  # a NaN mean would NaN the shift of every row, or skip it
        check_no_nan(**fields)
    r, u1, u2, s = (getattr(scores, n).detach().double().mean() for n in _INTERACTION_FIELDS)
    c = torch.where((r < 0) | (s < 0), -torch.minimum(r, s),
                    torch.where((u1 < 0) | (u2 < 0), torch.minimum(u1, u2), torch.zeros_like(r)))
    return scores._replace(
        redundancy=_shifted(scores.redundancy, c),
        synergy=_shifted(scores.synergy, c),
        unique_1=_shifted(scores.unique_1, -c),
        unique_2=_shifted(scores.unique_2, -c),
    )
