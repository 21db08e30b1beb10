"""Votes of several rewards on image pairs (`rlhf_image.rewards.voting`) on hand-made scores."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_image.rewards.voting import pair_votes, weighted_vote

NAN = float("nan")
# Rows: pairs (a, b); columns: three rewards (say HPSv3, CLIP, PickScore).
A = np.array([[5.0, 0.30, 21.0], [5.0, 0.30, 21.0], [5.0, 0.30, 21.0], [5.0, NAN, 21.0], [5.0, 0.30, 21.0]])
B = np.array([[4.0, 0.20, 22.0], [6.0, 0.40, 23.0], [4.0, 0.40, 21.0], [4.0, 0.10, 20.0], [4.95, 0.31, 20.0]])


def test_each_reward_votes_for_the_image_it_scores_higher():
    votes = pair_votes(A, B)
    expected = [[1, 1, -1], [-1, -1, -1], [1, -1, 0], [1, NAN, 1], [1, -1, 1]]  # equal scores abstain (0)
    np.testing.assert_array_equal(votes, np.array(expected, dtype=float))
    # Equal weights: a majority vote. Row 2 is 1 - 1 with one abstention: a tie (V = 0); row 3 is unscored.
    np.testing.assert_array_equal(weighted_vote(votes, [1, 1, 1]), [1, -3, 0, NAN, 1])
    # Weights: HPSv3 counts twice, so it outvotes the other two in row 0 and breaks the tie of row 2.
    np.testing.assert_array_equal(weighted_vote(votes, [2, 1, 1]), [2, -4, 1, NAN, 2])


def test_margins_make_a_reward_abstain_on_small_differences():
    votes = pair_votes(A, B, margins=[0.1, 0.0, 1.0])
    # HPSv3 differences 1, -1, 1, 1, 0.05: only the last is within its margin; PickScore's |1| <= 1 abstains.
    np.testing.assert_array_equal(votes[:, 0], [1, -1, 1, 1, 0])
    np.testing.assert_array_equal(votes[:, 2], [0, -1, 0, 0, 0])
    np.testing.assert_array_equal(weighted_vote(votes, [1, 1, 1]), [2, -3, 0, NAN, -1])


def test_zero_weight_rewards_never_count_and_bad_inputs_are_refused():
    votes = pair_votes(A, B)
    np.testing.assert_array_equal(weighted_vote(votes, [1, 0, 1]), [0, -2, 1, 2, 2])  # the NaN has weight 0
    np.testing.assert_array_equal(weighted_vote(votes, [0, 0, 0]), [0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="margins must be K = 3 values >= 0"):
        pair_votes(A, B, margins=[0.1, -1.0, 0.0])
    with pytest.raises(ValueError, match=r"both be \[N, K\]"):
        pair_votes(A, B[:, :2])
    with pytest.raises(ValueError, match=r"weights \[K\]"):
        weighted_vote(votes, [1.0, 1.0])
