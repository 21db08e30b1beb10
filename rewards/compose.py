"""Weighted composition of several rewards, with each reward kept for logging.

Policy for unscored samples: a reward returning `None` for a sample is stored as NaN in
`per_reward`. The sample's total is NaN ("unscored") if any reward with a nonzero weight is NaN
there; the trainer turns a NaN total into advantage 0 (see `rlhf_image.advantages`). A reward with
weight 0 is computed and logged but never makes a total NaN.

Aggregation modes:
- `"sum_then_normalize"`: `total = sum_k w_k r_k` on the raw rewards (the trainer then normalises the
  total per group). This is trl's behaviour.
- `"normalize_then_sum"`: each reward is first standardised over the batch, `(r_k - mean_k) / std_k`
  (population std, NaN ignored; a reward with std 0 becomes 0), then `total = sum_k w_k z_k`. Use it
  when rewards live on very different scales (PickScore ~20, OCR in [0, 1]).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import RewardFunc, acall_reward, call_reward, check_inputs, is_async_reward, reward_name, run_coroutine

MODES = ("sum_then_normalize", "normalize_then_sum")


def aggregate(per_reward: np.ndarray, weights: Sequence[float] | np.ndarray,
              mode: str = "sum_then_normalize") -> np.ndarray:
    """Combine per-reward values into one total per sample.

    Args:
        per_reward (`np.ndarray` of shape `[N, K]`): raw values, NaN where a reward could not score.
        weights (`np.ndarray` of shape `[K]`).
        mode (`str`): `"sum_then_normalize"` or `"normalize_then_sum"` (see the module docstring).

    Returns:
        `np.ndarray` of shape `[N]`, float64; NaN where a reward with nonzero weight is NaN.
    """
    values = np.asarray(per_reward, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if values.ndim != 2 or w.shape != (values.shape[1],):
        raise ValueError(f"per_reward must be [N, K] and weights [K]; got {values.shape} and {w.shape}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if np.isinf(values).any():
        raise ValueError("per_reward contains inf")
    if mode == "normalize_then_sum":
        values = _standardize(values)
    active = w != 0
    unscored = np.isnan(values[:, active]).any(axis=1)
    # Zero-weight columns are dropped rather than multiplied, since 0 * NaN is NaN.
    total = values[:, active] @ w[active] if active.any() else np.zeros(values.shape[0])
    total = np.where(unscored, np.nan, total)
    return total


def _standardize(values: np.ndarray) -> np.ndarray:
    """Per column `(x - nanmean) / nanstd` (population std); all-NaN or constant columns map to 0."""
    out = np.zeros_like(values)
    for k in range(values.shape[1]):
        col = values[:, k]
        ok = ~np.isnan(col)
        if ok.sum() == 0:
            out[:, k] = np.nan
            continue
        mean, std = col[ok].mean(), col[ok].std()
        out[:, k] = (col - mean) / std if std > 1e-12 else np.where(ok, 0.0, np.nan)
    return out


@dataclass
class RewardResult:
    """The outcome of scoring one batch with a `RewardSet`.

    Attributes:
        names (`list[str]` of length K): reward names, in the order given.
        weights (`np.ndarray` of shape `[K]`).
        per_reward (`np.ndarray` of shape `[N, K]`): raw values, NaN where a reward returned `None`.
        total (`np.ndarray` of shape `[N]`): `aggregate(per_reward, weights, mode)`; NaN = unscored.
        mode (`str`): the aggregation mode used for `total`.
    """

    names: list[str]
    weights: np.ndarray
    per_reward: np.ndarray
    total: np.ndarray
    mode: str

    @property
    def scored(self) -> np.ndarray:
        """`np.ndarray` of shape `[N]`, bool: samples with a finite total."""
        return ~np.isnan(self.total)

    def column(self, name: str) -> np.ndarray:
        """One reward's raw values, shape `[N]`."""
        return self.per_reward[:, self.names.index(name)]

    def metrics(self, prefix: str = "rewards/") -> dict[str, float]:
        """Per-reward mean and std over scored values, plus None counts, ready to log."""
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            col = self.per_reward[:, k]
            ok = ~np.isnan(col)
            out[f"{prefix}{name}/mean"] = float(col[ok].mean()) if ok.any() else float("nan")
            out[f"{prefix}{name}/std"] = float(col[ok].std()) if ok.any() else float("nan")
            out[f"{prefix}{name}/num_none"] = float((~ok).sum())
        ok = self.scored
        out[f"{prefix}total/mean"] = float(self.total[ok].mean()) if ok.any() else float("nan")
        out[f"{prefix}total/num_unscored"] = float((~ok).sum())
        return out


