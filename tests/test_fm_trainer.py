"""FlowMatchingTrainer on a tiny Ovis-Image: the loss against a hand computation, learning, buckets,
encoder caching, EMA, single-process resume, unreadable images, saving and config validation."""

import math

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import safetensors.torch
import torch
from diffusers import OvisImageTransformer2DModel
from transformers import TrainerCallback

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny
from rlhf_image.data import ManifestDataset, nearest_bucket
from rlhf_image.fm_config import FlowMatchingConfig
from rlhf_image.fm_trainer import BucketCollator, FlowMatchingTrainer
from rlhf_image.policy import FlowPolicy
from rlhf_image.seeding import Stream, seeded_generator

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


class Squares(torch.utils.data.Dataset):
    """A coloured square on black, at a position set by the index; caption names the colour."""

    def __init__(self, n, sizes=((16, 16),)):
        self.n, self.sizes = n, sizes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        name = list(COLOURS)[i % 4]
        h, w = self.sizes[i % len(self.sizes)]
        image = PIL.Image.new("RGB", (w, h))
        x, y = (i // 4) % 2 * (w // 2), (i // 8) % 2 * (h // 2)
        image.paste(PIL.Image.new("RGB", (w // 2, h // 2), COLOURS[name]), (x, y))
        return {"image": image, "prompt": f"a {name} square", "key": f"sq{i}"}


def make_policy(seed=0):
    return FlowPolicy.from_pipeline(ovis_image_tiny(seed=seed), max_sequence_length=16)


def make_config(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, resolution=16, max_steps=4,
              learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
              cfg_dropout_prob=0.25, seed=0, disable_tqdm=True)
    kw.update(overrides)
    return FlowMatchingConfig(**kw)


def step_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_loss_matches_hand_computation(tmp_path):
    policy = make_policy()
    trainer = FlowMatchingTrainer(policy, args=make_config(tmp_path, cfg_dropout_prob=0.5, loss_weighting="cosmap"),
                                  train_dataset=Squares(8))
    data = Squares(8)
    batch = BucketCollator([(16, 16)] * 8)([(0, data[0]), (1, data[1]), (2, None), (3, data[3])])
    loss, out = trainer.flow_matching_step(trainer.model, batch, torch.Generator().manual_seed(123))

    g = torch.Generator().manual_seed(123)
    dropped = torch.rand(4, generator=g) < 0.5
    z = torch.randn(4, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)  # 16 px -> 8x8 latents of 4 channels
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)  # calculate_shift(16 image tokens)
    s = torch.sigmoid(z)
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    vae = policy.vae
    x0 = (vae.encode(batch["pixel_values"] * 2 - 1).latent_dist.mode() - vae.config.shift_factor) \
        * vae.config.scaling_factor
    x0[2] = 0  # the unreadable row
    prompts = ["" if d or i == 2 else batch["prompts"][i] for i, d in enumerate(dropped.tolist())]
    x_t = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    with torch.no_grad():
        v = policy.predict_velocity(x_t, s, policy.encode_prompt(prompts))
    err = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    weight = 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    expected = (weight * err)[[0, 1, 3]].sum() / 3

    assert out["prompts"] == prompts and out["num_valid"] == 3
    assert torch.equal(out["noise"], noise)
    torch.testing.assert_close(out["sigmas"], s, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    assert loss.requires_grad

    # a training step seeds each micro-batch by its global number: (step * GA + micro) * world + rank
    trainer.args.gradient_accumulation_steps = trainer.current_gradient_accumulation_steps = 2
    for step, micro in [(0, 0), (0, 1), (3, 0)]:
        trainer.state.global_step = step
        got = trainer.training_step(trainer.model, batch)  # the loss divided by the accumulation steps
        want = trainer.flow_matching_step(trainer.model, batch,
                                          seeded_generator(0, Stream.MICRO_BATCH, step * 2 + micro))[0]
        assert trainer.micro_batch_index == micro
        assert torch.equal(got, want.detach() / 2)


def test_training_lowers_loss(tmp_path):
    data = Squares(8)
    trainer = FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, max_steps=40, cfg_dropout_prob=0.1),
                                  train_dataset=data, eval_dataset=data)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.7 * before, (before, after)
    assert trainer.evaluate()["eval_loss"] == after  # fixed eval noise


def test_batches_have_one_bucket(tmp_path):
    sizes = ((16, 16), (16, 32), (32, 16), (20, 36))
    buckets = [(16, 16), (16, 32), (32, 16)]
    seen = []

    class Recording(FlowMatchingTrainer):
        def flow_matching_step(self, model, inputs, generator):
            seen.append((tuple(inputs["pixel_values"].shape[-2:]), list(inputs["prompts"])))
            return super().flow_matching_step(model, inputs, generator)

    class Sized(Squares):  # the caption tells the source size
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "prompt": f"{item['image'].height} {item['image'].width}"}

    data = Sized(24, sizes)
    trainer = Recording(make_policy(), args=make_config(tmp_path, buckets=["16x16", "16x32", "32x16"],
                                                        per_device_train_batch_size=3, max_steps=8),
                        train_dataset=data)
    trainer.train()
    for shape, captions in seen:
        for caption in captions:
            h, w = map(int, caption.split())
            assert nearest_bucket(h, w, buckets) == shape
    assert {shape for shape, _ in seen} == set(buckets)
    assert all(math.isfinite(x) for x in step_losses(trainer))


def test_cache_skips_encoders_and_keeps_the_loss(tmp_path):
    def run(cache, cache_dir=None, data=Squares(8)):
        policy = make_policy()
        args = make_config(tmp_path, max_steps=6, cfg_dropout_prob=0.3, cache_text_embeddings=cache,
                           cache_latents=cache, cache_dir=cache_dir, output_dir=str(tmp_path / f"out{cache}"))
        trainer = FlowMatchingTrainer(policy, args=args, train_dataset=data)
        calls = {"text": [], "vae": []}
        policy.text_encoder.register_forward_hook(lambda *a: calls["text"].append(trainer.state.global_step))
        policy.vae.encoder.register_forward_hook(lambda *a: calls["vae"].append(trainer.state.global_step))
        trainer.train()
        return step_losses(trainer), calls

    plain, plain_calls = run(False)
    cached, calls = run(True)
    assert cached == plain  # bit-identical losses
    assert calls["text"] and calls["vae"]
    assert max(calls["text"]) < 2 and max(calls["vae"]) < 2  # 2 steps per epoch: nothing after epoch 1
    assert max(plain_calls["vae"]) == 5
    on_disk, disk_calls = run(True, str(tmp_path / "cache"))
    assert on_disk == plain and max(disk_calls["vae"]) < 2
    assert len(list((tmp_path / "cache").glob("latents-*/*/*.safetensors"))) == 8

    class Inverted(Squares):  # same captions and "key"s, other pixels: the content-keyed cache must miss
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "image": PIL.ImageOps.invert(item["image"])}

    _, other_calls = run(True, str(tmp_path / "cache"), Inverted(8))
    assert len(other_calls["vae"]) >= 2 and not other_calls["text"]  # new latents; captions all cached
    assert len(list((tmp_path / "cache").glob("latents-*/*/*.safetensors"))) == 16


