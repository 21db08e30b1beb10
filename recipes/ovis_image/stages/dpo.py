"""Stage 3b, DPO: Flow-DPO with the Diffusion-SDPO safeguard (`rlhf_image.DPOTrainer`) from the SFT model, on the
pairs `rlhf-image build-pairs` wrote. A pair whose chosen or rejected image cannot be decoded is dropped and
counted before training (`skipped_pairs` in the stage record).

    rlhf-image dpo --config recipes/ovis_image/configs/tiny_dpo.yaml
"""

from __future__ import annotations

from rlhf_image import DPOConfig, DPOTrainer

from .args import ModelArguments, PairDataArguments, RecipeArguments
from .common import (StageResult, StepCounter, build_policy, describe_model, load_pipeline, lora_config,
                     print_banner, resolve_resume, save_stage_output, trainer_settings,
                     training_record, write_stage_record)
from .inputs import readable_pairs

ARGUMENTS = (ModelArguments, PairDataArguments, RecipeArguments, DPOConfig)


class DPORecipe:
    stage = "dpo"

    def __init__(self, model_args: ModelArguments, pair_args: PairDataArguments, recipe_args: RecipeArguments,
                 config: DPOConfig):
        self.model_args, self.pair_args, self.recipe_args, self.config = model_args, pair_args, recipe_args, config

    def setup(self) -> None:
        self.pipe = load_pipeline(self.model_args)
        policy = build_policy(self.pipe, self.model_args)
        settings = trainer_settings(self.config, "beta", "sdpo", "sdpo_space", "sdpo_mu", "image_size",
                                    "timestep_shift", "cfg_dropout_prob")
        rows, self.skipped_pairs = readable_pairs(self.pair_args.pairs_path)
        self.counter = StepCounter()
        # The reference is the starting (SFT) model: a frozen copy, or the adapter disabled with LoRA.
        self.trainer = DPOTrainer(policy, args=self.config, train_dataset=rows,
                                  peft_config=lora_config(self.recipe_args, self.model_args), callbacks=[self.counter])
        self.resume_from = resolve_resume(self.recipe_args.resume, self.config.output_dir)
        print_banner(self.stage, {
            "model": describe_model(self.model_args, self.trainer.model),
            "lora": f"rank {self.recipe_args.lora_rank}" if self.recipe_args.lora_rank else "off (full weights)",
            "data": f"{len(rows)} pairs from {self.pair_args.pairs_path} ({self.skipped_pairs} with an unreadable "
                    "image skipped)",
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
        record = training_record(self.stage, self.trainer, self.model_args, self.resume_from, self.counter, lora,
                                 pairs_path=self.pair_args.pairs_path, skipped_pairs=self.skipped_pairs)
        if self.config.should_save:
            write_stage_record(output_dir, record)
            print(f"[rlhf-image] dpo: {record['global_step']} steps ({record['steps_this_run']} in this run), "
                  f"{self.skipped_pairs} unreadable pairs skipped; model in {output_dir}", flush=True)
        return StageResult(self.stage, output_dir, record)


def run(model_args: ModelArguments, pair_args: PairDataArguments, recipe_args: RecipeArguments,
        config: DPOConfig) -> StageResult:
    recipe = DPORecipe(model_args, pair_args, recipe_args, config)
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
