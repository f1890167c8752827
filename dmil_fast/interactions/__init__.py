"""Per-sample multimodal interactions: KNIFE densities, the LSMI estimator, scoring trained models.

    from dmil_fast.interactions import LSMIEstimator
    est = LSMIEstimator(num_classes=2).fit(x1, x2, y)
    scores = est.score(x1, x2, y)         # InteractionScores of (N,) tensors, in nats
    scores.means()                        # {"redundancy": ..., "unique_1": ..., ...}
"""

from .estimator import LSMIEstimator
from .knife import KNIFE
from .scoring import score_model

__all__ = ["KNIFE", "LSMIEstimator", "score_model"]
