"""The recipe's GRPO stage with its rollouts on Ray workers: `rlhf-image grpo` samples in its own training
processes; this script reads the same stage config (YAML + flags, the same argument groups) plus the Ray settings
below, and hands `GRPOTrainer` a `RayRolloutEngine`, the only change. Each worker loads the stage's input model
itself (from a shared folder or the Hub); only the trainable weights (the LoRA adapter with `lora_rank > 0`) travel
at each weight sync. The output folder is a stage folder like the command's (the eval stage reads it).

On the CPU, a private Ray on 127.0.0.1 (tiny model, two steps):

    python examples/grpo_ray_rollouts.py --config recipes/ovis_image/configs/tiny_grpo.yaml --model tiny --max_steps 2

On a cluster started with `ray start` (see docs/ovis_image_recipe.md), from the trainer's node:

    python examples/grpo_ray_rollouts.py --config recipes/ovis_image/configs/ovis_7b_grpo.yaml --ray_address auto \
        --num_rollout_workers 15 --num_gpus_per_worker 1 --num_reward_workers 4
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field

from trl import TrlParser

from recipes.cli import resolve_config
from recipes.ovis_image.stages.args import DataArguments, ModelArguments, RecipeArguments, RewardArguments
from recipes.ovis_image.stages.common import (StepCounter, build_policy, load_pipeline, lora_config, resolve_resume,
                                              save_stage_output, take_gradient_checkpointing, training_record,
                                              write_stage_record)
from recipes.ovis_image.stages.inputs import build_rewards, prompt_rows
from rlhf_image import GRPOConfig, GRPOTrainer
from rollout import RayRolloutEngine


@dataclass
class RayArguments:
    """Where the rollouts run."""

    ray_address: str | None = field(
        default=None, metadata={"help": "'auto': the cluster of `ray start` on this node; unset: a private local Ray "
                                        "on 127.0.0.1."})
    num_rollout_workers: int = field(default=1, metadata={"help": "Rollout workers (one GPU each on a cluster)."})
    num_gpus_per_worker: float | None = field(
        default=None, metadata={"help": "GPUs per rollout worker (default: 1 when the cluster has GPUs, else 0)."})
    num_reward_workers: int = field(
        default=0, metadata={"help": "Reward actors (CPU-bound rewards such as OCR); 0 scores in the trainer."})
    num_cpus_per_reward_worker: float = field(default=1.0, metadata={"help": "CPUs per reward actor."})
    weight_transport: str = field(
        default="object_store", metadata={"help": "'object_store' (fine for LoRA) or 'collective' (NCCL broadcast, "
                                                  "for full weights of large models)."})
    worker_threads: int | None = field(default=None, metadata={"help": "torch threads in CPU workers."})


ARGUMENTS = (ModelArguments, DataArguments, RewardArguments, RecipeArguments, GRPOConfig, RayArguments)


def parse(argv: list[str] | None = None):
    return TrlParser(ARGUMENTS, prog="grpo_ray_rollouts.py").parse_args_and_config(
        resolve_config(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> GRPOTrainer:
    model_args, data_args, reward_args, recipe_args, config, ray_args = parse(argv)
    # [start:engine]
    pipe = load_pipeline(model_args)
    policy = build_policy(pipe, model_args)
    take_gradient_checkpointing(policy, config)
    engine = RayRolloutEngine(
        functools.partial(load_pipeline, model_args),  # picklable: each worker builds the same model
        policy_kwargs={"max_sequence_length": model_args.max_sequence_length},
        num_workers=ray_args.num_rollout_workers, num_gpus_per_worker=ray_args.num_gpus_per_worker,
        num_reward_workers=ray_args.num_reward_workers,  # the trainer's rewards are pickled to them
        num_cpus_per_reward_worker=ray_args.num_cpus_per_reward_worker,
        weight_transport=ray_args.weight_transport, worker_threads=ray_args.worker_threads,
        address=ray_args.ray_address)
    counter = StepCounter()
    trainer = GRPOTrainer(policy, build_rewards(reward_args), args=config, train_dataset=prompt_rows(data_args),
                          peft_config=lora_config(recipe_args, model_args), rollout_engine=engine,
                          callbacks=[counter])
    resume_from = resolve_resume(recipe_args.resume, config.output_dir)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        engine.close()  # kills the workers; stops Ray only if the engine started it
    # [end:engine]
    lora = save_stage_output(trainer, pipe, config.output_dir)
    if config.should_save:
        write_stage_record(config.output_dir, training_record("grpo", trainer, model_args, resume_from, counter, lora,
                                                              rewards=trainer.reward_names))
    ratios = [(e["ratio/min"], e["ratio/max"]) for e in trainer.state.log_history if "ratio/max" in e]
    print(f"grpo on {ray_args.num_rollout_workers} Ray worker(s): {trainer.state.global_step} steps; on-policy ratio "
          f"(min, max) per step {ratios}; last weight sync {engine.last_sync_seconds:.3f} s; model in "
          f"{config.output_dir}", flush=True)
    return trainer


if __name__ == "__main__":
    main()
