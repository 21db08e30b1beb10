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
import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_PREFIX = "transformer"
_PEFT_PREFIX = "base_model.model."


def prepare_transformer(transformer: torch.nn.Module, peft_config: LoraConfig | None = None,
                        seed: int | None = None) -> torch.nn.Module:
    """The module a trainer optimises: `peft.get_peft_model(transformer, peft_config)` (only the adapter
    trains) when `peft_config` is given; a model that already is a `PeftModel` as it is (its adapter trains);
    else `transformer` with every parameter trainable. Dropout is switched off (see [`disable_dropout`]).

    Args:
        transformer (`torch.nn.Module`): the policy's transformer.
        peft_config (`peft.LoraConfig`, *optional*): add and train a LoRA adapter.
        seed (`int`, *optional*): seed of the adapter's initial weights (drawn from a private generator, so two
            identical trainers built in one process start identically); the global random state is left as it was.

    Raises:
        `ValueError`: the transformer carries adapters loaded into a diffusers pipeline (see
        [`check_no_loaded_adapters`]), or a peft model is given together with `peft_config`.
    """
    check_no_loaded_adapters(transformer)
    if peft_config is not None:
        if isinstance(transformer, PeftModel):
            raise ValueError("the transformer already carries a peft adapter; pass the plain model with peft_config")
        # peft creates and initialises the adapter layers on the CPU, then moves them to the layer's device.
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.random.default_generator.manual_seed(seed)
            transformer = get_peft_model(transformer, peft_config)
    elif not isinstance(transformer, PeftModel):
        transformer.requires_grad_(True)
    disable_dropout(transformer)
    return transformer


def loaded_adapters(transformer: torch.nn.Module) -> list[str]:
    """Names of the LoRA (peft) adapters inside `transformer` that are not its own `PeftModel` adapters: those
    loaded into a diffusers model with `pipe.load_lora_weights` / `transformer.load_lora_adapter` (fused or not)."""
    own = set(transformer.peft_config) if isinstance(transformer, PeftModel) else set()
    names = {name for module in transformer.modules() if isinstance(module, BaseTunerLayer)
             for name in module.active_adapters}
    return sorted(names - own)


def check_no_loaded_adapters(transformer: torch.nn.Module) -> None:
    """Refuse a transformer that carries adapters loaded into a diffusers pipeline.

    Training such a model would update the loaded adapter and the base weights together (or stack a new adapter on
    it) and save weights whose keys (`base_layer`, `lora_A.default_0`) stock diffusers cannot load. The fix is to
    fuse the adapter into the base weights first; the message says how.
    """
    names = loaded_adapters(transformer)
    if names:
        raise ValueError(
            f"the transformer carries LoRA adapter(s) {names} loaded into the pipeline (load_lora_weights / "
            "load_lora_adapter). Training it as it is would update adapter and base weights together and save weights "
            "stock diffusers cannot load. Fuse the adapter into the base weights first: `pipe.fuse_lora()` then "
            "`pipe.unload_lora_weights()` (for pipelines without a LoRA loader, such as OvisImagePipeline: "
            "`pipe.transformer.fuse_lora()` then `pipe.transformer.unload_lora()`), then train the full weights or a "
            "new adapter (peft_config).")


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


