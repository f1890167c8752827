"""Pure-PyTorch oracles of every op (the CPU fallback and the test oracle) and of the DMIL model
(:class:`ReferenceDMILModel`, the oracle of ``dmil_fast.nn.DMILModel``).

Nothing here imports the kernels it checks.
"""

from .gaussian import (
    diagonal_gaussian_kl_ref,
    gaussian_sample_ref,
    variational_bottleneck_grouped_ref,
    variational_bottleneck_ref,
)
from .interactions import adjust_interactions_ref, interaction_scores_ref
from .model import ReferenceDMILModel

__all__ = [
    "gaussian_sample_ref",
    "diagonal_gaussian_kl_ref",
    "variational_bottleneck_ref",
    "variational_bottleneck_grouped_ref",
    "interaction_scores_ref",
    "adjust_interactions_ref",
    "ReferenceDMILModel",
]
