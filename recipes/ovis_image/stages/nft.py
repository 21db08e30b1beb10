"""The forward-process RL stage: DiffusionNFT (`rlhf_image.NFTTrainer`, or AWM with `--loss_type awm`) from the DPO
model on the GRPO stage's text-rendering prompts and OCR reward, with deterministic (ODE) rollouts and no CFG: no
log-probabilities, no SDE. An alternative to the GRPO stage, on the same inputs and with the same Ray flags.

    rlhf-image nft --config recipes/ovis_image/configs/tiny_nft.yaml

The rollouts are sampled in the training process(es), or with `--num_rollout_workers N` on N Ray workers (see the
GRPO stage and [`RolloutArguments`]); DiffusionNFT's old policy is what the workers are sent.
"""

from __future__ import annotations

from rlhf_image import NFTConfig, NFTTrainer

from .args import DataArguments, ModelArguments, RecipeArguments, RewardArguments, RolloutArguments
from .common import StageResult
from .grpo import GRPORecipe

ARGUMENTS = (ModelArguments, DataArguments, RewardArguments, RecipeArguments, NFTConfig, RolloutArguments)


class NFTRecipe(GRPORecipe):
    stage = "nft"
    trainer_class = NFTTrainer
    settings = ("loss_type", "num_generations", "num_inference_steps", "image_size", "sde_type", "guidance_scale",
                "nft_beta", "beta", "num_train_timesteps", "old_policy_decay_rate", "old_policy_max_decay")


def run(model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
        recipe_args: RecipeArguments, config: NFTConfig, rollout_args: RolloutArguments | None = None) -> StageResult:
    recipe = NFTRecipe(model_args, data_args, reward_args, recipe_args, config, rollout_args)
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
