"""NFTTrainer (DiffusionNFT, and AWM as `loss_type="awm"`) on the tiny Ovis-Image model: the loss and gradient of a
micro-batch against a computation by hand from the papers' formulas, the old policy's soft updates and the rollouts
it samples, rewards with `None`, the non-finite guard, zero-advantage skipping, saving, and bad settings."""

import json
import math
import os

import pytest
import torch
from diffusers import OvisImageTransformer2DModel
from grpo_helpers import LORA_TARGETS, brightness, dataset, flux_policy, logged, ovis_policy, tiny_nft_config
from peft import LoraConfig
from test_grpo_save import velocity
from tiny_models import MAX_SEQUENCE_LENGTH, tiny_flux_pipeline
from transformers import TrainerCallback

from rlhf_image import FlowPolicy, InProcessRolloutEngine, NFTConfig, NFTTrainer
from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
from rlhf_image.sampling import Trajectory
from rlhf_image.losses import interpolate, per_sample_mse
from rlhf_image.nft import (awm_loss, nft_loss, old_policy_decay, optimality_probability, random_schedule_sigmas,
                            stratified_schedule_sigmas)
from rlhf_image.seeding import Stream, seeded_generator

ROWS = [{"prompt": prompt} for prompt in ("a cat", "a red house") for _ in range(4)]  # one rollout batch
TWO_PROMPTS = [{"prompt": "a cat"}, {"prompt": "a red house"}]  # a dataset whose every rollout holds both


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def gradients(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def record_weights_after_each_step(trainer) -> list[dict[str, torch.Tensor]]:
    """A list that holds the trainable weights after each optimizer step once `trainer.train()` has run."""
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(trainable(trainer))

    trainer.add_callback(Snapshot())
    return snapshots


def velocity_with(trainer, weights, x_t, sigma, cond):
    """The policy's velocity with `weights` copied into its trainable parameters (restored afterwards)."""
    params = dict(trainer.model.named_parameters())
    backup = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)
        velocity = trainer.policy.predict_velocity(x_t, sigma, cond)
        for n, w in backup.items():
            params[n].copy_(w)
    return velocity


@pytest.mark.parametrize("loss_type,use_lora", [("nft", True), ("nft", False), ("awm", True)],
                         ids=["nft-lora", "nft-full", "awm-lora"])
def test_loss_and_gradient_are_the_papers_formulas(tmp_path, loss_type, use_lora):
    args = tiny_nft_config(tmp_path, loss_type=loss_type, beta=0.05, gradient_accumulation_steps=2, nft_beta=0.5)
    trainer = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=ROWS,
                         peft_config=lora() if use_lora else None)
    model = trainer.model
    model.train()
    trainer._setup_old_policy()  # what training does at its start
    generator = torch.Generator().manual_seed(1)  # an old policy that differs from the trained weights
    for shadow in trainer.old_policy.shadow.values():
        shadow.add_(0.05 * torch.randn(shadow.shape, generator=generator))
    old_weights = dict(trainer.old_policy.shadow)
    inputs = trainer._prepare_inputs(ROWS)  # the rollout (sampled by the old policy), then micro-batch 0
    trajectory, advantages = inputs["trajectory"], inputs["advantages"]

    # The optimality probability from the rewards of the whole rollout batch (the paper's r, the code's clipping).
    whole = Trajectory.cat([batch["trajectory"] for batch in trainer._buffer])
    rewards = brightness(whole.prompts, whole.pil_images())
    r = optimality_probability(rewards, torch.arange(8) // 4)[:4]
    torch.testing.assert_close(0.5 + 0.5 * advantages / args.advantage_clip, r, rtol=1e-4, atol=1e-5)

    # By hand: the noise levels and noise of micro-batch 0, the old/trained/reference velocities, the loss.
    generator = seeded_generator(args.seed, Stream.NOISED_COPIES, 0, 0)
    x0 = trajectory.final_latents.float()
    if loss_type == "nft":
        count = int(0.99 * args.num_inference_steps)
        sigmas = random_schedule_sigmas(trajectory.sigmas, 4, count, generator)
    else:
        sigmas = stratified_schedule_sigmas(trajectory.sigmas, 2, 1, 3, generator)[:, None].expand(-1, 4)
    parts = []
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=generator)
        x_t, target = interpolate(x0, noise, sigma)
        # Every old velocity before any trained forward: swapping weights in would invalidate the saved graphs.
        old_velocity = velocity_with(trainer, old_weights, x_t, sigma, trajectory.cond) if loss_type == "nft" else None
        parts.append((sigma, x_t, target, old_velocity))
    expected = torch.zeros(())
    a = advantages / args.advantage_clip
    for sigma, x_t, target, old_velocity in parts:
        velocity = trainer.policy.predict_velocity(x_t, sigma, trajectory.cond, transformer=model)
        if loss_type == "nft":
            assert not torch.equal(old_velocity, velocity.detach())
            loss, _ = nft_loss(velocity, old_velocity, target, sigma, 0.5 + 0.5 * a, 0.5, loss_scale=5.0)
        else:
            loss, _ = awm_loss(velocity, target, sigma, a, "ghuber", 0.25)
        with torch.no_grad(), trainer.reference_transformer() as reference:
            reference_velocity = trainer.policy.predict_velocity(x_t, sigma, trajectory.cond, transformer=reference)
        expected = expected + (loss + 0.05 * per_sample_mse(velocity, reference_velocity).mean()) / len(sigmas)
    (expected / args.gradient_accumulation_steps).backward()
    expected_grads = gradients(model)
    model.zero_grad(set_to_none=True)

    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # as the training loop sets it
    returned = trainer.training_step(model, ROWS)
    grads = gradients(model)
    assert set(grads) == set(expected_grads) and grads and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-8, msg=name)
    torch.testing.assert_close(returned, expected.detach() / args.gradient_accumulation_steps, rtol=1e-6, atol=0)


