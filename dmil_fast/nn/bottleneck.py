"""Variational bottleneck ("Gaussian head"): one Linear(in -> 2E) split into (mu, logvar)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops


class VariationalBottleneck(nn.Module):
    """Drop-in for the official ``VariationalBottleneck(input_size=512, embed_size=512)``:
    ``fc = Linear(input_size, 2 * embed_size)``.

    Parameters (state_dict keys): ``fc.weight`` (2E, D), ``fc.bias`` (2E,), identical to the
    official module, so checkpoints load both ways with ``strict=True``.

    Args:
        input_size: D, width of the input.
        embed_size: E, width of the latent.
        lamb: ignored. Older revisions of the official code took ``lamb`` (a KL factor that the
            module itself never applied); it is still accepted as a keyword, so
            ``VariationalBottleneck(lamb=0.1, input_size=..., embed_size=...)`` call sites keep
            working, and it changes nothing. The KL is always unweighted: loss weights belong to
            the training objective (:func:`dmil_fast.train.dmil_loss`). The old positional form
            ``VariationalBottleneck(0.1, 512, 512)`` is refused (it would read 0.1 as the input size).

    ``forward(x)`` returns ``(mu, logvar)``, each (B, E), like the official module.
    ``sample(x)`` runs the fused op and returns ``(z, mu, logvar, kl)``.
    """

    def __init__(self, input_size: int = 512, embed_size: int = 512, *, lamb: Optional[float] = None,
                 device=None, dtype=None):
        super().__init__()
        del lamb  # accepted for old call sites only (see the class docstring)
        for name, value in (("input_size", input_size), ("embed_size", embed_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.input_size = input_size
        self.embed_size = embed_size
        self.fc = nn.Linear(input_size, 2 * embed_size, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Linear`` (what the official module gets)."""
        self.fc.reset_parameters()

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, embed_size={self.embed_size}"

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (B, D) -> mu: (B, E), logvar: (B, E) (views of one (B, 2E) projection)."""
        h = self.fc(x)  # (B, 2E)
        return h[:, : self.embed_size], h[:, self.embed_size:]

    def sample(self, x: torch.Tensor, *, sample: Optional[bool] = None, seed: Optional[int] = None,
               backend: Optional[str] = None, recompute: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused projection, reparameterised sample and KL to N(0, I).

        Args:
            x: (B, D) floating tensor.
            sample: draw z = mu + exp(logvar / 2) * eps (True) or return z = mu (False);
                ``None`` (default) samples in training mode only, as the official model does.
            seed: seed of the op's own generator (``None``: drawn from torch's global RNG).
            backend, recompute: forwarded to :func:`dmil_fast.ops.variational_bottleneck`
                (recompute: rebuild the projection in the backward instead of keeping it).

        Returns:
            z, mu, logvar: (B, E); kl: () the mean over (B, E) of KL(q || N(0, I)), unweighted.

        Equivalent PyTorch::

            mu, logvar = self(x)
            z = mu + torch.exp(logvar / 2) * torch.randn_like(mu) if sample else mu
            kl = 0.5 * torch.mean(-logvar + logvar.exp() + mu ** 2 - 1)
        """
        if sample is None:
            sample = self.training
        return ops.variational_bottleneck(x, self.fc.weight, self.fc.bias, sample=sample, seed=seed,
                                          backend=backend, recompute=recompute)


def _check_heads(heads) -> None:
    if not heads:
        raise ValueError("heads must hold at least one VariationalBottleneck")
    first = heads[0]
    for i, head in enumerate(heads):
        if not isinstance(head, VariationalBottleneck):
            raise TypeError(f"heads[{i}] must be a VariationalBottleneck, got {type(head).__name__}")
        if head.input_size != first.input_size or head.embed_size != first.embed_size:
            raise ValueError(
                f"heads[{i}] has sizes ({head.input_size}, {head.embed_size}) but heads[0] has "
                f"({first.input_size}, {first.embed_size}); grouped heads must share both"
            )


def grouped_sample(x: torch.Tensor, heads, *, sample: bool, seed: Optional[int] = None,
                   backend: Optional[str] = None, recompute: bool = False):
    """Run several heads that read the same input as one fused op.

    The heads' weights are concatenated on the fly (head g owns rows [2E g, 2E (g + 1))), so
    gradients flow back to each head's own ``fc`` parameters.

    Args:
        x: (B, D); heads: sequence of G VariationalBottleneck with equal sizes.
        recompute: rebuild the (B, G*2E) projection in the backward instead of keeping it (see
            :func:`dmil_fast.ops.variational_bottleneck_grouped`).

    Returns:
        z, mu, logvar: (B, G, E); kl: (G,) each head's mean KL to N(0, I), unweighted.
    """
    _check_heads(heads)
    weight = torch.cat([h.fc.weight for h in heads], dim=0)  # (G*2E, D)
    bias = torch.cat([h.fc.bias for h in heads], dim=0)  # (G*2E,)
    return ops.variational_bottleneck_grouped(x, weight, bias, len(heads), sample=sample, seed=seed,
                                              backend=backend, recompute=recompute)

