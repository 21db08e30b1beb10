"""Preparing a policy's transformer for training (LoRA through peft, or full), its reference, and saving the
result in the formats stock diffusers loads. Shared by every trainer; nothing here is specific to a method.

Saved layouts:
- LoRA: `pytorch_lora_weights.safetensors` with `transformer.`-prefixed peft keys and the `LoraConfig` as
  metadata, the format of diffusers' `save_lora_weights`. Load it with [`load_lora`] (which calls
  `pipe.load_lora_weights(path)` on pipelines with a LoRA loader, such as `FluxPipeline`, and
  `pipe.transformer.load_lora_adapter(path, prefix="transformer", weight_name=...)` on the others, such as
  `OvisImagePipeline`, which has no pipeline-level LoRA loader in diffusers 0.42).
- Full weights: the diffusers folder layout, `transformer/` written by `save_pretrained` (safetensors); load
  with `<TransformerClass>.from_pretrained(path, subfolder="transformer")`.
Both come with a `README.md` model card.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from .policy import FlowPolicy

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_PREFIX = "transformer"
_PEFT_PREFIX = "base_model.model."


def prepare_transformer(transformer: torch.nn.Module, peft_config: LoraConfig | None = None) -> torch.nn.Module:
    """The module a trainer optimises: `peft.get_peft_model(transformer, peft_config)` (only the adapter
    trains) when `peft_config` is given; a model that already is a `PeftModel` as it is (its adapter trains);
    else `transformer` with every parameter trainable. Dropout is switched off (see [`disable_dropout`])."""
    if peft_config is not None:
        if isinstance(transformer, PeftModel):
            raise ValueError("the transformer already carries a peft adapter; pass the plain model with peft_config")
        transformer = get_peft_model(transformer, peft_config)
    elif not isinstance(transformer, PeftModel):
        transformer.requires_grad_(True)
    disable_dropout(transformer)
    return transformer


def disable_dropout(module: torch.nn.Module) -> None:
    """Set every dropout probability to 0, so a forward in train mode equals one in eval mode: the policy's
    log-probs and its reference's must be the deterministic function that sampling evaluated."""
    for child in module.modules():
        if isinstance(child, torch.nn.Dropout):
            child.p = 0.0


def is_lora(transformer: torch.nn.Module) -> bool:
    """Whether `transformer` is a peft-wrapped model."""
    return isinstance(transformer, PeftModel)


def base_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model under a peft wrapper (the model itself otherwise)."""
    return transformer.get_base_model() if isinstance(transformer, PeftModel) else transformer


def frozen_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode with no trainable parameter: the reference of full fine-tuning."""
    reference = copy.deepcopy(base_transformer(transformer)).eval()
    reference.requires_grad_(False)
    return reference


@contextmanager
def reference_policy(policy: FlowPolicy, reference_transformer: torch.nn.Module | None = None) -> Iterator[FlowPolicy]:
    """A policy that predicts with the reference weights, inside a `with` block.

    With `reference_transformer` (full fine-tuning) the policy's components are reused around that
    transformer; without it the policy must be a LoRA model, and the reference is the same model with its
    adapter disabled (`PeftModel.disable_adapter()`).
    """
    if reference_transformer is not None:
        reference = copy.copy(policy)
        reference.transformer = reference_transformer
        yield reference
    elif isinstance(policy.transformer, PeftModel):
        with policy.transformer.disable_adapter():
            yield policy
    else:
        raise ValueError("full fine-tuning needs a `reference_transformer` (see `frozen_copy`)")


