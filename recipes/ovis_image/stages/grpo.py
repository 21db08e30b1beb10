"""Stage 4, GRPO: Flow-GRPO (`rlhf_image.GRPOTrainer`) from the DPO model on text-rendering prompts, with the
OCR reward, CPS sampling, few sampling steps and a KL term to the DPO model (its frozen copy, or the adapter
disabled with LoRA), as in the Ovis-Image report.

    rlhf-image grpo --config recipes/ovis_image/configs/tiny_grpo.yaml

The rollouts are sampled in the training process(es), or with `--num_rollout_workers N` on N Ray workers
(`rlhf_image.rollout.RayRolloutEngine`, see [`RolloutArguments`]): a private local Ray on 127.0.0.1, or with
`--ray_address auto` the cluster of `ray start` (examples/ovis_7b_cluster.sh).
"""

from __future__ import annotations

import functools

from rlhf_image import GRPOConfig, GRPOTrainer, OnlineConfig, SharedRolloutEngine
from rlhf_image.rollout import RayRolloutEngine

from .args import DataArguments, ModelArguments, RecipeArguments, RewardArguments, RolloutArguments
from .common import (StageResult, StepCounter, build_policy, describe_model, load_pipeline, lora_config,
                     print_banner, resolve_resume, save_stage_output, trainer_settings,
                     training_record, write_stage_record)
from .inputs import build_rewards, describe_data, prompt_rows

ARGUMENTS = (ModelArguments, DataArguments, RewardArguments, RecipeArguments, GRPOConfig, RolloutArguments)


def build_rollout_engine(rollout_args: RolloutArguments, model_args: ModelArguments,
                         config: OnlineConfig | None = None) -> RayRolloutEngine | SharedRolloutEngine | None:
    """The Ray rollout engine of `rollout_args`, or `None` (`num_rollout_workers=0`: the trainer samples in its own
    process). Each worker builds the stage's input model from `model_args` itself, so `model` must be readable at
    the same path on every node (or be a Hub id cached there); starting it starts or joins Ray. With several trainer
    processes (`config.world_size > 1`) only rank 0 starts the workers, and every rank gets a
    `SharedRolloutEngine` over them."""
    if rollout_args.num_rollout_workers == 0:
        return None
    if config is not None and config.world_size > 1:
        stage = config.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage") if config.deepspeed \
            else None
        if stage == 3:
            raise ValueError(f"num_rollout_workers={rollout_args.num_rollout_workers} with DeepSpeed ZeRO-3: the "
                             "parameters are partitioned across the trainer processes, so no rank holds whole "
                             "weights to send to the workers. Use a ZeRO-2 config, or num_rollout_workers=0")
        return SharedRolloutEngine(build_rollout_engine(rollout_args, model_args) if config.process_index == 0
                                   else None)
    # [start:engine]
    return RayRolloutEngine(
        functools.partial(load_pipeline, model_args),  # picklable: each worker builds the same model
        policy_kwargs={"max_sequence_length": model_args.max_sequence_length},  # build_policy's options
        num_workers=rollout_args.num_rollout_workers, num_gpus_per_worker=rollout_args.num_gpus_per_worker,
        num_reward_workers=rollout_args.num_reward_workers,  # the trainer's rewards are pickled to them
        num_cpus_per_reward_worker=rollout_args.num_cpus_per_reward_worker,
        weight_transport=rollout_args.weight_transport, worker_threads=rollout_args.worker_threads,
        address=rollout_args.ray_address)  # None: a private Ray on 127.0.0.1; 'auto': the `ray start` cluster
    # [end:engine]


