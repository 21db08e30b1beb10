"""DPOTrainer on the tiny Ovis-Image pipeline: log 2 at the start, the loss and gradient against an independent
computation, exact resume, caches, saving, and learning a synthetic preference (bright over dark)."""

import copy
import math

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import TrainerCallback

from rlhf_image.dpo_config import DPOConfig
from rlhf_image.dpo_trainer import DPOTrainer
from rlhf_image.losses import interpolate, per_sample_mse
from rlhf_image.policy import Conditioning, FlowPolicy
from rlhf_image.preference_data import collate_pairs
from rlhf_image.sampling import generate
from rlhf_image.schedule import calculate_shift
from rlhf_image.seeding import Stream, seeded_generator
from tiny_models import tiny_ovis_pipeline

LOG2_FLOAT32 = torch.log(torch.tensor(2.0)).item()
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_policy(seed: int = 0) -> FlowPolicy:
    return FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=seed), max_sequence_length=16)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=True)


def flat_image(level: float, rng: np.random.Generator, size: int = 16) -> PIL.Image.Image:
    pixels = np.clip(level + rng.normal(0, 20, (size, size, 3)), 0, 255).astype("uint8")
    return PIL.Image.fromarray(pixels)


def bright_dark_rows(n: int, seed: int = 0, size: int = 16) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": f"a photo, number {i}", "chosen": flat_image(215, rng, size),
             "rejected": flat_image(40, rng, size)} for i in range(n)]


def config(tmp_path, **kwargs) -> DPOConfig:
    defaults = dict(output_dir=str(tmp_path), resolution=16, per_device_train_batch_size=2, report_to="none",
                    use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, lr_scheduler_type="constant",
                    learning_rate=1e-3)
    defaults.update(kwargs)
    return DPOConfig(**defaults)


def dpo_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "dpo_loss" in entry]


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_first_step_loss_is_log2_from_the_reference(tmp_path, use_lora):
    trainer = DPOTrainer(make_policy(), args=config(tmp_path, max_steps=1), train_dataset=bright_dark_rows(4),
                         peft_config=lora_config() if use_lora else None)
    trainer.train()
    (first,) = dpo_logs(trainer)
    assert first["dpo_loss"] == LOG2_FLOAT32
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/accuracy"] == 0.0 and first["rewards/margin"] == 0.0
    assert first["error/policy_chosen"] == first["error/ref_chosen"]
    assert first["error/policy_rejected"] == first["error/ref_rejected"]


