"""`rlhf-image demo` (what `make demo` runs): the tiny Ovis-Image model through the whole recipe on the CPU.

    rlhf-image demo                                                      # the tiny configs as they are
    rlhf-image demo --config recipes/ovis_image/configs/demo_quick.yaml  # a handful of steps per stage

The demo is a sequence of stage commands, each run exactly as `rlhf-image <command> --config tiny_<stage>.yaml`
would run it (same parser, same stage function), with the stage folders chained under `output_dir`:

    fit-vae -> vae/   pretrain -> pretrain/   sft -> sft/   build-pairs -> pairs/   dpo -> dpo/   grpo -> grpo/
                                                                                             dpo/ -> nft -> nft/

The last stage, DiffusionNFT, starts from the DPO model as GRPO does, so the report compares the two from the same
start. After pretrain, sft, dpo, grpo and nft, `rlhf-image eval` scores the model on held-out prompts (eval/<stage>/);
then `rlhf_image.recipes.ovis_image.report` writes report/ (HTML, markdown, plots). The sizes, steps and learning rates
live in the tiny YAMLs; `<stage>_overrides` change them for one run (the budget knob; demo_quick.yaml uses
it). A rerun reuses finished stages (`reuse_finished`) and resumes an interrupted training stage from its
newest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import yaml

from rlhf_image.recipes.cli import CONFIG_DIR, run_command

from .report import EVALUATED, write_report
from .stages.common import STAGE_RECORD

# (command, folder under output_dir, tiny config) in pipeline order
PIPELINE = (("fit-vae", "vae", "tiny_fit_vae.yaml"), ("pretrain", "pretrain", "tiny_pretrain.yaml"),
            ("sft", "sft", "tiny_sft.yaml"), ("build-pairs", "pairs", "tiny_build_pairs.yaml"),
            ("dpo", "dpo", "tiny_dpo.yaml"), ("grpo", "grpo", "tiny_grpo.yaml"), ("nft", "nft", "tiny_nft.yaml"))
TRAINING = ("pretrain", "sft", "dpo", "grpo", "nft")


@dataclass
class DemoArguments:
    """Settings of the demo run. Each `*_overrides` is a list of command-line tokens appended to that stage's
    command (after its tiny config): flags as in YAML `pretrain_overrides: [--max_steps, "200"]`, or `key=value`
    tokens, which also work on the command line: `rlhf-image demo --pretrain_overrides max_steps=200`."""

    output_dir: str = field(default="outputs/demo",
                            metadata={"help": "Root folder of the stage folders and the report."})
    config_dir: str = field(default=CONFIG_DIR, metadata={"help": "Where the tiny_*.yaml stage configs are."})
    reuse_finished: bool = field(
        default=True, metadata={"help": "Skip a stage whose folder already holds its finished record."})
    fit_vae_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra fit-vae flags."})
    pretrain_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra pretrain flags."})
    sft_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra sft flags."})
    build_pairs_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra build-pairs flags."})
    dpo_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra dpo flags."})
    grpo_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra grpo flags."})
    nft_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra nft flags."})
    eval_overrides: list[str] = field(default_factory=list, metadata={"help": "Extra eval flags (every evaluation)."})
    title: str = field(default="rlhf-image: the tiny Ovis-Image recipe on the CPU", metadata={"help": "Report title."})
    seed: int = field(
        default=0,
        metadata={"help": "Added to every stage's `seed` and `model_seed` (initialisation, data order, noise, "
                          "sampling); the data generators and the held-out evaluation stay fixed, so seeds 0, 1, 2 "
                          "are independent runs of one recipe, scored on the same prompts."})

    def __post_init__(self):
        missing = [name for _, _, name in PIPELINE + (("eval", "", "tiny_eval.yaml"),)
                   if not os.path.isfile(os.path.join(self.config_dir, name))]
        if missing:
            raise ValueError(f"config_dir={self.config_dir!r} lacks {missing}; point it at recipes/ovis_image/configs")


ARGUMENTS = (DemoArguments,)


def override_tokens(tokens: list[str]) -> list[str]:
    """Command-line tokens of an override list: `key=value` becomes `--key value`; anything else is kept."""
    out = []
    for token in tokens:
        if not token.startswith("-") and "=" in token:
            key, value = token.split("=", 1)
            out += [f"--{key}", value]
        else:
            out.append(token)
    return out


def seed_tokens(config_path: str, offset: int) -> list[str]:
    """`--seed` and `--model_seed` tokens that shift a stage config's own seeds by `offset` (none for 0)."""
    if offset == 0:
        return []
    with open(config_path, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    return [token for key in ("seed", "model_seed") if key in values
            for token in (f"--{key}", str(int(values[key]) + offset))]


def _finished(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, STAGE_RECORD))


def run(args: DemoArguments) -> dict[str, str]:
    """Run the pipeline and write the report; returns the report's paths (see `write_report`)."""
    root = args.output_dir
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    timings_path = os.path.join(root, "timings.json")
    timings: dict[str, float] = {}
    if os.path.isfile(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)

    def folder(name: str) -> str:
        return os.path.join(root, name)

    def config(name: str) -> list[str]:
        return ["--config", os.path.join(args.config_dir, name)]

    def timed(key: str, command: str, argv: list[str]) -> None:
        if args.reuse_finished and _finished(folder(key)):
            print(f"[rlhf-image demo] {key}: finished earlier in {folder(key)}; reused", flush=True)
            return
        start = time.perf_counter()
        run_command(command, argv)
        timings[key] = time.perf_counter() - start
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)

    # What each stage starts from: the folder of the stage before it.
    inputs = {"fit-vae": [], "pretrain": ["--vae_path", folder("vae")], "sft": ["--model", folder("pretrain")],
              "build-pairs": ["--model", folder("sft")],
              "dpo": ["--model", folder("sft"), "--pairs_path", folder("pairs")], "grpo": ["--model", folder("dpo")],
              "nft": ["--model", folder("dpo")]}
    overrides = {"fit-vae": args.fit_vae_overrides, "pretrain": args.pretrain_overrides, "sft": args.sft_overrides,
                 "build-pairs": args.build_pairs_overrides, "dpo": args.dpo_overrides, "grpo": args.grpo_overrides,
                 "nft": args.nft_overrides}
    for command, name, stage_config in PIPELINE:
        resume = ["--resume", "latest"] if command in TRAINING else []
        timed(name, command, config(stage_config) + inputs[command] + ["--output_dir", folder(name)] + resume
              + seed_tokens(os.path.join(args.config_dir, stage_config), args.seed)
              + override_tokens(overrides[command]))
        if name in EVALUATED:
            timed(os.path.join("eval", name), "eval", config("tiny_eval.yaml")
                  + ["--model", folder(name), "--output_dir", folder(os.path.join("eval", name))]
                  + override_tokens(args.eval_overrides))
    paths = write_report(root, timings, title=args.title)
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(f"[rlhf-image demo] held-out OCR accuracy per stage (stage times in seconds):\n{paths['table']}\n"
          f"[rlhf-image demo] every stage's time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"\n[rlhf-image demo] this run: {minutes} min {seconds} s (stages reused from earlier runs not counted)"
          f"\n[rlhf-image demo] report: {paths['html']} (and {paths['markdown']})", flush=True)
    return paths
