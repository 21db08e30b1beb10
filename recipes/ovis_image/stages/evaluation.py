"""`rlhf-image eval`: a checkpoint on held-out text-rendering prompts (strings of the generator's `"eval"`
split, never trained on): OCR word accuracy (exact), NED, the OCR reward, and the mean of any other reward
named in `reward_funcs`, at each CFG scale; written as `metrics.json`, `samples.jsonl` and one annotated
grid per scale (`rlhf_image.recipes.ovis_image.evaluate`).

    rlhf-image eval --config recipes/ovis_image/configs/tiny_eval.yaml --model outputs/ovis_tiny/sft
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from rlhf_image.recipes.ovis_image.evaluate import evaluate_text_rendering, held_out_prompts

from .args import DataArguments, ModelArguments, RewardArguments
from .common import StageResult, describe_model, inference_policy, print_banner, read_stage_record, write_stage_record
from .inputs import RECIPE_REWARDS, build_rewards, describe_data


@dataclass
class EvalArguments:
    """Settings of the evaluation (prompts come from the `synthetic_*` data fields, split `"eval"`)."""

    output_dir: str = field(default="outputs/ovis_tiny/eval", metadata={"help": "Where metrics and grids go."})
    num_prompts: int = field(default=64, metadata={"help": "Held-out prompts (distinct target strings)."})
    num_inference_steps: int = field(default=20, metadata={"help": "Euler (ODE) steps."})
    guidance_scales: list[float] = field(
        default_factory=lambda: [1.0, 3.0], metadata={"help": "CFG scales to evaluate at (1 = no CFG)."})
    seed: int = field(default=0, metadata={"help": "Prompt i is sampled with seed + i (the same for every model)."})
    micro_batch_size: int = field(default=16, metadata={"help": "Transformer rows per call."})
    grid_columns: int = field(default=8, metadata={"help": "Columns of the sample grids."})

    def __post_init__(self):
        if self.num_prompts < 1 or not self.guidance_scales:
            raise ValueError("num_prompts must be >= 1 and guidance_scales non-empty")


ARGUMENTS = (ModelArguments, DataArguments, RewardArguments, EvalArguments)


def scale_name(guidance_scale: float) -> str:
    return f"cfg{guidance_scale:g}"


class EvalRecipe:
    stage = "eval"

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
                 args: EvalArguments):
        self.model_args, self.data_args, self.reward_args, self.args = model_args, data_args, reward_args, args

    def setup(self) -> None:
        self.policy = inference_policy(self.model_args)
        data = self.data_args
        self.prompts, self.targets = held_out_prompts(
            self.args.num_prompts, vocabulary=data.synthetic_vocabulary, min_length=data.synthetic_min_length,
            max_length=data.synthetic_max_length, mode=data.synthetic_mode, seed=data.synthetic_seed)
        self.ocr = RECIPE_REWARDS["ocr"](self.reward_args)
        others = [name for name in self.reward_args.reward_funcs if name != "ocr"]
        self.extra_rewards = build_rewards(replace(self.reward_args, reward_funcs=others)) if others else []
        print_banner(self.stage, {
            "model": describe_model(self.model_args, self.policy.transformer),
            "prompts": f"{len(self.prompts)} held-out prompts; " + describe_data(data),
            "sampling": {"steps": self.args.num_inference_steps, "guidance_scales": self.args.guidance_scales,
                         "seed": self.args.seed, "size": f"{data.synthetic_height}x{data.synthetic_width}"},
            "rewards": ["ocr", *others],
            "output_dir": self.args.output_dir,
        })

    def evaluate(self) -> None:
        args, data = self.args, self.data_args
        seeds = [args.seed + i for i in range(len(self.prompts))]
        self.results = {scale_name(g): evaluate_text_rendering(
            self.policy, self.prompts, self.targets, seeds, ocr=self.ocr, height=data.synthetic_height,
            width=data.synthetic_width, num_steps=args.num_inference_steps, guidance_scale=g,
            micro_batch_size=args.micro_batch_size, rewards=self.extra_rewards, grid_columns=args.grid_columns)
            for g in args.guidance_scales}

    def cleanup(self) -> StageResult:
        output_dir = self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        metrics = {}
        with open(os.path.join(output_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
            for name, result in self.results.items():
                metrics[name] = {**result.metrics(prefix=""), "seconds": result.seconds}
                result.grid.save(os.path.join(output_dir, f"grid_{name}.png"))
                for i, prompt in enumerate(result.prompts):
                    f.write(json.dumps({"guidance": name, "prompt": prompt, "target": result.targets[i],
                                        "ocr": result.ocr_texts[i], "exact": result.exact[i], "ned": result.ned[i]},
                                       ensure_ascii=False) + "\n")
        trained = read_stage_record(self.model_args.model) if os.path.isdir(self.model_args.model) else {}
        summary = {"model": self.model_args.model, "model_stage": trained.get("stage"),
                   "model_global_step": trained.get("global_step"), "num_prompts": len(self.prompts),
                   "num_inference_steps": self.args.num_inference_steps, "metrics": metrics}
        with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        write_stage_record(output_dir, {"stage": self.stage, **summary})
        for name, values in metrics.items():
            print(f"[rlhf-image] eval {name}: exact {values['word_accuracy']:.3f}, NED {values['ned']:.3f}, "
                  f"OCR reward {values['ocr_reward']:.3f} ({len(self.prompts)} held-out prompts)", flush=True)
        return StageResult(self.stage, output_dir, summary)


def run(model_args: ModelArguments, data_args: DataArguments, reward_args: RewardArguments,
        args: EvalArguments) -> StageResult:
    recipe = EvalRecipe(model_args, data_args, reward_args, args)
    recipe.setup()
    recipe.evaluate()
    return recipe.cleanup()