@pytest.mark.parametrize("warmup", [False, True], ids=["constant", "warmup"])
def test_ema_matches_hand_computation(tmp_path, warmup):
    snapshots = []

    class Snapshot(TrainerCallback):  # runs before the trainer's own EMA update
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    policy = make_policy()
    initial = {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}
    data = Squares(8)
    trainer = FlowMatchingTrainer(policy, args=make_config(tmp_path, max_steps=3, use_ema=True, ema_decay=0.6,
                                                           ema_warmup=warmup),
                                  train_dataset=data, eval_dataset=data, callbacks=[Snapshot()])
    trainer.train()
    assert len(snapshots) == 3
    # warm-up decays (1 + t) / (10 + t): 2/11, 3/12, 4/13, all below 0.6
    decays = [(1 + t) / (10 + t) for t in (1, 2, 3)] if warmup else [0.6] * 3
    for name, value in initial.items():
        ema = value
        for decay, snap in zip(decays, snapshots):
            ema = decay * ema + (1 - decay) * snap[name]
        torch.testing.assert_close(trainer.ema.shadow[name], ema, rtol=1e-6, atol=1e-7)
    if warmup:
        return
    # evaluation uses the EMA weights and leaves the trained ones in place
    raw = {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}
    with_ema = trainer.evaluate()["eval_loss"]
    assert all(torch.equal(p, raw[n]) for n, p in policy.transformer.named_parameters())
    ema = trainer.ema
    with ema.applied():
        trainer.ema = None
        assert trainer.evaluate()["eval_loss"] == with_ema
    assert trainer.evaluate()["eval_loss"] != with_ema
    trainer.ema = ema
    # the final model is the EMA, in diffusers layout
    trainer.save_model(str(tmp_path / "final"))
    loaded = OvisImageTransformer2DModel.from_pretrained(str(tmp_path / "final" / "transformer"))
    for name, p in loaded.named_parameters():
        assert torch.equal(p, ema.shadow[name])


def test_resume_is_exact(tmp_path):
    """6 steps straight vs 4 steps, checkpoint, new trainer resumes to 6 (mid-epoch: 3 batches per epoch); the
    EMA warm-up's decay depends on the step, so the resumed EMA is exact only if the step count is restored."""
    data = Squares(12)

    def config(out):
        return make_config(tmp_path, output_dir=str(tmp_path / out), max_steps=6, save_strategy="steps",
                           save_steps=4, use_ema=True, ema_decay=0.5, ema_warmup=True)

    straight = FlowMatchingTrainer(make_policy(), args=config("a"), train_dataset=data)
    straight.train()

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 4

    first = FlowMatchingTrainer(make_policy(), args=config("b"), train_dataset=data, callbacks=[StopAt4()])
    first.train()
    assert first.state.global_step == 4 and (tmp_path / "b" / "checkpoint-4" / "ema.safetensors").is_file()
    policy = make_policy()  # same frozen encoders (not in checkpoints), other transformer init: the checkpoint's wins
    policy.transformer.load_state_dict(make_policy(seed=1).transformer.state_dict())
    resumed = FlowMatchingTrainer(policy, args=config("b"), train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    losses = step_losses(straight)
    assert len(losses) == 6 and step_losses(first) == losses[:4]
    assert step_losses(resumed) == losses  # the resumed history: 4 restored steps + 2 new ones
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    for name, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[name]), name