class RecordingEngine(InProcessRolloutEngine):
    """The default engine, recording the trainable weights it is synced with before each rollout."""

    def __init__(self):
        super().__init__()
        self.synced = []

    def sync_weights(self, policy, version):
        self.synced.append({n: p.detach().clone() for n, p in policy.transformer.named_parameters()
                            if p.requires_grad})
        super().sync_weights(policy, version)


def test_old_policy_is_soft_updated_on_the_schedule_and_samples_the_rollouts(tmp_path):
    rate, max_decay, flat = 0.2, 0.5, 1
    args = tiny_nft_config(tmp_path, max_steps=6, num_iterations=2, old_policy_decay_rate=rate,
                           old_policy_max_decay=max_decay, old_policy_flat_steps=flat)
    engine = RecordingEngine()
    trainer = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=lora(),
                         rollout_engine=engine)
    initial = trainable(trainer)
    after_step, old_after_step = {}, {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # runs after the trainer's own callbacks
            after_step[state.global_step] = trainable(trainer)
            old_after_step[state.global_step] = {n: t.clone() for n, t in trainer.old_policy.shadow.items()}

    trainer.add_callback(Snapshot())
    trainer.train()
    # Updated after each rollout batch's last step (2, 4, 6), eta = min(rate (step - flat), max) after `flat`.
    old = initial
    for step in (2, 4, 6):
        eta = old_policy_decay(step, rate=rate, max_decay=max_decay, flat_steps=flat)
        assert eta == pytest.approx({2: 0.2, 4: 0.5, 6: 0.5}[step])
        old = {n: eta * old[n] + (1 - eta) * after_step[step][n] for n in old}
        for n in old:
            torch.testing.assert_close(old_after_step[step][n], old[n], rtol=1e-6, atol=1e-7)
        assert all(torch.equal(old_after_step[step - 1][n], old_after_step[step - 2][n] if step > 2 else initial[n])
                   for n in old)  # no update after the first pass of a rollout batch
    # Each rollout (at steps 0, 2, 4) is sampled by the old policy, not by the trained weights.
    assert len(engine.synced) == 3
    for k, step in enumerate((0, 2, 4)):
        reference = initial if step == 0 else old_after_step[step]
        assert all(torch.equal(engine.synced[k][n], reference[n].to(engine.synced[k][n].dtype)) for n in reference)
        if step:
            assert any(not torch.equal(engine.synced[k][n], after_step[step][n]) for n in reference)
    assert logged(trainer, "old_policy/decay") == pytest.approx([0.2, 0.5, 0.5])
    # After the rollouts the trained weights are back (training never ran on the old policy's weights).
    assert any(not torch.equal(trainable(trainer)[n], old_after_step[6][n]) for n in initial)


def test_awm_samples_with_the_trained_weights(tmp_path):
    args = tiny_nft_config(tmp_path, loss_type="awm", max_steps=2)
    engine = RecordingEngine()
    trainer = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=lora(),
                         rollout_engine=engine)
    snapshots = record_weights_after_each_step(trainer)
    trainer.train()
    assert trainer.old_policy is None and trainer.method_name == "AWM"
    assert all(torch.equal(engine.synced[1][n], snapshots[0][n]) for n in snapshots[0])


@pytest.mark.parametrize("loss_type", ["nft", "awm"])
def test_unscored_samples_are_neutral(tmp_path, loss_type):
    def half_unscored(prompts, images, **columns):  # the "a cat" group cannot be scored
        return [None if p == "a cat" else v for p, v in zip(prompts, brightness(prompts, images))]

    args = tiny_nft_config(tmp_path, loss_type=loss_type, max_steps=2)
    trainer = NFTTrainer(ovis_policy(), half_unscored, args=args, train_dataset=TWO_PROMPTS, peft_config=lora())
    inputs = trainer._prepare_inputs(ROWS)
    assert torch.equal(inputs["advantages"], torch.zeros(4))  # micro-batch 0 is the "a cat" group
    assert trainer._buffer[1]["advantages"].abs().sum() > 0
    trainer.train()
    assert logged(trainer, "rewards/unscored") == [4.0, 4.0]
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))
    if loss_type == "nft":
        assert min(logged(trainer, "optimality/min")) < 0.5 < max(logged(trainer, "optimality/max"))