def frozen_copy(transformer: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy in eval mode with no trainable parameter: the reference of full fine-tuning; `dtype` casts it
    (e.g. `torch.bfloat16`: half the memory of a float32 reference)."""
    reference = copy.deepcopy(base_transformer(transformer)).eval()
    reference.requires_grad_(False)
    return reference if dtype is None else reference.to(dtype)


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    """diffusers' `ModelMixin.set_attention_backend(backend)` on the model under any peft wrapper; `"native"`
    (diffusers' default, PyTorch SDPA) leaves the model as it is, so models without the method keep working."""
    if backend == "native":
        return
    model = base_transformer(transformer)
    if not hasattr(model, "set_attention_backend"):
        raise ValueError(f"attention_backend={backend!r}: {type(model).__name__} is not a diffusers model with "
                         "set_attention_backend; use attention_backend='native'")
    model.set_attention_backend(backend)


def compile_repeated_blocks(transformer: torch.nn.Module, **compile_kwargs) -> int:
    """Compile each repeated block of the transformer in place (`nn.Module.compile`): diffusers'
    `compile_repeated_blocks` where the model declares `_repeated_blocks`, else every block of its top-level
    `nn.ModuleList`s. Returns the number of blocks compiled."""
    model = base_transformer(transformer)
    names = getattr(model, "_repeated_blocks", None)
    if names:
        blocks = [module for module in model.modules() if type(module).__name__ in names]
    else:
        blocks = [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]
    if not blocks:
        raise ValueError(f"compile_repeated_blocks: {type(model).__name__} has no repeated blocks "
                         "(no _repeated_blocks and no top-level ModuleList)")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


@contextmanager
def reference_transformer(transformer: torch.nn.Module,
                          frozen: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
    """The module that predicts with the reference weights, inside a `with` block; pass it to
    `FlowPolicy.predict_velocity(..., transformer=...)`.

    Args:
        transformer (`torch.nn.Module`): the trained transformer (a `PeftModel` for LoRA).
        frozen (`torch.nn.Module`, *optional*): the reference of full fine-tuning (see [`frozen_copy`]), yielded as
            it is. Without it `transformer` must be a LoRA model, and the reference is the same model with its
            adapter disabled (`PeftModel.disable_adapter()`), at no memory cost.
    """
    if frozen is not None:
        yield frozen
    elif isinstance(transformer, PeftModel):
        with transformer.disable_adapter():
            yield transformer
    else:
        raise ValueError("full fine-tuning needs a frozen reference transformer (see `frozen_copy`)")


def lora_state_dict(transformer: PeftModel,
                    state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights with diffusers' key names (`transformer_blocks.0.attn.to_q.lora_A.weight`), on CPU.

    Args:
        transformer (`peft.PeftModel`).
        state_dict (`dict`, *optional*): a full state dict gathered elsewhere (DeepSpeed ZeRO-3).
    """
    weights = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=transformer.active_adapter)
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


def loading_code(save_directory: str, base_model: str | None, transformer: torch.nn.Module) -> str:
    """Python that loads what [`save_trained`] wrote in `save_directory` into the base pipeline, with stock
    diffusers only; it runs as written when `base_model` is a Hub id or folder (a model card shows it).

    Args:
        save_directory (`str`): the folder written (its absolute path is used).
        base_model (`str`, *optional*): Hub id or folder of the base pipeline; `None` writes `BASE_MODEL` in its place.
        transformer (`torch.nn.Module`): the trained transformer (a `PeftModel` for LoRA).
    """
    folder = json.dumps(os.path.abspath(save_directory))
    base = json.dumps(base_model if base_model else "BASE_MODEL")
    if is_lora(transformer):
        return ("from diffusers import DiffusionPipeline\n\n"
                f"pipe = DiffusionPipeline.from_pretrained({base})\n"
                f"pipe.transformer.load_lora_adapter({folder}, prefix=\"{TRANSFORMER_PREFIX}\",\n"
                f"                                   weight_name=\"{LORA_WEIGHT_NAME}\")\n")
    cls = type(base_transformer(transformer))
    diffusers = importlib.import_module("diffusers")
    module = "diffusers" if getattr(diffusers, cls.__name__, None) is cls else cls.__module__
    imports = (f"from diffusers import DiffusionPipeline, {cls.__name__}\n" if module == "diffusers" else
               f"from diffusers import DiffusionPipeline\nfrom {module} import {cls.__name__}\n")
    return (f"{imports}\n"
            f"transformer = {cls.__name__}.from_pretrained({folder}, subfolder=\"{TRANSFORMER_PREFIX}\")\n"
            f"pipe = DiffusionPipeline.from_pretrained({base}, transformer=transformer)\n")


def write_model_card(save_directory: str, *, method: str, base_model: str | None, transformer: torch.nn.Module,
                     details: dict[str, object] | None = None, metrics: dict[str, float] | None = None) -> str:
    """Write a short `README.md`: what was trained, from which base model, how to load it (code that runs as
    written, see [`loading_code`]), the training settings and the final metrics.

    Args:
        method (`str`): e.g. `"GRPO"`.
        base_model (`str`, *optional*): Hub id or folder of the base pipeline (`FlowPolicy.base_model_name_or_path`).
        transformer (`torch.nn.Module`): the trained transformer (a `PeftModel` for LoRA).
        details (`dict`, *optional*): training facts (reward functions, steps, ...), one line each.
        metrics (`dict[str, float]`, *optional*): final metrics, one line each.
    """
    lora = is_lora(transformer)
    base = base_model or "a base model that was not recorded"
    tags = ["rlhf-image", method.lower()] + (["lora"] if lora else [])
    front = ["---", "library_name: diffusers", "tags: [" + ", ".join(tags) + "]"]
    if base_model and not os.path.isdir(base_model):  # a Hub id: the Hub links it
        front.append(f"base_model: {base_model}")
    unrecorded = [] if base_model else [
        "The base model was not recorded (the pipeline was built in memory): replace `BASE_MODEL` below by its Hub id "
        "or folder, or set `policy.base_model_name_or_path` before training.", ""]
    lines = [
        *front, "---", "", f"# {method} fine-tune of {base}", "",
        f"{'LoRA adapter' if lora else 'Full transformer weights'} trained with rlhf-image's {method} trainer.", "",
        "## Loading", "", *unrecorded, "```python", loading_code(save_directory, base_model, transformer).rstrip("\n"),
        "```", "",
        "## Training", "",
        f"- base model: {base_model or '(not recorded)'}",
        *[f"- {key}: {value}" for key, value in (details or {}).items()],
        "", "## Final metrics", "",
        *([f"- {key}: {value:.6g}" for key, value in metrics.items()] if metrics else ["- (none logged)"]), "",
    ]
    path = os.path.join(save_directory, "README.md")
    os.makedirs(save_directory, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
