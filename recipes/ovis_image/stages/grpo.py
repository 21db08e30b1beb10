"""Stage 4, GRPO: Flow-GRPO (`rlhf_image.GRPOTrainer`) from the DPO model on text-rendering prompts, with the
OCR reward, CPS sampling, few sampling steps and a KL term to the DPO model (its frozen copy, or the adapter
disabled with LoRA), as in the Ovis-Image report.

    rlhf-image grpo --config recipes/ovis_image/configs/tiny_grpo.yaml
"""

from __future__ import annotations

from rlhf_image import GRPOConfig, GRPOTrainer

from .args import DataArguments, ModelArguments, RecipeArguments, RewardArguments
from .common import (StageResult, StepCounter, build_policy, describe_model, load_pipeline, lora_config,
                     print_banner, resolve_resume, save_stage_output, take_gradient_checkpointing, trainer_settings,
                     training_record, write_stage_record)
from .inputs import build_rewards, describe_data, prompt_rows

ARGUMENTS = (ModelArguments, DataArguments, RewardArguments, RecipeArguments, GRPOConfig)


class GRPORecipe:
    stage = "grpo"

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
                 recipe_args: RecipeArguments, config: GRPOConfig):
        self.model_args, self.data_args, self.reward_args = model_args, data_args, reward_args
        self.recipe_args, self.config = recipe_args, config

    def setup(self) -> None:
        self.pipe = load_pipeline(self.model_args)
        policy = build_policy(self.pipe, self.model_args)
        settings = trainer_settings(self.config, "num_generations", "num_inference_steps", "image_size", "sde_type",
                                    "noise_level", "guidance_scale", "beta", "epsilon", "num_iterations",
                                    "timestep_fraction")
        take_gradient_checkpointing(policy, self.config)
        rows = prompt_rows(self.data_args)
        rewards = build_rewards(self.reward_args)
        self.counter = StepCounter()
        self.trainer = GRPOTrainer(policy, reward_funcs=rewards, args=self.config, train_dataset=rows,
                                   peft_config=lora_config(self.recipe_args, self.model_args), callbacks=[self.counter])
        self.resume_from = resolve_resume(self.recipe_args.resume, self.config.output_dir)
        print_banner(self.stage, {
            "model": describe_model(self.model_args, self.trainer.model),
            "lora": f"rank {self.recipe_args.lora_rank}" if self.recipe_args.lora_rank else "off (full weights)",
            "prompts": describe_data(self.data_args, len(rows)),
            "rewards": dict(zip(self.trainer.reward_names, self.trainer.reward_weights.tolist())),
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
                                 rewards=self.trainer.reward_names)
        if self.config.should_save:
            write_stage_record(output_dir, record)
            print(f"[rlhf-image] grpo: {record['global_step']} steps ({record['steps_this_run']} in this run); "
                  f"model in {output_dir}", flush=True)
        return StageResult(self.stage, output_dir, record)


def run(model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
        recipe_args: RecipeArguments, config: GRPOConfig) -> StageResult:
    recipe = GRPORecipe(model_args, data_args, reward_args, recipe_args, config)
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
