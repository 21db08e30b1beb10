"""rlhf-image: RL and preference post-training of flow-matching text-to-image models.

Everything installs under this one name: the trainers and the core here, and the subpackages
`rlhf_image.rewards`, `rlhf_image.rollout` (Ray) and `rlhf_image.recipes` (the Ovis-Image recipe). The names
below are imported lazily, so `import rlhf_image.rewards` loads no torch and `import rlhf_image` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "BaseConfig": "base_config",
    "ImageTrainingConfig": "base_config",
    "BaseTrainer": "base_trainer",
    "OnlineConfig": "online_config",
    "OnlineTrainer": "online_trainer",
    "GRPOConfig": "grpo_config",
    "GRPOTrainer": "grpo_trainer",
    "NFTConfig": "nft_config",
    "NFTTrainer": "nft_trainer",
    "DPOConfig": "dpo_config",
    "DPOTrainer": "dpo_trainer",
    "FlowMatchingConfig": "fm_config",
    "FlowMatchingTrainer": "fm_trainer",
    "build_preference_pairs": "pair_builder",
    "InProcessRolloutEngine": "rollout_engine",
    "SharedRolloutEngine": "rollout_engine",
    "RolloutEngine": "rollout_engine",
    "BucketBatchSampler": "data",
    "ImageFolderDataset": "data",
    "ImageTextDataset": "data",
    "ManifestDataset": "data",
    "ParquetImageDataset": "data",
    "TarShardDataset": "data",
    "make_buckets": "data",
    "Conditioning": "policy",
    "FlowPolicy": "policy",
    "register_family": "policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