def describe_engine(engine: RayRolloutEngine | SharedRolloutEngine | None, rollout_args: RolloutArguments) -> str:
    """The banner's line on where the rollouts are sampled."""
    if engine is None:
        return "in the training process"
    if isinstance(engine, SharedRolloutEngine):
        if engine.engine is None:
            return "by rank 0's Ray rollout workers"
        return f"for all {engine.world_size} trainer processes: " + describe_engine(engine.engine, rollout_args)
    cluster = ("a private local Ray on 127.0.0.1" if engine.session.local else
               f"the Ray cluster at {rollout_args.ray_address or 'RAY_ADDRESS'}")
    rewards = f"{engine.num_reward_workers} reward workers" if engine.num_reward_workers else "the trainer"
    return (f"{len(engine.workers)} Ray rollout worker(s) with {engine.num_gpus_per_worker:g} GPU each on {cluster}; "
            f"rewards scored by {rewards}; weights sent via {engine.weight_transport}")


class GRPORecipe:
    """The online RL stage: the trainer from the DPO model, rollouts in process or on Ray workers. The NFT stage is
    this recipe with its own trainer and settings."""

    stage = "grpo"
    trainer_class = GRPOTrainer
    # The config fields the banner shows.
    settings = ("num_generations", "num_inference_steps", "image_size", "sde_type", "noise_level", "guidance_scale",
                "beta", "epsilon", "num_iterations", "timestep_fraction")

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
                 recipe_args: RecipeArguments, config: OnlineConfig, rollout_args: RolloutArguments | None = None):
        self.model_args, self.data_args, self.reward_args = model_args, data_args, reward_args
        self.recipe_args, self.config = recipe_args, config
        self.rollout_args = rollout_args if rollout_args is not None else RolloutArguments()

    def setup(self) -> None:
        self.pipe = load_pipeline(self.model_args)
        policy = build_policy(self.pipe, self.model_args)
        settings = trainer_settings(self.config, *self.settings)
        rows = prompt_rows(self.data_args)
        rewards = build_rewards(self.reward_args)
        peft_config = lora_config(self.recipe_args, self.model_args)
        self.resume_from = resolve_resume(self.recipe_args.resume, self.config.output_dir)
        self.counter = StepCounter()
        self.engine = build_rollout_engine(self.rollout_args, self.model_args, self.config)
        try:
            self.trainer = self.trainer_class(policy, reward_funcs=rewards, args=self.config, train_dataset=rows,
                                              peft_config=peft_config, rollout_engine=self.engine,
                                              callbacks=[self.counter])
        except BaseException:
            self.close_engine()  # the workers (and a Ray started here) must not outlive a failed setup
            raise
        print_banner(self.stage, {
            "model": describe_model(self.model_args, self.trainer.model),
            "lora": f"rank {self.recipe_args.lora_rank}" if self.recipe_args.lora_rank else "off (full weights)",
            "prompts": describe_data(self.data_args, len(rows)),
            "rewards": dict(zip(self.trainer.reward_names, self.trainer.reward_weights.tolist())),
            "rollouts": describe_engine(self.engine, self.rollout_args),
            "hyper-parameters": settings,
            "output_dir": self.config.output_dir,
            "world size": self.config.world_size,
            "resume from": self.resume_from or "no (fresh start)",
        })

    def train(self) -> None:
        try:
            self.trainer.train(resume_from_checkpoint=self.resume_from)
        finally:
            self.close_engine()

    def close_engine(self) -> None:
        """Kill the Ray workers (stopping Ray only if the engine started it); nothing to do for in-process rollouts."""
        if self.engine is not None:
            self.engine.close()

    def cleanup(self) -> StageResult:
        output_dir = self.config.output_dir
        lora = save_stage_output(self.trainer, self.pipe, output_dir)
        record = training_record(self.stage, self.trainer, self.model_args, self.resume_from, self.counter, lora,
                                 rewards=self.trainer.reward_names)
        if self.config.should_save:
            write_stage_record(output_dir, record)
            print(f"[rlhf-image] {self.stage}: {record['global_step']} steps ({record['steps_this_run']} in this run); "
                  f"model in {output_dir}", flush=True)
        return StageResult(self.stage, output_dir, record)


def run(model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
        recipe_args: RecipeArguments, config: GRPOConfig, rollout_args: RolloutArguments | None = None) -> StageResult:
    recipe = GRPORecipe(model_args, data_args, reward_args, recipe_args, config, rollout_args)
    recipe.setup()
    recipe.train()
    return recipe.cleanup()
