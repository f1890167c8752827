"""Encoders for feature data: a per-modality MLP in place of the official ResNet18s."""

from __future__ import annotations

import torch
from torch import nn


class MLPEncoder(nn.Module):
    """``depth`` Linear layers, each followed by ReLU: in_dim -> hidden -> ... -> out_dim.

    The last ReLU mirrors a CNN backbone whose pooled features are non-negative; the model's
    ``embed_v``/``embed_a`` Linear comes after it. ``depth=1`` is a single Linear + ReLU.

    Args:
        in_dim: D_in, input feature width.
        hidden: width of the intermediate layers (unused when ``depth == 1``).
        depth: number of Linear layers, >= 1.
        out_dim: output width (the DMIL model's ``input_size``).
        dropout: dropout probability after each intermediate ReLU (0 disables it).

    Shapes: x (B, D_in) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, *, hidden: int = 256, depth: int = 2, out_dim: int = 256,
                 dropout: float = 0.0):
        super().__init__()
        for name, value, low in (("in_dim", in_dim, 1), ("hidden", hidden, 1), ("depth", depth, 1),
                                 ("out_dim", out_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_dim, self.hidden, self.depth, self.out_dim, self.dropout = in_dim, hidden, depth, out_dim, dropout
        layers = []
        width = in_dim
        for i in range(depth):
            last = i == depth - 1
            nxt = out_dim if last else hidden
            layers += [nn.Linear(width, nxt), nn.ReLU()]
            if dropout > 0 and not last:
                layers.append(nn.Dropout(dropout))
            width = nxt
        self.net = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, hidden={self.hidden}, depth={self.depth}, out_dim={self.out_dim}, "
                f"dropout={self.dropout}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must be (B, {self.in_dim}), got shape {tuple(x.shape)}")
        return self.net(x)
