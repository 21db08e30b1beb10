from .dpo_config import DPOConfig
from .dpo_trainer import DPOTrainer
from .pair_builder import build_preference_pairs
