"""What every stage does the same way: load the model a stage starts from, save what it ends with, resume,
print the launch banner, and record the stage in its output folder.

A stage starts from the tiny or 7B Ovis-Image, or from a diffusers pipeline folder or Hub id of any built-in family
(its `model_index.json` names the pipeline class). Stage output folders chain the stages. A full-weights stage writes
a complete diffusers pipeline folder (`transformer/` from the trainer's `save_model`, plus the frozen components and
`model_index.json`), which stock `DiffusionPipeline.from_pretrained` loads. A LoRA stage
writes the adapter (`pytorch_lora_weights.safetensors`) and names its base folder in `rlhf_stage.json`;
[`load_stage_output`] loads the base and fuses the adapter, so the next stage starts from the merged model.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from transformers import TrainerCallback

from rlhf_image.recipes.ovis_image.model import ovis_image_7b, ovis_image_tiny, ovis_prefix_tokenizer
from rlhf_image.checkpoints import latest_complete_checkpoint
from rlhf_image.model_io import is_lora, load_lora
from rlhf_image.policy import FlowPolicy, registered_families
from rlhf_image.sharded_init import without_zero3_init, zero3_init

from .args import ModelArguments, RecipeArguments, is_hub_id

logger = logging.getLogger(__name__)

STAGE_RECORD = "rlhf_stage.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StageResult:
    """What a stage returns (and records in `output_dir/rlhf_stage.json`).

    Args:
        stage (`str`): the subcommand name.
        output_dir (`str`): where its results are.
        record (`dict`): the stage record (log history, counts, settings); see [`write_stage_record`].
    """

    stage: str
    output_dir: str
    record: dict[str, Any] = field(default_factory=dict)


# --- loading -----------------------------------------------------------------------------------------

def load_pipeline(args: ModelArguments) -> DiffusionPipeline:
    """The pipeline a stage starts from (see [`ModelArguments`]), in `args.torch_dtype`, with the
    frozen text encoder and VAE in `args.frozen_dtype` when it is set."""
    pipe = _load_pipeline(args)
    if args.frozen_dtype is not None:
        frozen = DTYPES[args.frozen_dtype]
        for name, component in pipe.components.items():
            if name != "transformer" and isinstance(component, torch.nn.Module):
                component.to(dtype=frozen)
    return pipe


def _load_pipeline(args: ModelArguments) -> DiffusionPipeline:
    dtype = DTYPES[args.torch_dtype]
    if args.model == "tiny":
        vae = _load_vae(args.vae_path, torch.float32) if args.vae_path else None
        pipe = ovis_image_tiny(
            hidden_size=args.tiny_hidden_size, num_heads=args.tiny_num_heads, num_layers=args.tiny_num_layers,
            num_single_layers=args.tiny_num_single_layers, axes_dims_rope=tuple(args.tiny_axes_dims_rope),
            latent_channels=vae.config.latent_channels if vae else args.tiny_latent_channels,
            vae_block_out_channels=tuple(vae.config.block_out_channels if vae else args.tiny_vae_block_out_channels),
            text_hidden_size=args.tiny_text_hidden_size, text_layers=args.tiny_text_layers,
            vae_mid_block_attention=args.tiny_vae_mid_block_attention, tokenizer=ovis_prefix_tokenizer(),
            seed=args.model_seed)
        if vae is not None:
            pipe = type(pipe)(**{**pipe.components, "vae": vae})
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    if args.model == "7b":
        return ovis_image_7b(args.hub_id, transformer="random" if args.transformer_init == "random" else None,
                             text_encoder=args.text_encoder_path, vae=args.vae_path, torch_dtype=dtype)
    # Loaded whole even under ZeRO-3 (a pretrained transformer is partitioned when DeepSpeed wraps it; frozen
    # parts never are): see rlhf_image.sharded_init.
    with without_zero3_init():
        pipe = load_stage_output(args.model, dtype)
        if args.vae_path:
            pipe = type(pipe)(**{**pipe.components, "vae": _load_vae(args.vae_path, dtype)})
    if args.transformer_init == "random":
        torch.manual_seed(args.model_seed)
        with zero3_init():  # a random transformer is built already sharded under ZeRO-3
            transformer = type(pipe.transformer).from_config(pipe.transformer.config).to(dtype)
        pipe = type(pipe)(**{**pipe.components, "transformer": transformer})
    return pipe


def _load_vae(path: str, dtype: torch.dtype) -> AutoencoderKL:
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    return AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype).eval()


def load_stage_output(path: str, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A stage's output folder, or any diffusers folder or Hub id of a built-in family, as a pipeline: a complete
    folder as it is, a LoRA folder as its base (recursively) with the adapter fused into the transformer's weights."""
    record = read_stage_record(path)
    if record.get("lora"):
        if not record.get("base_model"):
            raise ValueError(f"{path} holds a LoRA adapter but its {STAGE_RECORD} names no base_model")
        pipe = load_stage_output(record["base_model"], dtype)
        load_lora(pipe, path)
        pipe.transformer.fuse_lora()
        pipe.transformer.unload_lora()
        return pipe
    if os.path.isfile(os.path.join(path, "model_index.json")) or not os.path.exists(path):  # a folder or a Hub id
        pipeline_class = DiffusionPipeline.load_config(path).get("_class_name")
        families = registered_families()
        if pipeline_class not in families:
            raise ValueError(f"{path} holds a {pipeline_class}, which is not a built-in family; rlhf-image's stages "
                             f"take {', '.join(sorted(families))}")
        return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    raise FileNotFoundError(f"{path} is not a stage output: it has neither model_index.json (full weights) nor a "
                            f"{STAGE_RECORD} of a LoRA stage; did the stage finish?")