def test_zero_advantage_micro_batches_are_skipped_only_where_the_loss_has_no_gradient(tmp_path):
    def flat_for_cats(prompts, images, **columns):
        return [0.5 if p == "a cat" else v for p, v in zip(prompts, brightness(prompts, images))]

    skipped = {}
    for loss_type in ("awm", "nft"):
        args = tiny_nft_config(tmp_path / loss_type, loss_type=loss_type, max_steps=1)
        trainer = NFTTrainer(ovis_policy(), flat_for_cats, args=args, train_dataset=TWO_PROMPTS,
                             peft_config=lora())
        trainer.train()
        skipped[loss_type] = logged(trainer, "frac_skipped_zero_advantage")
    assert skipped == {"awm": [0.5], "nft": [0.0]}  # r = 1/2 still pulls DiffusionNFT's v towards v_old


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    args = tiny_nft_config(tmp_path, max_steps=3)
    trainer = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=lora())

    def poison(module, inputs, output):  # NaN velocity in the trained forward of step 1 only
        if torch.is_grad_enabled() and trainer.state.global_step == 0:
            return (output[0] * float("nan"),)
        return output

    trainer.model.get_base_model().register_forward_hook(poison)
    before = trainable(trainer)
    snapshots = record_weights_after_each_step(trainer)
    trainer.train()
    assert all(torch.equal(snapshots[0][n], before[n]) for n in before)  # step 1 skipped: nothing moved
    assert any(not torch.equal(snapshots[1][n], before[n]) for n in before)
    assert logged(trainer, "nonfinite/skipped") == [1.0, 0.0, 0.0]
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {2}


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora-flux", "full-ovis"])
def test_saved_model_loads_in_stock_diffusers_with_a_model_card(tmp_path, use_lora):
    args = tiny_nft_config(tmp_path / "run", max_steps=2, learning_rate=3e-2 if use_lora else 1e-3)
    trainer = NFTTrainer(flux_policy() if use_lora else ovis_policy(), brightness, args=args,
                         train_dataset=dataset(), peft_config=lora() if use_lora else None)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "DiffusionNFT" in card and "old policy: eta = min(0.001 (step - 0), 0.5)" in card and "nft beta" in card
    if use_lora:
        pipe = tiny_flux_pipeline()
        base = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH))
        pipe.load_lora_weights(str(tmp_path / "out"))
        loaded = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=MAX_SEQUENCE_LENGTH))
    else:
        pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer())
        base = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=24))
        pipe.transformer = OvisImageTransformer2DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer")
        loaded = velocity(FlowPolicy.from_pipeline(pipe, max_sequence_length=24))
    trained = velocity(trainer.policy)
    assert not torch.equal(trained, base)
    assert torch.equal(loaded, trained)


@pytest.mark.parametrize("overrides,message", [
    ({"loss_type": "ppo"}, r"NFTConfig.loss_type='ppo': expected one of \('nft', 'awm'\)"),
    ({"advantage_clip": None}, r"NFTConfig.advantage_clip=None: both losses divide"),
    ({"loss_type": "awm", "awm_num_timesteps": 3}, r"NFTConfig.awm_num_timesteps=3: AWM draws it from the steps "
                                                   r"\[1, 3\).*Fix: use at most 2, or raise timestep_fraction"),
    ({"nft_beta": 0.0}, r"NFTConfig.nft_beta=0.0"),
    ({"old_policy_max_decay": 1.0}, r"NFTConfig.old_policy_max_decay=1.0"),
    ({"awm_weighting": "huber"}, r"NFTConfig.awm_weighting='huber'"),
])
def test_bad_settings_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_nft_config(tmp_path, **overrides)


def test_defaults_are_the_papers(tmp_path):
    args = NFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert (args.sde_type, args.guidance_scale, args.scale_rewards, args.advantage_clip) == ("ode", 1.0, "batch", 5.0)
    assert (args.nft_beta, args.old_policy_decay_rate, args.old_policy_max_decay) == (1.0, 0.001, 0.5)
    assert args.num_train_timesteps == 9  # int(0.99 * 10)
    with pytest.raises(TypeError, match="args must be a NFTConfig, got GRPOConfig"):
        from grpo_helpers import tiny_config
        NFTTrainer(ovis_policy(), brightness, args=tiny_config(tmp_path), train_dataset=ROWS)
    assert json.loads(json.dumps(args.to_dict()))["loss_type"] == "nft"
    assert os.path.basename(args.output_dir) == os.path.basename(str(tmp_path))