def test_unreadable_images_are_skipped_and_logged(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i in range(6):
        Squares(8)[i]["image"].save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": Squares(8)[i]["prompt"]})
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:40])  # truncated
    (folder / "4.png").write_text("not a png")
    (folder / "m.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    dataset = ManifestDataset(str(folder / "m.jsonl"))
    trainer = FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, per_device_train_batch_size=3,
                                                                  max_steps=4), train_dataset=dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["data/skipped_images"] for h in logs][-1] == 4  # 2 bad images x 2 epochs
    assert all(math.isfinite(h["loss"]) for h in logs)


def test_gradient_checkpointing_and_bf16_run(tmp_path):
    data = Squares(8)
    plain = FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, max_steps=2), train_dataset=data)
    plain.train()
    checkpointed = FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, max_steps=2, gradient_checkpointing=True),
                                       train_dataset=data)
    assert checkpointed.model.is_gradient_checkpointing
    checkpointed.train()
    np.testing.assert_allclose(step_losses(checkpointed), step_losses(plain), rtol=1e-6)
    bf16 = FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, max_steps=2, bf16=True), train_dataset=data)
    bf16.train()
    np.testing.assert_allclose(step_losses(bf16), step_losses(plain), rtol=0.05)


@pytest.mark.parametrize("field,value,match", [
    ("timestep_sampling", "gaussian", "timestep_sampling"), ("cfg_dropout_prob", 1.0, "cfg_dropout_prob"),
    ("buckets", ["64by64"], "buckets"), ("buckets", ["32x4000"], "buckets"),
    ("loss_weighting", "snr", "loss_weighting"),
    ("ema_decay", 1.0, "ema_decay"), ("cache_dir", "/tmp/x", "cache_dir"), ("logit_std", 0.0, "logit_std"),
    ("remove_unused_columns", True, "remove_unused_columns")])
def test_config_validation(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **{field: value})


def test_buckets_must_fit_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"FlowMatchingConfig.resolution=18: image size 18x18 px.* use e.g. 16x16"):
        FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, resolution=18), train_dataset=Squares(4))
    with pytest.raises(ValueError, match=r"FlowMatchingConfig.buckets=.*image size 16x18 px"):
        FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, buckets=["16x16", "16x18"]),
                            train_dataset=Squares(4))


def test_checkpoint_weights_are_safetensors(tmp_path):
    trainer = FlowMatchingTrainer(make_policy(), args=make_config(tmp_path, max_steps=1, save_strategy="steps",
                                                                  save_steps=1), train_dataset=Squares(4))
    trainer.train()
    state = safetensors.torch.load_file(str(tmp_path / "out" / "checkpoint-1" / "model.safetensors"))
    assert all(torch.equal(state[n], p) for n, p in trainer.model.named_parameters())


def test_lora_sft_trains_only_the_adapter(tmp_path):
    from peft import LoraConfig

    from rlhf_image.model_io import LORA_WEIGHT_NAME, load_lora

    policy = make_policy()
    base = {n: p.detach().clone() for n, p in policy.transformer.named_parameters()}
    trainer = FlowMatchingTrainer(policy, args=make_config(tmp_path, max_steps=3, use_ema=True, ema_decay=0.5),
                                  train_dataset=Squares(8),
                                  peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainer.train()
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and set(trainer.ema.shadow) == set(names)
    for name, p in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / LORA_WEIGHT_NAME).is_file() and (tmp_path / "final" / "README.md").is_file()
    # the saved adapter is the EMA: a fresh pipeline with it loaded predicts as the EMA-applied policy does
    pipe = ovis_image_tiny(seed=0)
    load_lora(pipe, str(tmp_path / "final"))
    x, s = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    loaded = FlowPolicy.from_pipeline(pipe, max_sequence_length=16)
    with torch.no_grad(), trainer.ema.applied():
        cond = policy.encode_prompt(["a red square"])
        torch.testing.assert_close(loaded.predict_velocity(x, s, cond), policy.predict_velocity(x, s, cond))


def test_flux_with_pooled_text_and_cache(tmp_path):
    """A second family (CLIP pooled + T5 conditioning): trains, and the cache reproduces the loss."""
    from tiny_models import tiny_flux_pipeline

    def run(cache):
        policy = FlowPolicy.from_pipeline(tiny_flux_pipeline(), max_sequence_length=16)
        args = make_config(tmp_path, max_steps=4, cache_text_embeddings=cache, cache_latents=cache)
        trainer = FlowMatchingTrainer(policy, args=args, train_dataset=Squares(8))
        trainer.train()
        return step_losses(trainer)

    plain = run(False)
    assert len(plain) == 4 and all(math.isfinite(x) for x in plain)
    assert run(True) == plain
