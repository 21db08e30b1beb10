"""Several rewards voting on a pair of images (Ovis-Image's DPO pairs: HPSv3, CLIP and PickScore each prefer one
image of a pair; the image with the larger weighted vote wins).

For a pair (a, b) scored by K rewards, reward k votes

    v_k = +1 if s_k(a) - s_k(b) > m_k,   -1 if s_k(b) - s_k(a) > m_k,   0 (abstains) otherwise,

with m_k >= 0 its margin (the score difference it cannot tell apart), and the pair's weighted vote is
`V = sum_k w_k v_k`: a wins when `V > 0`, b when `V < 0` (a caller skips `|V|` at or below a tolerance as a tie).
With equal weights that is a majority vote. As in `rlhf_image.rewards.compose.aggregate`, a reward with weight 0 is
logged but never counts, and a pair that some reward with nonzero weight could not score has `V = NaN`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pair_votes(scores_a: np.ndarray, scores_b: np.ndarray, margins: Sequence[float] | np.ndarray | None = None
               ) -> np.ndarray:
    """Each reward's vote on each pair.

    Args:
        scores_a, scores_b (`np.ndarray` of shape `[N, K]`): the rewards' scores of the two images, NaN = unscored.
        margins (`np.ndarray` of shape `[K]`, *optional*): per-reward margins `m_k >= 0`; defaults to 0.

    Returns:
        `np.ndarray` of shape `[N, K]`, float64: +1 (a preferred), -1 (b preferred), 0 (abstains), NaN (unscored).
    """
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must both be [N, K]; got {a.shape} and {b.shape}")
    m = np.zeros(a.shape[1]) if margins is None else np.asarray(margins, dtype=np.float64)
    if m.shape != (a.shape[1],) or not np.all(m >= 0):
        raise ValueError(f"margins must be K = {a.shape[1]} values >= 0, got {margins}")
    diff = a - b
    votes = np.where(diff > m, 1.0, np.where(diff < -m, -1.0, 0.0))
    return np.where(np.isnan(diff), np.nan, votes)


def weighted_vote(votes: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """`V = sum_k w_k v_k` over the rewards with nonzero weight.

    Args:
        votes (`np.ndarray` of shape `[N, K]`): from [`pair_votes`].
        weights (`np.ndarray` of shape `[K]`).

    Returns:
        `np.ndarray` of shape `[N]`, float64: > 0 prefers a, < 0 prefers b; NaN where an active vote is NaN.
    """
    v, w = np.asarray(votes, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    if v.ndim != 2 or w.shape != (v.shape[1],):
        raise ValueError(f"votes must be [N, K] and weights [K]; got {v.shape} and {w.shape}")
    active = w != 0  # zero-weight rewards are dropped, since 0 * NaN is NaN
    return v[:, active] @ w[active] if active.any() else np.zeros(v.shape[0])
