"""Stage 1, pretraining: plain rectified-flow training of a randomly initialised MMDiT on image-text pairs
(the text encoder and VAE frozen), as the Ovis-Image report describes; the SFT stage reuses this recipe.

    rlhf-image pretrain --config recipes/ovis_image/configs/tiny_pretrain.yaml
    torchrun --nproc_per_node 8 -m rlhf_image.recipes.cli pretrain --config recipes/ovis_image/configs/ovis_7b_pretrain_256.yaml
"""

from __future__ import annotations

from rlhf_image import FlowMatchingConfig, FlowMatchingTrainer

from .args import DataArguments, ModelArguments, RecipeArguments
from .common import (StageResult, StepCounter, build_policy, describe_model, load_pipeline, lora_config,
                     print_banner, resolve_resume, save_stage_output, trainer_settings, training_record,
                     write_stage_record)
from .inputs import describe_data, image_text_dataset

ARGUMENTS = (ModelArguments, DataArguments, RecipeArguments, FlowMatchingConfig)


class FlowMatchingRecipe:
    """Pretraining (and, as [`~rlhf_image.recipes.ovis_image.stages.sft.SFTRecipe`], supervised fine-tuning) with
    [`rlhf_image.FlowMatchingTrainer`]."""

    stage = "pretrain"

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, recipe_args: RecipeArguments,
                 config: FlowMatchingConfig):
        self.model_args, self.data_args, self.recipe_args, self.config = model_args, data_args, recipe_args, config

    def setup(self) -> None:
        self.pipe = load_pipeline(self.model_args)
        policy = build_policy(self.pipe, self.model_args)
        self.dataset = image_text_dataset(self.data_args)
        settings = trainer_settings(self.config, "resolution", "buckets", "timestep_sampling", "timestep_shift",
                                    "cfg_dropout_prob", "use_ema")
        self.counter = StepCounter()
        self.trainer = FlowMatchingTrainer(policy, args=self.config, train_dataset=self.dataset,
                                           peft_config=lora_config(self.recipe_args, self.model_args),
                                           callbacks=[self.counter])
        self.resume_from = resolve_resume(self.recipe_args.resume, self.config.output_dir)
        print_banner(self.stage, {
            "model": describe_model(self.model_args, self.trainer.model),
            "lora": f"rank {self.recipe_args.lora_rank}" if self.recipe_args.lora_rank else "off (full weights)",
            "data": describe_data(self.data_args, len(self.dataset)),
            "hyper-parameters": settings,
            "output_dir": self.config.output_dir,
            "world size": self.config.world_size,
            "resume from": self.resume_from or "no (fresh start)",
        })

    def train(self) -> None:
        self.trainer.train(resume_from_checkpoint=self.resume_from)

    def cleanup(self) -> StageResult:
        output_dir = self.config.output_dir
        lora = save_stage_output(self.trainer, self.pipe, output_dir)
        logged = [entry["data/skipped_images"] for entry in self.trainer.state.log_history
                  if "data/skipped_images" in entry]
        record = training_record(self.stage, self.trainer, self.model_args, self.resume_from, self.counter, lora,
                                 skipped_images=int(logged[-1]) if logged else self.dataset.num_skipped)
        if self.config.should_save:
            write_stage_record(output_dir, record)
            print(f"[rlhf-image] {self.stage}: {record['global_step']} steps ({record['steps_this_run']} in this run), "
                  f"{record['skipped_images']} unreadable images skipped; model in {output_dir}", flush=True)
        return StageResult(self.stage, output_dir, record)


def run(model_args: ModelArguments, data_args: DataArguments, recipe_args: RecipeArguments,
        config: FlowMatchingConfig) -> StageResult:
    recipe = FlowMatchingRecipe(model_args, data_args, recipe_args, config)
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
