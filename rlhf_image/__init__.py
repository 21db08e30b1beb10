from .dpo_config import DPOConfig
from .dpo_trainer import DPOTrainer
from .pair_builder import build_preference_pairs
from .grpo_config import GRPOConfig
from .grpo_trainer import GRPOTrainer
from .rollout_engine import InProcessRolloutEngine, RolloutEngine
from .data import (BucketBatchSampler, ImageFolderDataset, ImageTextDataset, ManifestDataset, ParquetImageDataset,
                   TarShardDataset, make_buckets)
from .fm_config import FlowMatchingConfig
from .fm_trainer import FlowMatchingTrainer
