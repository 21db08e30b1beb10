"""What every trainer shares through `BaseTrainer`, checked on GRPO, DPO and flow matching alike: the image size
refused the same way, the dataset contract, pipelines that carry a loaded LoRA adapter, gradient checkpointing, the
non-finite guard, seeded LoRA initialisation, counters that survive a resume, and outputs that stock diffusers loads
with the model card's own code."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from grpo_helpers import brightness
from peft import LoraConfig
from transformers import TrainerCallback

from rlhf_image import DPOConfig, DPOTrainer, FlowMatchingConfig, FlowMatchingTrainer, GRPOConfig, GRPOTrainer
from rlhf_image.model_io import prepare_transformer, save_lora
from rlhf_image.policy import FlowPolicy
from rlhf_image.recipes.ovis_image.model import ovis_image_tiny

KINDS = ["grpo", "dpo", "fm"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SIZE = 16  # pixels; the tiny model's unit is 4


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, **kwargs)


def policy_of(pipe=None) -> FlowPolicy:
    return FlowPolicy.from_pipeline(pipe if pipe is not None else ovis_image_tiny(seed=0), max_sequence_length=16)


def image(level: int) -> PIL.Image.Image:
    rng = np.random.default_rng(level)
    return PIL.Image.fromarray(np.clip(level + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype("uint8"))


def rows(kind: str, n: int = 4) -> list[dict]:
    if kind == "grpo":
        return [{"prompt": f"prompt {i}"} for i in range(n)]
    if kind == "dpo":
        return [{"prompt": f"prompt {i}", "chosen": image(200 + i), "rejected": image(40 + i)} for i in range(n)]
    return [{"prompt": f"prompt {i}", "image": image(60 * i)} for i in range(n)]


CONFIGS = {"grpo": GRPOConfig, "dpo": DPOConfig, "fm": FlowMatchingConfig}


def config(kind: str, output_dir, **overrides):
    values = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True, seed=0, max_steps=1,
                  learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", logging_steps=1,
                  resolution=SIZE, per_device_train_batch_size=2)
    if kind == "grpo":
        values.update(num_generations=2, num_inference_steps=2, guidance_scale=1.0, log_samples_steps=0)
    values.update(overrides)
    return CONFIGS[kind](**values)


def trainer_of(kind: str, output_dir, model=None, dataset=None, peft_config=None, callbacks=None, **overrides):
    model = model if model is not None else policy_of()
    args = config(kind, output_dir, **overrides)
    dataset = rows(kind) if dataset is None else dataset
    if kind == "grpo":
        return GRPOTrainer(model, brightness, args=args, train_dataset=dataset, peft_config=peft_config,
                           callbacks=callbacks)
    trainer_class = DPOTrainer if kind == "dpo" else FlowMatchingTrainer
    return trainer_class(model, args=args, train_dataset=dataset, peft_config=peft_config, callbacks=callbacks)


def velocity(policy: FlowPolicy, transformer=None) -> torch.Tensor:
    latents = torch.randn(2, policy.num_latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return policy.predict_velocity(latents, torch.tensor([0.3, 0.7]), policy.encode_prompt(["a cat", "the sea"]),
                                       transformer=transformer)


# --- construction checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_an_image_size_the_model_cannot_take_is_refused_at_construction(tmp_path, kind):
    """GRPO used to sample 30 px as 28 px without a word: now every trainer refuses it the same way."""
    with pytest.raises(ValueError, match=r"Config\.resolution=30: image size 30x30 px: this model .* positive "
                                         r"multiples of 4 px .* use e.g. 32x32"):
        trainer_of(kind, tmp_path, resolution=30)
    with pytest.raises(ValueError, match=r"Config\.resolution=16, width=33: image size 16x33 px"):
        trainer_of(kind, tmp_path, width=33)


@pytest.mark.parametrize("kind", KINDS)
def test_the_dataset_contract_is_checked_at_construction(tmp_path, kind):
    trainer_of(kind, tmp_path)  # the good rows
    with pytest.raises(ValueError, match="train_dataset is empty"):
        trainer_of(kind, tmp_path, dataset=[])
    with pytest.raises(TypeError, match=r"rows must be mappings .* the first row is a str: 'a cat'.*'prompt': p"):
        trainer_of(kind, tmp_path, dataset=["a cat", "a dog"])
    with pytest.raises(TypeError, match="must be a map-style dataset .* got int"):
        trainer_of(kind, tmp_path, dataset=42)
    if kind == "dpo":  # DPO reads a string as the folder of a pair dataset
        with pytest.raises(FileNotFoundError, match="no manifest.jsonl in a cat"):
            trainer_of(kind, tmp_path, dataset="a cat")
    else:
        with pytest.raises(TypeError, match="must be a map-style dataset .* got str"):
            trainer_of(kind, tmp_path, dataset="a cat")
    with pytest.raises(TypeError, match=r"dict of splits \['train'\]; pass one split"):
        trainer_of(kind, tmp_path, dataset={"train": rows(kind)})
    renamed = [{("caption" if k == "prompt" else k): v for k, v in row.items()} for row in rows(kind)]
    found = re.escape(str(sorted(renamed[0])))
    with pytest.raises(ValueError, match=rf"lacks the column\(s\) \['prompt'\] .* first row has {found}"):
        trainer_of(kind, tmp_path, dataset=renamed)


@pytest.mark.parametrize("kind", ["dpo", "fm"])
def test_images_must_be_a_kind_the_trainers_read(tmp_path, kind):
    column = "chosen" if kind == "dpo" else "image"
    bad = [{**row, column: 3.5} for row in rows(kind)]
    with pytest.raises(TypeError, match=rf"column '{column}' holds a float; images must be paths, PIL images"):
        trainer_of(kind, tmp_path, dataset=bad)
    latents = [{**row, column: torch.zeros(3, 4, 4)} for row in rows(kind)]
    with pytest.raises(ValueError, match=r"precomputed latents \[C, h, w\] with C = 4 .* got shape \(3, 4, 4\)"):
        trainer_of(kind, tmp_path, dataset=latents)


@pytest.mark.parametrize("kind", KINDS)
def test_learning_rate_must_be_a_positive_number(tmp_path, kind):
    for value in (0.0, -1e-3, math.nan, "1e-4"):
        with pytest.raises(ValueError, match=rf"{CONFIGS[kind].__name__}\.learning_rate=.*accepted: a finite "
                                             r"number > 0"):
            config(kind, tmp_path, learning_rate=value)


# --- a pipeline with a LoRA adapter loaded ---------------------------------------------------------

def lora_folder(tmp_path):
    """An adapter written in diffusers' format, as a user would have downloaded one."""
    policy = policy_of()
    policy.transformer = prepare_transformer(policy.transformer, lora(init_lora_weights="gaussian"), seed=7)
    folder = tmp_path / "downloaded_lora"
    save_lora(policy.transformer, str(folder))
    return str(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_a_loaded_adapter_is_refused_with_the_fix(tmp_path, kind):
    """Training a pipeline with an adapter loaded would update base and adapter together and save keys stock diffusers
    cannot load; every trainer refuses it, with and without peft_config, and names the fix. After the fix it
    trains, and the result loads."""
    pipe = ovis_image_tiny(seed=0)
    pipe.transformer.load_lora_adapter(lora_folder(tmp_path), prefix="transformer",
                                       weight_name="pytorch_lora_weights.safetensors")
    for peft_config in (None, lora()):
        with pytest.raises(ValueError, match=r"carries LoRA adapter\(s\) \['default_0'\] loaded into the pipeline"
                                             r".*pipe.transformer.fuse_lora\(\)` then `pipe.transformer.unload_lora"):
            trainer_of(kind, tmp_path / "run", model=policy_of(pipe), peft_config=peft_config)
    loaded = velocity(policy_of(pipe))
    pipe.transformer.fuse_lora()
    pipe.transformer.unload_lora()
    assert torch.allclose(velocity(policy_of(pipe)), loaded, atol=1e-6)  # the adapter is in the base weights now
    trainer = trainer_of(kind, tmp_path / "run", model=policy_of(pipe))
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    stock = ovis_image_tiny(seed=0)
    from diffusers import OvisImageTransformer2DModel

    stock.transformer = OvisImageTransformer2DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer")
    assert torch.equal(velocity(policy_of(stock)), velocity(trainer.policy))


# --- outputs stock diffusers loads, with the model card's code --------------------------------------

@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder: the base model the cards name."""
    folder = tmp_path_factory.mktemp("base") / "tiny-ovis"
    ovis_image_tiny(seed=0).save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_output_loads_with_the_model_cards_code(tmp_path, base_folder, kind, use_lora):
    pipe = DiffusionPipeline.from_pretrained(base_folder)
    trainer = trainer_of(kind, tmp_path / "run", model=policy_of(pipe), peft_config=lora() if use_lora else None)
    assert trainer.policy.base_model_name_or_path == base_folder
    trainer.train()
    out = tmp_path / "out"
    trainer.save_model(str(out))
    card = (out / "README.md").read_text()
    assert f"fine-tune of {base_folder}" in card and f"- base model: {base_folder}" in card
    assert ("LoRA adapter" if use_lora else "Full transformer weights") in card
    code = card.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(code, namespace)  # the card's loading code, as written
    loaded = FlowPolicy.from_pipeline(namespace["pipe"], max_sequence_length=16)
    trainer.policy.transformer.eval()
    trained = velocity(trainer.policy)
    assert torch.allclose(velocity(loaded), trained, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(velocity(policy_of(DiffusionPipeline.from_pretrained(base_folder))), trained, atol=1e-5)


# --- gradient checkpointing, the non-finite guard, seeds, counters -----------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_gradient_checkpointing_is_one_flag_for_every_trainer(tmp_path, kind):
    plain = trainer_of(kind, tmp_path / "a")
    plain.train()
    checkpointed = trainer_of(kind, tmp_path / "b", gradient_checkpointing=True)
    assert checkpointed.model.is_gradient_checkpointing
    assert not checkpointed.args.activation_checkpointing  # taken by the trainer, not by the Trainer's own call
    checkpointed.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, checkpointed)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)


@pytest.mark.parametrize("kind", ["dpo", "fm"])  # GRPO's: tests/test_grpo_trainer.py
def test_nonfinite_steps_are_skipped_then_stop_training(tmp_path, kind):
    trainer = trainer_of(kind, tmp_path, max_steps=3, peft_config=lora())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    def poison(module, inputs, output):  # NaN velocity in the training forward of step 0 only
        if torch.is_grad_enabled() and trainer.state.global_step == 0:
            return (output[0] * float("nan"),)
        return output

    trainer.model.get_base_model().register_forward_hook(poison)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})

    trainer.add_callback(Snapshot())
    trainer.train()
    assert all(torch.equal(snapshots[0][n], before[n]) for n in before)  # step 1 skipped: nothing moved
    assert any(not torch.equal(snapshots[1][n], before[n]) for n in before)
    logged = [e for e in trainer.state.log_history if "nonfinite/skipped" in e]
    assert [e["nonfinite/skipped"] for e in logged] == [1.0, 0.0, 0.0]
    assert logged[-1]["nonfinite/skipped_steps_total"] == 1.0
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {2}  # no Adam state from the skipped step

    stopping = trainer_of(kind, tmp_path / "stop", max_steps=5, max_consecutive_nonfinite=2, peft_config=lora())
    next(p for p in stopping.model.parameters() if p.requires_grad).register_hook(lambda g: g * float("nan"))
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row .*max_consecutive_nonfinite=2"):
        stopping.train()


@pytest.mark.parametrize("kind", KINDS)
def test_two_identical_trainers_in_one_process_train_identically(tmp_path, kind):
    """The LoRA adapter is initialised from args.seed (gaussian init draws random A and B), not from whatever the
    global random state is when the trainer is built."""
    runs = []
    for name in ("first", "second"):
        trainer = trainer_of(kind, tmp_path / name, max_steps=2, peft_config=lora(init_lora_weights="gaussian"))
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        torch.manual_seed(len(runs) + 123)  # a different global state for the next construction
        runs.append((initial, [e["loss"] for e in trainer.state.log_history if "loss" in e],
                     {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}))
    (init_a, losses_a, final_a), (init_b, losses_b, final_b) = runs
    assert all(torch.equal(init_a[n], init_b[n]) for n in init_a)
    assert losses_a == losses_b and len(losses_a) == 2
    assert all(torch.equal(final_a[n], final_b[n]) for n in final_a)
    other = trainer_of("grpo" if kind == "grpo" else kind, tmp_path / "other", seed=1,
                       peft_config=lora(init_lora_weights="gaussian"))
    assert any(not torch.equal(p, init_a[n]) for n, p in other.model.named_parameters() if p.requires_grad)


def test_counters_survive_a_resume_in_the_trainer_state(tmp_path):
    """The running counts resume from the checkpoint's trainer_state.json (a stateful callback): no extra file."""

    def picky(prompts, images, **columns):
        return [None if i % 2 else v for i, v in enumerate(brightness(prompts, images))]

    def make(output_dir, **overrides):
        args = config("grpo", output_dir, max_steps=3, save_strategy="steps", save_steps=1, **overrides)
        return GRPOTrainer(policy_of(), picky, args=args, train_dataset=rows("grpo"))

    straight = make(tmp_path / "straight")
    straight.train()
    totals = [e["rewards/unscored_total"] for e in straight.state.log_history if "rewards/unscored_total" in e]
    assert totals == [1.0, 2.0, 3.0]
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["TrainerCounters"]["args"]["counts"]["rewards/unscored_total"] == 2
    assert not (checkpoint / "grpo_state.json").exists()
    resumed = make(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.counters["rewards/unscored_total"] == 3
    assert [e["rewards/unscored_total"] for e in resumed.state.log_history if "rewards/unscored_total" in e] == totals


# --- one data contract: images as paths, PIL images, arrays or latents --------------------------------

@pytest.mark.parametrize("kind", ["dpo", "fm"])
def test_images_as_paths_arrays_or_latents_train_like_pil_images(tmp_path, kind):
    """The same pixels given as PIL images, files, numpy arrays (uint8 and float in [0, 1]) train bit for bit alike;
    precomputed latents (encoded in the trainer's padded chunks) too."""
    columns = ["chosen", "rejected"] if kind == "dpo" else ["image"]
    pil = rows(kind)

    def losses(dataset, name):
        trainer = trainer_of(kind, tmp_path / name, dataset=dataset, max_steps=2)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    def converted(convert):
        return [{**row, **{c: convert(row[c], f"{i}-{c}") for c in columns}} for i, row in enumerate(pil)]

    def to_file(picture, name):
        path = tmp_path / f"{name}.png"
        picture.save(path)
        return str(path)

    expected = losses(pil, "pil")
    assert losses(converted(to_file), "paths") == expected
    assert losses(converted(lambda p, _: np.asarray(p)), "uint8") == expected
    assert losses(converted(lambda p, _: np.asarray(p).astype(np.float32) / 255), "float") == expected
    encoder = policy_of()
    latents = {}
    for column in columns:  # chunks of the trainer's encode batch size (2), as the trainer encodes them
        for first in (0, 2):
            encoded = encoder.encode_images([row[column] for row in pil[first:first + 2]])
            for i in range(2):
                latents[(first + i, column)] = encoded[i]
    given = [{**row, **{c: latents[(i, c)] for c in columns}} for i, row in enumerate(pil)]
    assert losses(given, "latents") == expected
