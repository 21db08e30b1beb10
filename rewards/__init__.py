"""Rewards for RL post-training of text-to-image models, under trl's calling contract.

A reward is any callable `fn(prompts, images, **columns) -> list[float | None]` (sync or async);
see `rlhf_image.rewards.base`. Names are imported lazily so that `import rlhf_image.rewards` loads neither torch,
transformers nor rapidocr: each comes in with the first reward that needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RewardFunc": "base",
    "RewardError": "base",
    "call_reward": "base",
    "acall_reward": "base",
    "reward_name": "base",
    "is_async_reward": "base",
    "validate_output": "base",
    "RewardSet": "compose",
    "RewardResult": "compose",
    "aggregate": "compose",
    "extract_target": "text_match",
    "normalize_text": "text_match",
    "levenshtein": "text_match",
    "ocr_accuracy": "text_match",
    "normalized_edit_distance": "text_match",
    "OCRReward": "ocr",
    "build_rapidocr": "ocr",
    "AestheticReward": "aesthetic",
    "AestheticMLP": "aesthetic",
    "CLIPScore": "clip_score",
    "PickScore": "clip_score",
    "HPSv3Reward": "hpsv3",
    "VLMJudgeReward": "vlm_judge",
    "ImageReward": "image_reward",
    "LazyModel": "lazy_model",
    "pair_votes": "voting",
    "weighted_vote": "voting",
    "RemoteReward": "client",
    "RemoteRewardError": "remote",
    "RemoteRewardAuthError": "remote",
    "RewardServer": "server",
    "serve_reward": "server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