def build_policy(pipe: DiffusionPipeline, args: ModelArguments) -> FlowPolicy:
    """The policy the trainers see; the model name is what model cards and stage records show."""
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=args.max_sequence_length)
    policy.base_model_name_or_path = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
    return policy


def inference_policy(args: ModelArguments) -> FlowPolicy:
    """The policy of a stage that only samples (build-pairs, eval, sample), on the GPU when there is one (the
    training stages leave placement to their Trainer)."""
    policy = build_policy(load_pipeline(args), args)
    return policy.to(device="cuda" if torch.cuda.is_available() else "cpu")


def lora_base(args: ModelArguments) -> str:
    """Where a LoRA stage's base model is reloaded from: the input folder, or the 7B pipeline's folder / Hub id."""
    if os.path.isdir(args.model) and args.transformer_init == "pretrained" and not args.vae_path:
        return os.path.abspath(args.model)
    if args.model == "7b" and args.transformer_init == "pretrained" and not (args.vae_path or args.text_encoder_path):
        return args.hub_id
    if is_hub_id(args.model) and args.transformer_init == "pretrained" and not args.vae_path:
        return args.model
    raise ValueError(f"lora_rank > 0 needs a base model that the next stage can reload, but model={args.model!r} "
                     f"(transformer_init={args.transformer_init!r}, vae_path={args.vae_path!r}) is built in memory; "
                     "run a full-weights stage first and pass its output_dir as `model`")


def lora_config(args: RecipeArguments, model_args: ModelArguments):
    """A peft `LoraConfig` for `lora_rank > 0` (after checking that the base can be reloaded), else `None`."""
    if args.lora_rank == 0:
        return None
    lora_base(model_args)
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                      target_modules=list(args.lora_target_modules), init_lora_weights="gaussian")


# --- saving ------------------------------------------------------------------------------------------

def save_stage_output(trainer, pipe: DiffusionPipeline, output_dir: str) -> bool:
    """Write the trained model through the trainer (`transformer/` or the LoRA file, and a model card) and,
    for full weights, the frozen components that make `output_dir` a complete pipeline folder. Every process
    calls this (ZeRO-3 gathers the weights); only the main one writes. Returns whether it is LoRA."""
    trainer.save_model(output_dir)
    lora = is_lora(trainer.model)
    if trainer.args.should_save and not lora:
        for name, component in pipe.components.items():
            if name != "transformer" and component is not None:
                component.save_pretrained(os.path.join(output_dir, name))
        pipe.save_config(output_dir)  # model_index.json: the component classes
    return lora


