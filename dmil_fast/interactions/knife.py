"""KNIFE: a kernel (Gaussian-mixture) density model giving pointwise entropies h(x) = -log p(x).

The density of ``x`` (D-dim) is a K-component mixture over standardised inputs
``x̃ = (x - loc) / scale`` (``loc``/``scale`` are buffers set from the training data):

    p(x)   = Σ_k w_k · N_k(x̃) / Π_d scale_d                       (change of variables)
    N_k(x̃) = (2π)^(-D/2) · exp(Σ_d s_kd) · exp(-½ ‖(I + L_k) diag(exp(s_kd)) (x̃ - m_k)‖²)

with per-component means m_k, log-scales s_k = b · tanh(θ_k) bounded to [-b, b] (b =
``log_scale_bound``), a strictly lower-triangular mixing matrix L_k (unit-triangular
transform, determinant 1, so any full covariance shape is reachable), and weights
w = softmax(π). ``exp(s_k)`` acts as an inverse scale, so each component's standard
deviation along a standardised axis lies within [e^-b, e^b] before mixing. The bound keeps
the density smooth: on nearly discrete inputs it does not collapse onto single points,
which keeps the pointwise entropies of equally likely inputs equal.

Training minimises the mean negative log-likelihood with Adam; gradients are zeroed before
every step (never accumulated across steps).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from ._inputs import positive_int, progress_bar, real_number


class KNIFE(nn.Module):
    """Gaussian-mixture density with full-covariance-like components.

    Args:
        dim: input dimension D.
        components: number of mixture components K.
        log_scale_bound: b, the bound of the tanh-squashed log inverse scales (a finite number > 0).

    ``log_prob(x)``: x (N, D) floating -> (N,) float64 for float64 inputs, else float32.
    ``forward(x)`` returns the pointwise entropies -log p(x), (N,).
    """

    def __init__(self, dim: int, components: int = 5, *, log_scale_bound: float = 1.0):
        super().__init__()
        dim = positive_int("dim", dim)
        components = positive_int("components", components)
        log_scale_bound = real_number("log_scale_bound", log_scale_bound, low=0, low_ok=False)
        self.dim = dim
        self.components = components
        self.log_scale_bound = log_scale_bound
        self.means = nn.Parameter(torch.empty(components, dim))
        self.raw_log_scales = nn.Parameter(torch.empty(components, dim))
        self.mixing = nn.Parameter(torch.empty(components, dim, dim))
        self.weight_logits = nn.Parameter(torch.empty(components))
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        with torch.no_grad():
            self.means.copy_(torch.randn(self.means.shape, generator=generator))
            self.raw_log_scales.zero_()
            self.mixing.zero_()
            self.weight_logits.zero_()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, components={self.components}, log_scale_bound={self.log_scale_bound}"

    # ------------------------------------------------------------------ density
    def log_scales(self) -> torch.Tensor:
        """(K, D) bounded log inverse scales s_k."""
        return self.log_scale_bound * torch.tanh(self.raw_log_scales)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) of the raw (unstandardised) input, x: (N, D) -> (N,)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        work = torch.promote_types(out_dtype, self.means.dtype)
        xs = (x.to(work) - self.loc.to(work)) / self.scale.to(work)          # (N, D)
        s = self.log_scales().to(work)                                      # (K, D)
        diff = (xs[:, None, :] - self.means.to(work)) * torch.exp(s)        # (N, K, D)
        tri = torch.tril(self.mixing.to(work), diagonal=-1)                 # (K, D, D)
        mixed = diff + torch.einsum("kde,nke->nkd", tri, diff)              # (N, K, D)
        log_w = torch.log_softmax(self.weight_logits.to(work), dim=0)       # (K,)
        comp = -0.5 * mixed.pow(2).sum(-1) + s.sum(-1) + log_w              # (N, K)
        log_norm = -0.5 * self.dim * math.log(2 * math.pi) - torch.log(self.scale.to(work)).sum()
        return (torch.logsumexp(comp, dim=-1) + log_norm).to(out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pointwise entropies -log p(x), (N,)."""
        return -self.log_prob(x)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def prepare(self, *, loc: torch.Tensor, scale: torch.Tensor, samples: torch.Tensor) -> None:
        """Set the standardisation (loc, scale: (D,)) and place the means on ``samples`` (>= 1, D).

        Means are taken from the standardised samples (cycled when there are fewer than K).
        """
        self.loc.copy_(loc.to(self.loc))
        self.scale.copy_(scale.to(self.scale).clamp_min(1e-6))
        xs = (samples.to(self.loc) - self.loc) / self.scale
        reps = -(-self.components // xs.shape[0])
        self.means.copy_(xs.repeat(reps, 1)[: self.components].to(self.means))

    def fit(self, x, *, epochs: int = 50, batch_size: int = 256, lr: float = 1e-2, seed: int = 0,
            progress: bool = False) -> List[float]:
        """Fit by maximum likelihood on x (N, D) (tensor or array); returns the mean NLL per epoch.

        Resets the parameters, sets the standardisation from x, then runs ``epochs`` epochs of
        Adam over seeded shuffled mini-batches, zeroing the gradients before every step.
        """
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        if x.shape[0] < 2:
            raise ValueError(f"x needs at least 2 samples to fit a density, got {x.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        epochs = positive_int("epochs", epochs)
        batch_size = positive_int("batch_size", batch_size)
        lr = real_number("lr", lr, low=0, low_ok=False)
        device = self.means.device
        x = x.to(device=device, dtype=self.means.dtype)
        gen = torch.Generator().manual_seed(int(seed))
        self.reset_parameters(gen)
        pick = torch.randperm(x.shape[0], generator=gen)[: self.components]
        std = x.std(0)
        # Constant features keep unit scale (standardising must not divide by zero).
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.prepare(loc=x.mean(0), scale=std, samples=x[pick.to(device)])
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        self.train()
        for _ in progress_bar(range(epochs), enabled=progress, desc="KNIFE"):
            order = torch.randperm(x.shape[0], generator=gen).to(device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                batch = x[order[start:start + batch_size]]
                loss = self.step(batch, optimizer)
                total += loss * batch.shape[0]
            history.append(total / x.shape[0])
        self.eval()
        return history

    def step(self, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One optimisation step on the mean NLL of x (N, D); gradients are zeroed first."""
        optimizer.zero_grad(set_to_none=True)
        loss = -self.log_prob(x).mean()
        loss.backward()
        optimizer.step()
        return float(loss.detach())