class RewardSet:
    """Several rewards with weights, called as one.

    Sync rewards run one after another; async rewards run concurrently (`asyncio.gather`), and
    while they are awaited the sync ones run in order on one worker thread, so a remote or async
    reward overlaps local scoring.

    Args:
        funcs (`list`): rewards under the contract of `rlhf_image.rewards.base` (a single reward is accepted too).
        weights (`list[float]`, *optional*): one per reward; defaults to all 1.
        mode (`str`, defaults to `"sum_then_normalize"`): how `RewardResult.total` is aggregated.

    Example:
        >>> rs = RewardSet([OCRReward(), AestheticReward(...)], weights=[1.0, 0.1])
        >>> result = rs(prompts, images, target_text=targets)
        >>> result.total  # [N], NaN = unscored
    """

    def __init__(self, funcs: Sequence[RewardFunc] | RewardFunc, weights: Sequence[float] | None = None,
                 mode: str = "sum_then_normalize"):
        funcs = [funcs] if callable(funcs) else list(funcs)
        if not funcs:
            raise ValueError("RewardSet needs at least one reward")
        for f in funcs:
            if not callable(f):
                raise TypeError(f"reward {f!r} is not callable")
        self.funcs = funcs
        self.names = [reward_name(f) for f in funcs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward names must be unique (they are logged separately): {self.names}")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(f"got {len(weights)} weights for {len(funcs)} rewards")
        if not all(np.isfinite(weights)):
            raise ValueError(f"weights must be finite, got {weights}")
        self.weights = np.asarray(weights, dtype=np.float64)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def __len__(self) -> int:
        return len(self.funcs)

    def __call__(self, prompts: Sequence[str], images: Sequence[Any], **columns: Any) -> RewardResult:
        """Score a batch; see `acall` for the shapes."""
        if not any(is_async_reward(f) for f in self.funcs):
            check_inputs(prompts, images, columns)
            values = [call_reward(f, prompts, images, **columns) for f in self.funcs]
            return self._result(values, len(prompts))
        return run_coroutine(self.acall(prompts, images, **columns))

    async def acall(self, prompts: Sequence[str], images: Sequence[Any], **columns: Any) -> RewardResult:
        """Score a batch from async code.

        Args:
            prompts (`list[str]` of length N).
            images (`list[PIL.Image.Image]` of length N).
            **columns: extra dataset columns, each a list of length N, passed to every reward.

        Returns:
            `RewardResult` with `per_reward` `[N, K]` and `total` `[N]`.
        """
        n = check_inputs(prompts, images, columns)
        sync_idx = [k for k, f in enumerate(self.funcs) if not is_async_reward(f)]
        async_idx = [k for k, f in enumerate(self.funcs) if is_async_reward(f)]

        def run_sync() -> list[list[float | None]]:
            return [call_reward(self.funcs[k], prompts, images, **columns) for k in sync_idx]

        jobs = [acall_reward(self.funcs[k], prompts, images, **columns) for k in async_idx]
        if sync_idx:
            jobs.append(asyncio.to_thread(run_sync))
        done = await asyncio.gather(*jobs)
        values: list[list[float | None]] = [[] for _ in self.funcs]
        for k, v in zip(async_idx, done[: len(async_idx)]):
            values[k] = v
        if sync_idx:
            for k, v in zip(sync_idx, done[-1]):
                values[k] = v
        return self._result(values, n)

    def _result(self, values: list[list[float | None]], n: int) -> RewardResult:
        per_reward = np.full((n, len(self.funcs)), np.nan, dtype=np.float64)
        for k, col in enumerate(values):
            per_reward[:, k] = [np.nan if v is None else v for v in col]
        total = aggregate(per_reward, self.weights, self.mode)
        return RewardResult(list(self.names), self.weights.copy(), per_reward, total, self.mode)
