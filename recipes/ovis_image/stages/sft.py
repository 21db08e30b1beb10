"""Stage 2, supervised fine-tuning: the pretraining recipe started from trained weights (the pretrain stage's
output folder, or a released checkpoint), on a curated high-resolution set; optionally LoRA.

    rlhf-image sft --config recipes/ovis_image/configs/tiny_sft.yaml
    torchrun --nproc_per_node 8 -m rlhf_image.recipes.cli sft --config recipes/ovis_image/configs/ovis_7b_sft.yaml
"""

from __future__ import annotations

from rlhf_image import FlowMatchingConfig

from .args import DataArguments, ModelArguments, RecipeArguments
from .common import StageResult
from .pretrain import FlowMatchingRecipe

ARGUMENTS = (ModelArguments, DataArguments, RecipeArguments, FlowMatchingConfig)


class SFTRecipe(FlowMatchingRecipe):
    """[`FlowMatchingRecipe`] from trained weights."""

    stage = "sft"

    def setup(self) -> None:
        if self.model_args.transformer_init == "random":
            raise ValueError("sft starts from trained weights but transformer_init='random'; set "
                             "transformer_init='pretrained' (or run `rlhf-image pretrain` for a random start)")
        super().setup()


def run(model_args: ModelArguments, data_args: DataArguments, recipe_args: RecipeArguments,
        config: FlowMatchingConfig) -> StageResult:
    recipe = SFTRecipe(model_args, data_args, recipe_args, config)
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
