"""interaction_scores (minimal version: reference backend only)."""

from __future__ import annotations

from typing import Optional

from ..reference.interactions import InteractionScores, adjust_interactions_ref, interaction_scores_ref


def interaction_scores(logits_1, logits_2, logits_12, labels, *, entropy_1=None, entropy_2=None,
                       log_prior=None, redundancy: str = "lsmi", backend: Optional[str] = None):
    return interaction_scores_ref(logits_1, logits_2, logits_12, labels, entropy_1=entropy_1,
                                  entropy_2=entropy_2, log_prior=log_prior, redundancy=redundancy)


def adjust_interactions(scores: InteractionScores) -> InteractionScores:
    return adjust_interactions_ref(scores)