def read_stage_record(output_dir: str) -> dict[str, Any]:
    path = os.path.join(output_dir, STAGE_RECORD)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_stage_record(output_dir: str, record: dict[str, Any]) -> str:
    """Write `rlhf_stage.json` (the stage, its input, counts, log history) atomically."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, STAGE_RECORD)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False, default=str)
    os.replace(path + ".tmp", path)
    return path


# --- resuming ----------------------------------------------------------------------------------------

def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: `"latest"` is the newest complete `checkpoint-*` in `output_dir` (an
    incomplete one is skipped with a warning; `None`, with a message, when there is none); a folder is taken as it
    is (the trainer checks it)."""
    if resume != "latest":
        return resume
    last = latest_complete_checkpoint(output_dir)
    if last is None:
        print(f"[rlhf-image] --resume latest: no checkpoint-* in {output_dir}; starting fresh", flush=True)
    return last


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this process ran, so a record tells a resumed run from a restarted one."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def training_record(stage: str, trainer, model_args: ModelArguments, resumed_from: str | None, counter: StepCounter,
                    lora: bool, **extra: Any) -> dict[str, Any]:
    """The stage record of a training stage: input model, LoRA base, steps, resume, log history."""
    return {"stage": stage, "model": model_args.model, "base_model": lora_base(model_args) if lora else None,
            "lora": lora, "global_step": trainer.state.global_step, "steps_this_run": counter.steps,
            "resumed_from": resumed_from, **extra, "log_history": trainer.state.log_history}


# --- the launch banner -------------------------------------------------------------------------------

def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """`(total, trainable)` parameter counts (of the whole model also when ZeRO-3 has partitioned it)."""
    params = list(module.parameters())
    numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # a ZeRO-3 parameter's local tensor is empty
    return sum(numel), sum(n for n, p in zip(numel, params) if p.requires_grad)


def describe_model(args: ModelArguments, transformer: torch.nn.Module) -> str:
    total, trainable = count_parameters(transformer)
    if args.model == "tiny":
        name = (f"tiny Ovis-Image (MMDiT width {args.tiny_hidden_size}, {args.tiny_num_layers} double + "
                f"{args.tiny_num_single_layers} single blocks)")
    elif args.model == "7b":
        name = f"Ovis-Image 7B ({args.hub_id}, transformer {args.transformer_init})"
    else:
        name = f"{args.model}" + (" (transformer re-initialised)" if args.transformer_init == "random" else "")
    return f"{name}; transformer {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable; {args.torch_dtype}"


def print_banner(stage: str, sections: dict[str, Any]) -> None:
    """Print the resolved configuration of a stage before it runs (rank 0 only under a launcher)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    width = max(len(key) for key in sections)
    lines = [f"=== rlhf-image {stage} " + "=" * max(3, 60 - len(stage))]
    for key, value in sections.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v.value if isinstance(v, enum.Enum) else v}" for k, v in value.items())
        lines.append(f"  {key.ljust(width)} : {value}")
    lines.append("=" * 78)
    print("\n".join(lines), flush=True)


def trainer_settings(config, *names: str) -> dict[str, Any]:
    """The key hyper-parameters of a trainer config for the banner: the common ones and `names`."""
    common = ("learning_rate", "lr_scheduler_type", "per_device_train_batch_size", "gradient_accumulation_steps",
              "max_steps", "num_train_epochs", "bf16", "save_steps", "seed")
    settings = {name: getattr(config, name) for name in (*common, *names)}
    if config.max_steps > 0:
        settings.pop("num_train_epochs")
    if config.deepspeed:
        settings["deepspeed"] = config.deepspeed
    if config.activation_checkpointing or config.gradient_checkpointing:
        settings["gradient_checkpointing"] = True
    return settings

