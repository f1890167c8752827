"""Public functional ops of dmil_fast: validation, backend choice and torch.library glue.

Every op takes ``backend=None|"reference"|"triton"|"cpp"|"cuda"``; see ``python -m dmil_fast.info``.
"""

from ._dispatch import BACKENDS, BackendUnavailableError
from .diagonal_gaussian_kl import diagonal_gaussian_kl
from .gaussian_sample import gaussian_sample
from .interaction_scores import InteractionScores, adjust_interactions, interaction_scores
from .variational_bottleneck import variational_bottleneck, variational_bottleneck_grouped

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "gaussian_sample",
    "diagonal_gaussian_kl",
    "variational_bottleneck",
    "variational_bottleneck_grouped",
    "interaction_scores",
    "adjust_interactions",
    "InteractionScores",
]