@pytest.mark.parametrize("sdpo", [None, "output", "parameter"], ids=["dpo", "sdpo-output", "sdpo-parameter"])
def test_loss_and_gradient_match_an_independent_computation(tmp_path, sdpo):
    policy, reference = make_policy(0), make_policy(1)
    rows = bright_dark_rows(3)
    args = config(tmp_path, per_device_train_batch_size=3, beta=50.0, sdpo=sdpo is not None,
                  sdpo_space=sdpo or "output", sdpo_mu=0.3)
    trainer = DPOTrainer(policy, ref_model=reference, args=args, train_dataset=rows)
    trainer.model.train()
    batch = collate_pairs(rows)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters()]

    # Independent: the same draws, winner and loser through the transformer separately, the formula by hand.
    generator = seeded_generator(0, Stream.MICRO_BATCH, 0)  # micro-batch 0 of step 0
    torch.rand(3, generator=generator)  # the CFG-dropout draws come first (probability 0 here)
    s = torch.sigmoid(torch.randn(3, generator=generator))  # logit-normal
    mu = calculate_shift(16)  # 16 image tokens; the exponential shift of the Ovis-Image scheduler
    sigma = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    check = make_policy(0)
    x0_w = check.encode_images([r["chosen"] for r in rows])
    x0_l = check.encode_images([r["rejected"] for r in rows])
    cond = check.encode_prompt([r["prompt"] for r in rows])
    params = list(check.transformer.parameters())
    errors, ref_errors, residuals = [], [], []
    for x0 in (x0_w, x0_l):
        x_t, target = interpolate(x0, noise, sigma)
        velocity = check.predict_velocity(x_t, sigma, cond)
        errors.append(per_sample_mse(velocity, target))
        residuals.append((velocity - target).detach())
        with torch.no_grad():
            ref_errors.append(per_sample_mse(reference.predict_velocity(x_t, sigma, cond), target))
    logits = -0.5 * 50.0 * ((errors[0] - ref_errors[0]) - (errors[1] - ref_errors[1]))
    expected = torch.log1p(torch.exp(-logits)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Gradient: d loss / d e_w * grad e_w + lambda * d loss / d e_l * grad e_l.
    weight = torch.sigmoid(-logits).detach() * 0.5 * 50.0 / 3
    scale = 1.0
    if sdpo == "output":
        dot, sq = (residuals[0] * residuals[1]).sum().item(), (residuals[0] ** 2).sum().item()
    elif sdpo == "parameter":
        g_w = torch.cat([g.flatten() for g in torch.autograd.grad(errors[0].mean(), params, retain_graph=True)])
        g_l = torch.cat([g.flatten() for g in torch.autograd.grad(errors[1].mean(), params, retain_graph=True)])
        dot, sq = g_w.dot(g_l).item(), g_w.dot(g_w).item()
    if sdpo is not None:
        scale = min(1.0, max(0.0, 0.7 * sq / dot)) if dot > 0 else 1.0
        assert trainer._metrics["train"]["sdpo/lambda"][0] == pytest.approx(scale, rel=1e-3)
    surrogate = (weight * errors[0]).sum() - scale * (weight * errors[1]).sum()
    expected_grads = torch.autograd.grad(surrogate, params)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-6)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_resume_is_exact(tmp_path, use_lora):
    rows = bright_dark_rows(8)
    common = dict(max_steps=4, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2,
                  cfg_dropout_prob=0.5, sdpo=True, cache_latents=True, cache_text_embeddings=True)

    def run(out, callbacks=None, resume=None):
        trainer = DPOTrainer(make_policy(), args=config(out, **common), train_dataset=rows,
                             peft_config=lora_config() if use_lora else None, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    first = run(tmp_path / "interrupted", callbacks=[StopAt(2)])
    assert first.state.global_step == 2
    resumed = run(tmp_path / "interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    losses = [e["dpo_loss"] for e in dpo_logs(straight)]
    # The resumed trainer's history holds the first run's steps (restored from the checkpoint) and its own.
    pieces = [e["dpo_loss"] for e in dpo_logs(first)] + [e["dpo_loss"] for e in dpo_logs(resumed) if e["step"] > 2]
    assert len(losses) == 4
    assert pieces == losses
    assert len(set(losses)) == 4  # the steps really differ
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_caches_give_the_same_losses_and_are_reused(tmp_path, monkeypatch):
    rows = bright_dark_rows(4)
    plain = DPOTrainer(make_policy(), args=config(tmp_path / "a", max_steps=2), train_dataset=rows)
    plain.train()
    cache_dir = tmp_path / "cache"
    cached_args = dict(max_steps=2, cache_latents=True, cache_text_embeddings=True, cache_dir=str(cache_dir))
    cached = DPOTrainer(make_policy(), args=config(tmp_path / "b", **cached_args), train_dataset=rows)
    cached.train()
    assert [e["dpo_loss"] for e in dpo_logs(cached)] == [e["dpo_loss"] for e in dpo_logs(plain)]
    assert len(list(cache_dir.rglob("*.safetensors"))) == 8 + 4  # 4 chosen + 4 rejected latents, 4 prompts

    again = DPOTrainer(make_policy(), args=config(tmp_path / "c", **cached_args), train_dataset=rows)

    def fail(*args, **kwargs):
        raise AssertionError("an encoder ran although everything is cached")

    monkeypatch.setattr(again.policy, "encode_images", fail)
    monkeypatch.setattr(again.policy, "encode_prompt", fail)
    again.train()
    assert [e["dpo_loss"] for e in dpo_logs(again)] == [e["dpo_loss"] for e in dpo_logs(plain)]
    assert again.encoders.latent_cache.num_hits >= 8 and again.encoders.latent_cache.num_misses == 0


def test_precomputed_latents_and_text_embeddings_train_like_images(tmp_path):
    rows = bright_dark_rows(4)
    images = DPOTrainer(make_policy(), args=config(tmp_path / "a", max_steps=2), train_dataset=rows)
    images.train()
    encoder = make_policy()
    latent_rows = []
    for first in (0, 2):  # chunks of the trainer's encode batch size, so the latents are bit-identical
        chunk = rows[first:first + 2]
        chosen = encoder.encode_images([r["chosen"] for r in chunk])
        rejected = encoder.encode_images([r["rejected"] for r in chunk])
        cond = encoder.encode_prompt([r["prompt"] for r in chunk])
        latent_rows += [{"prompt": r["prompt"], "chosen": chosen[i], "rejected": rejected[i],
                         "prompt_embeds": cond.prompt_embeds[i]} for i, r in enumerate(chunk)]
    latents = DPOTrainer(make_policy(), args=config(tmp_path / "b", max_steps=2), train_dataset=latent_rows)
    latents.train()
    assert [e["dpo_loss"] for e in dpo_logs(latents)] == [e["dpo_loss"] for e in dpo_logs(images)]


def test_height_and_width_train_on_non_square_images(tmp_path):
    policy = make_policy()
    trainer = DPOTrainer(policy, args=config(tmp_path, height=16, width=32, max_steps=1),
                         train_dataset=bright_dark_rows(2))
    rows = bright_dark_rows(2)
    latents = trainer.encoders.source_latents([r["chosen"] for r in rows], (16, 32))
    assert latents.shape[-2:] == policy.latent_size(16, 32)
    trainer.train()
    assert math.isfinite(dpo_logs(trainer)[0]["dpo_loss"])


def test_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="resolution=18: image size 18x18 px.* use e.g. 16x16"):
        DPOTrainer(make_policy(), args=config(tmp_path, resolution=18), train_dataset=bright_dark_rows(2))
    with pytest.raises(ValueError, match="resolution=16, width=22: image size 16x22 px"):
        DPOTrainer(make_policy(), args=config(tmp_path, resolution=16, width=22), train_dataset=bright_dark_rows(2))
    with pytest.raises(ValueError, match="ref_model"):
        DPOTrainer(make_policy(), ref_model=make_policy(1), args=config(tmp_path), train_dataset=bright_dark_rows(2),
                   peft_config=lora_config())
    rows = [{"prompt": "p", "winner": None, "loser": None}]
    with pytest.raises(KeyError, match="chosen"):
        collate_pairs(rows)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_save_model_writes_a_loadable_diffusers_model(tmp_path, use_lora):
    from diffusers import OvisImageTransformer2DModel

    from rlhf_image.model_io import load_lora

    policy = make_policy()
    trainer = DPOTrainer(policy, args=config(tmp_path / "run", max_steps=2, learning_rate=1e-2),
                         train_dataset=bright_dark_rows(4), peft_config=lora_config() if use_lora else None)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert "DPO" in (out / "README.md").read_text()
    fresh = tiny_ovis_pipeline()
    if use_lora:
        load_lora(fresh, str(out))
    else:
        fresh.transformer = OvisImageTransformer2DModel.from_pretrained(str(out), subfolder="transformer")
    loaded = FlowPolicy.from_pipeline(fresh, max_sequence_length=16)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = policy.encode_prompt(["a", "b"])
    with torch.no_grad():
        policy.transformer.eval()
        trained = policy.predict_velocity(x, torch.tensor([0.3, 0.7]), cond)
        again = loaded.predict_velocity(x, torch.tensor([0.3, 0.7]), cond)
        base = FlowPolicy.from_pipeline(tiny_ovis_pipeline(), max_sequence_length=16).predict_velocity(
            x, torch.tensor([0.3, 0.7]), cond)
    torch.testing.assert_close(again, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, trained, atol=1e-4)


def brightness_faithful_vae(pipe, steps: int = 150) -> None:
    """Fit the tiny random VAE for a few seconds to reconstruct flat images. A random AutoencoderKL's
    GroupNorms erase an image's mean brightness (decode(encode(x)) is ~0.47 for black and white alike), which
    would make the brightness of generated images meaningless."""
    vae = pipe.vae
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    vae.train()
    for _ in range(steps):
        level = torch.rand(16, 3, 1, 1, generator=generator)
        x = (level + 0.1 * torch.randn(16, 3, 16, 16, generator=generator)).clamp(0, 1) * 2 - 1
        loss = ((vae.decode(vae.encode(x).latent_dist.mode()).sample - x) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)


def test_learns_to_prefer_bright_images(tmp_path):
    pipe = tiny_ovis_pipeline()
    brightness_faithful_vae(pipe)
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=16)
    with torch.no_grad():
        levels = policy.decode(policy.encode_images([flat_image(v, np.random.default_rng(0)) for v in (40, 215)]))
    assert levels[1].mean() - levels[0].mean() > 0.3  # the fitted VAE keeps brightness
    reference = copy.copy(policy)
    reference.transformer = copy.deepcopy(policy.transformer)
    args = config(tmp_path, max_steps=60, per_device_train_batch_size=4, cache_latents=True,
                  cache_text_embeddings=True, eval_strategy="no")
    trainer = DPOTrainer(policy, args=args, train_dataset=bright_dark_rows(16),
                         eval_dataset=bright_dark_rows(8, seed=1))
    trainer.train()
    logs = dpo_logs(trainer)
    assert logs[0]["dpo_loss"] == LOG2_FLOAT32
    assert np.mean([e["rewards/accuracy"] for e in logs[-10:]]) > 0.9
    assert logs[-1]["dpo_loss"] < 0.1
    evaluation = trainer.evaluate()
    assert evaluation["eval_rewards/accuracy"] > 0.9 and evaluation["eval_rewards/margin"] > 0

    prompts, seeds = [f"a photo, number {i}" for i in range(8)], list(range(100, 108))
    policy.transformer.eval()
    tuned = generate(policy, prompts, seeds, height=16, width=16, num_steps=8).images
    base = generate(reference, prompts, seeds, height=16, width=16, num_steps=8).images
    per_sample = tuned.mean(dim=(1, 2, 3)) - base.mean(dim=(1, 2, 3))
    assert per_sample.mean() > 0.015, per_sample
    assert (per_sample > 0).float().mean() >= 0.75