def lora_state_dict(transformer: PeftModel,
                    state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights with diffusers' key names (`transformer_blocks.0.attn.to_q.lora_A.weight`), on CPU.

    Args:
        transformer (`peft.PeftModel`).
        state_dict (`dict`, *optional*): a full state dict gathered elsewhere (DeepSpeed ZeRO-3).
    """
    weights = get_peft_model_state_dict(transformer, state_dict=state_dict)
    return {key.removeprefix(_PEFT_PREFIX): value.detach().cpu().contiguous() for key, value in weights.items()}


def save_lora(transformer: PeftModel, save_directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write the adapter as diffusers' `save_lora_weights` does; returns the file path."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    weights = {f"{TRANSFORMER_PREFIX}.{k}": v for k, v in lora_state_dict(transformer, state_dict).items()}
    config = transformer.peft_config[transformer.active_adapter].to_dict()
    metadata = {f"{TRANSFORMER_PREFIX}.{k}": v for k, v in config.items()}
    LoraBaseMixin.write_lora_layers(weights, save_directory, is_main_process=True, weight_name=LORA_WEIGHT_NAME,
                                    save_function=None, safe_serialization=True, lora_adapter_metadata=metadata)
    return os.path.join(save_directory, LORA_WEIGHT_NAME)


def save_full(transformer: torch.nn.Module, save_directory: str,
              state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write the transformer to `save_directory/transformer` as diffusers' `save_pretrained` does (config and
    safetensors). A `state_dict` gathered elsewhere (DeepSpeed ZeRO-3) is written as one unsharded file."""
    path = os.path.join(save_directory, TRANSFORMER_PREFIX)
    model = base_transformer(transformer)
    if state_dict is None:
        model.save_pretrained(path, safe_serialization=True)
    else:
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import save_file

        model.save_config(path)
        weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(weights, os.path.join(path, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def load_lora(pipe, path: str) -> None:
    """Load a LoRA saved by [`save_lora`] into a diffusers pipeline (stock diffusers calls only)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    if isinstance(pipe, LoraBaseMixin):
        pipe.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME)
    else:
        pipe.transformer.load_lora_adapter(path, prefix=TRANSFORMER_PREFIX, weight_name=LORA_WEIGHT_NAME)


def save_trained(transformer: torch.nn.Module, save_directory: str,
                 state_dict: dict[str, torch.Tensor] | None = None) -> bool:
    """Write a trained transformer the way stock diffusers loads it: [`save_lora`] for a peft model, else
    [`save_full`]. Returns whether it was a LoRA (for the model card)."""
    if is_lora(transformer):
        save_lora(transformer, save_directory, state_dict)
        return True
    save_full(transformer, save_directory, state_dict)
    return False


def write_model_card(save_directory: str, *, method: str, base_model: str | None, lora: bool,
                     details: dict[str, object] | None = None, metrics: dict[str, float] | None = None) -> str:
    """Write a short `README.md`: what was trained, from what, how to load it, and final metrics.

    Args:
        method (`str`): e.g. `"GRPO"`.
        base_model (`str`, *optional*): name or path of the base pipeline.
        lora (`bool`): LoRA adapter or full weights.
        details (`dict`, *optional*): training facts (reward functions, steps, ...), one line each.
        metrics (`dict[str, float]`, *optional*): final metrics, one line each.
    """
    base = base_model or "(base pipeline not recorded)"
    if lora:
        how = (f"from rlhf_image.model_io import load_lora\npipe = DiffusionPipeline.from_pretrained(\"{base}\")\n"
               "load_lora(pipe, \"<this folder>\")  # pipe.load_lora_weights(...) where the pipeline supports it")
    else:
        how = (f"transformer = <TransformerClass>.from_pretrained(\"<this folder>\", subfolder=\"transformer\")\n"
               f"pipe = DiffusionPipeline.from_pretrained(\"{base}\", transformer=transformer)")
    tags = ["rlhf-image", method.lower()] + (["lora"] if lora else [])
    lines = [
        "---", "library_name: diffusers", "tags: [" + ", ".join(tags) + "]",
        "---", "", f"# {method} fine-tune of {base}", "",
        f"{'LoRA adapter' if lora else 'Full transformer weights'} trained with rlhf-image's {method} trainer.", "",
        "## Training", "",
        f"- base model: {base}",
        *[f"- {key}: {value}" for key, value in (details or {}).items()],
        "", "## Final metrics", "",
        *([f"- {key}: {value:.6g}" for key, value in metrics.items()] if metrics else ["- (none logged)"]),
        "", "## Loading", "", "```python", how, "```", "",
    ]
    path = os.path.join(save_directory, "README.md")
    os.makedirs(save_directory, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
