"""The `rlhf-image` command line: one subcommand per stage of the Ovis-Image recipe.

    rlhf-image <command> --config <stage.yaml> [--field value ...]

Each command parses its dataclasses (the stage's trainer config plus the recipe's argument groups, see
`recipes/ovis_image/stages/args.py`) with `trl.TrlParser`: the YAML sets them by field name, command-line
flags override the YAML, and an unknown key in either is an error. A `--config` name that is not a file is
looked up among the packaged configs (`recipes/ovis_image/configs/`), so `--config tiny_sft.yaml` works from
an installed package.
"""

from __future__ import annotations

import importlib
import os
import sys

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ovis_image", "configs")

# command -> (module holding ARGUMENTS and run(), one-line description)
COMMANDS = {
    "fit-vae": ("rlhf_image.recipes.ovis_image.stages.fit_vae", "fit the tiny VAE on text renders (CPU demo)"),
    "pretrain": ("rlhf_image.recipes.ovis_image.stages.pretrain", "stage 1: flow matching from a random MMDiT"),
    "sft": ("rlhf_image.recipes.ovis_image.stages.sft", "stage 2: flow matching from the pretrained model"),
    "build-pairs": ("rlhf_image.recipes.ovis_image.stages.build_pairs", "stage 3a: preference pairs scored by rewards"),
    "dpo": ("rlhf_image.recipes.ovis_image.stages.dpo", "stage 3b: Flow-DPO (+ Diffusion-SDPO) on the pairs"),
    "grpo": ("rlhf_image.recipes.ovis_image.stages.grpo", "stage 4: Flow-GRPO with OCR reward and KL to the DPO model"),
    "nft": ("rlhf_image.recipes.ovis_image.stages.nft", "stage 4 alternative: DiffusionNFT / AWM with OCR reward"),
    "sample": ("rlhf_image.recipes.ovis_image.stages.sample", "prompts -> images from a checkpoint"),
    "eval": ("rlhf_image.recipes.ovis_image.stages.evaluation", "held-out text-rendering metrics and a sample grid"),
    "demo": ("rlhf_image.recipes.ovis_image.demo", "all stages of the tiny model on the CPU, and a report"),
}


def usage() -> str:
    lines = ["usage: rlhf-image <command> --config <stage.yaml> [--field value ...]", "", "commands:"]
    lines += [f"  {name:<12} {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", f"packaged configs: {CONFIG_DIR}", "help on a command's fields: rlhf-image <command> --help "
              "(--help-all adds every transformers.TrainingArguments field)"]
    return "\n".join(lines)


def resolve_config(argv: list[str]) -> list[str]:
    """`argv` with a `--config` name that is not a file replaced by the packaged config of that name."""
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config" and not os.path.isfile(argv[i + 1]):
            packaged = os.path.join(CONFIG_DIR, os.path.basename(argv[i + 1]))
            if not os.path.isfile(packaged):
                raise FileNotFoundError(f"config {argv[i + 1]!r} not found (nor in {CONFIG_DIR})")
            argv[i + 1] = packaged
    return argv


def parse_command(command: str, argv: list[str]):
    """The module of `command` and its parsed dataclasses (YAML and flags; unknown keys raise `ValueError`)."""
    from trl import TrlParser

    module = importlib.import_module(COMMANDS[command][0])
    parser = TrlParser(module.ARGUMENTS, prog=f"rlhf-image {command}")
    return module, parser.parse_args_and_config(resolve_config(argv))


def run_command(command: str, argv: list[str]):
    """Parse and run one command in this process; returns the stage's result. The demo calls stages this way,
    so each of its stages runs exactly as the command line would run it."""
    module, parsed = parse_command(command, argv)
    return module.run(*parsed)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf-image: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:  # the stage's own options, without importing the stage (fast)
        from rlhf_image.recipes.cli_help import stage_help

        print(stage_help(command, COMMANDS[command][0]))
        return 0
    rest = ["--help" if arg == "--help-all" else arg for arg in rest]  # every field, TrainingArguments included
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # component loading; the Trainer's progress bars stay
    try:
        module, parsed = parse_command(command, rest)
    except (ValueError, FileNotFoundError) as error:
        # Unknown keys (YAML or flags) and invalid fields: the message names them and the fix.
        print(f"rlhf-image {command}: error: {error}\n(see `rlhf-image {command} --help` for the fields)",
              file=sys.stderr)
        return 2
    module.run(*parsed)
    finish_distributed()
    return 0


def finish_distributed() -> None:
    """After a stage that ran under torchrun/accelerate: wait for every rank, then destroy the process group,
    so that no collective's worker thread is still running while the interpreter shuts down (an abort at exit,
    "terminate called without an active exception", seen after ZeRO-3 saves on gloo)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
