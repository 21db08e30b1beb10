"""Distributed rollouts on Ray: rollout workers, reward workers, weight sync, and the engine a trainer is handed.

`RayRolloutEngine` satisfies `rlhf_image.rollout_engine.RolloutEngine`; `rlhf_image` never imports this package,
and importing it does not import `ray` (that happens when an engine is built).
"""

from .engine import RayRolloutEngine, RolloutHandle, RolloutWorkerError, split_by_group

__all__ = ["RayRolloutEngine", "RolloutHandle", "RolloutWorkerError", "split_by_group"]
