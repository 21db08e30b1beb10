"""The EMA of the trained weights, owned by the base trainer: its schedule (decay, warm-up, every k steps) against
a hand computation, and in GRPO (the first trainer after flow matching to get it): evaluation rolls out with it,
the saved model is it, the trained weights are left in place. Exact resume with the EMA is in test_grpo_resume.py
and test_fm_trainer.py."""

import numpy as np
import pytest
import torch
from diffusers import OvisImageTransformer2DModel
from grpo_helpers import brightness, dataset, ovis_policy, tiny_config
from transformers import TrainerCallback

from rlhf_image import DPOConfig, GRPOConfig, GRPOTrainer
from rlhf_image.ema import EMAModel
from rlhf_image.sampling import generate
from rlhf_image.seeding import Stream, derive_seed


def test_ema_updates_every_k_steps_with_the_warmup_schedule():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMAModel([("w", weight)], decay=0.5, warmup=True, update_every=3)
    expected = torch.zeros(3)
    for step in range(1, 10):
        with torch.no_grad():
            weight.add_(1.0)  # the optimizer step `step`
        assert ema.step(step) == (step % 3 == 0)
        if step % 3 == 0:
            decay = min(0.5, (1 + step) / (10 + step))  # 4/13, 7/16, then the cap (10/19 is above 0.5)
            expected = decay * expected + (1 - decay) * weight.detach()
        torch.testing.assert_close(ema.shadow["w"], expected, rtol=0, atol=1e-6)
    assert ema.current_decay(3) == pytest.approx(4 / 13) and ema.current_decay(9) == 0.5
    assert EMAModel([("w", weight)], decay=0.9).current_decay(1) == 0.9


@pytest.mark.parametrize("config_class", [GRPOConfig, DPOConfig])
def test_ema_fields_are_checked_at_construction(tmp_path, config_class):
    with pytest.raises(ValueError, match="ema_update_every"):
        config_class(output_dir=str(tmp_path), use_cpu=True, ema_update_every=0)
    with pytest.raises(ValueError, match="ema_decay"):
        config_class(output_dir=str(tmp_path), use_cpu=True, ema_decay=1.0)


class Snapshots(TrainerCallback):
    """The trained weights after each optimizer step."""

    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def test_grpo_ema_is_what_evaluation_samples_and_what_is_saved(tmp_path):
    snapshots = Snapshots()
    eval_rows = [{"prompt": "a cat"}, {"prompt": "the sun"}]
    args = tiny_config(tmp_path / "run", max_steps=4, learning_rate=3e-3, use_ema=True, ema_decay=0.5,
                       ema_update_every=2)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), eval_dataset=eval_rows,
                          callbacks=[snapshots])
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    # updates after steps 2 and 4 only, decay 0.5 (no warm-up)
    for name, value in trainer.ema.shadow.items():
        expected = 0.5 * (0.5 * initial[name] + 0.5 * snapshots.weights[1][name]) + 0.5 * snapshots.weights[3][name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert any(not torch.equal(trainer.ema.shadow[n], trained[n]) for n in trained)

    # evaluation samples with the EMA weights, then puts the trained ones back
    metrics = trainer.evaluate()
    assert all(torch.equal(p, trained[n]) for n, p in trainer.model.named_parameters())
    seeds = [derive_seed(0, Stream.EVALUATION, i) for i in range(len(eval_rows))]
    prompts = [row["prompt"] for row in eval_rows]
    with trainer.ema.applied():
        with_ema = generate(trainer.policy, prompts, seeds, height=32, width=32, num_steps=4, micro_batch_size=4)
    without = generate(trainer.policy, prompts, seeds, height=32, width=32, num_steps=4, micro_batch_size=4)
    assert metrics["eval_rewards/brightness/mean"] == pytest.approx(
        np.mean(brightness(None, with_ema.pil_images())), rel=1e-12)
    assert not torch.equal(with_ema.final_latents, without.final_latents)

    # the saved model (diffusers layout) holds the EMA weights, and the card says so
    trainer.save_model(str(tmp_path / "final"))
    loaded = OvisImageTransformer2DModel.from_pretrained(str(tmp_path / "final"), subfolder="transformer")
    for name, p in loaded.named_parameters():
        assert torch.equal(p, trainer.ema.shadow[name]), name
    assert "decay 0.5 every 2 steps (the saved weights)" in (tmp_path / "final" / "README.md").read_text()
