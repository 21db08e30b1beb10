"""GRPO backpropagates each trained timestep on its own (so a micro-step's activation memory does not grow with the
number of trained timesteps): the gradient and the loss are those of one backward through the mean over all the
trained timesteps, computed here by hand from the transition log-probs."""

import pytest
import torch
from grpo_helpers import LORA_TARGETS, brightness, ovis_policy, tiny_config
from peft import LoraConfig

from rlhf_image import GRPOTrainer
from rlhf_image.losses import grpo_loss
from rlhf_image.sampling import transition_log_prob
from rlhf_image.sde import step_kl

ROWS = [{"prompt": prompt} for prompt in ("a cat", "a red house") for _ in range(4)]


def gradients(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_one_backward_per_timestep_gives_the_gradient_of_the_summed_loss(tmp_path, use_lora):
    args = tiny_config(tmp_path, guidance_scale=3.0, beta=0.05, num_inference_steps=4, gradient_accumulation_steps=2)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS) if use_lora else None
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=ROWS, peft_config=peft_config)
    model = trainer.model
    model.train()
    inputs = trainer._prepare_inputs(ROWS)  # the rollout, then micro-batch 0
    trajectory, advantages = inputs["trajectory"], inputs["advantages"]
    steps = trainer._train_steps(trajectory.log_probs.shape[1], inputs["micro_index"])
    assert len(steps) == 4 and advantages.abs().sum() > 0

    # By hand: the mean over the trained steps of the surrogate plus beta * KL, one backward through all of it.
    expected = torch.zeros(())
    for j in steps:
        log_prob, mean, std = transition_log_prob(trainer.policy, trajectory, j, transformer=model)
        loss, _ = grpo_loss(log_prob, trajectory.log_probs[:, j], advantages, args.epsilon)
        with torch.no_grad(), trainer.reference_transformer() as reference:
            _, reference_mean, _ = transition_log_prob(trainer.policy, trajectory, j, transformer=reference)
        expected = expected + (loss + args.beta * step_kl(mean, reference_mean, std).mean()) / len(steps)
    (expected / args.gradient_accumulation_steps).backward()
    expected_grads = gradients(model)
    model.zero_grad(set_to_none=True)

    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # as the training loop sets it
    returned = trainer.training_step(model, ROWS)
    grads = gradients(model)

    assert set(grads) == set(expected_grads) and grads
    assert any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-8, msg=name)
    torch.testing.assert_close(returned, expected.detach() / args.gradient_accumulation_steps, rtol=1e-6, atol=0)


def test_a_loss_computed_without_gradients_backpropagates_nothing(tmp_path):
    trainer = GRPOTrainer(ovis_policy(), brightness, args=tiny_config(tmp_path), train_dataset=ROWS)
    inputs = trainer._prepare_inputs(ROWS)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    assert not loss.requires_grad and torch.isfinite(loss)
    assert all(p.grad is None for p in trainer.model.parameters())
