"""Train/eval mode for the span of a call, every submodule's own mode restored afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and all its submodules in eval mode inside the block; afterwards each submodule
    has its own earlier mode again (``module.train(was_training)`` would also switch a frozen,
    eval-mode backbone back to training)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
