"""Resume is exact: 4 steps straight == 2 steps, stop, new trainer, resume, 2 steps (losses, rewards, weights, the
EMA)."""

import json
import os

import pytest
import torch
from grpo_helpers import LORA_TARGETS, brightness, dataset, ovis_policy, tiny_config
from peft import LoraConfig
from transformers import TrainerCallback

from rlhf_image import GRPOTrainer

COMPARED = ("loss", "loss/policy", "grad_norm", "rewards/total/mean", "rewards/brightness/std", "advantages/std",
            "ratio/max", "kl", "clip_frac", "learning_rate")


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(output_dir, use_lora, callbacks=None):
    # Two passes per rollout batch, a window, half the steps trained, KL, a decaying learning rate, an EMA with
    # the step-dependent warm-up: every piece of state a resume must restore is in play.
    args = tiny_config(output_dir, max_steps=4, num_iterations=2, save_strategy="steps", save_steps=2,
                       num_inference_steps=4, sde_window_size=2, sde_window_range=[0, 4], timestep_fraction=0.5,
                       beta=0.05, lr_scheduler_type="linear", learning_rate=2e-2, use_ema=True, ema_decay=0.5,
                       ema_warmup=True)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS) if use_lora else None
    return GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=peft_config,
                       callbacks=callbacks)


def history(trainer):
    return [{k: e[k] for k in COMPARED if k in e} for e in trainer.state.log_history if "loss/policy" in e]


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_resume_continues_exactly(tmp_path, use_lora):
    straight = make_trainer(tmp_path / "straight", use_lora)
    straight.train()

    first = make_trainer(tmp_path / "split", use_lora, callbacks=[StopAt(2)])
    first.train()
    assert first.state.global_step == 2
    checkpoint = tmp_path / "split" / "checkpoint-2"
    weight_file = "adapter_model.safetensors" if use_lora else "model.safetensors"
    for name in (weight_file, "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "ema.safetensors"):
        assert os.path.isfile(checkpoint / name), name
    # The running counts live in the Trainer's own state, as a stateful callback (no file of the trainer's own).
    state = json.load(open(checkpoint / "trainer_state.json"))
    assert state["global_step"] == 2
    assert state["stateful_callbacks"]["TrainerCounters"]["args"]["counts"]["nonfinite/skipped_steps_total"] == 0

    resumed = make_trainer(tmp_path / "split", use_lora)  # a new trainer object from the base model
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4

    expected, got = history(straight), history(resumed)
    assert len(expected) == len(got) == 4
    assert got == expected  # every compared value is equal (==), step by step
    final_expected, final_got = weights(straight), weights(resumed)
    assert final_expected.keys() == final_got.keys()
    assert all(torch.equal(final_expected[n], final_got[n]) for n in final_expected)
    assert straight.ema.shadow.keys() == final_got.keys()
    assert all(torch.equal(straight.ema.shadow[n], resumed.ema.shadow[n]) for n in final_got)
    assert any(not torch.equal(final_got[n], weights(make_trainer(tmp_path / "fresh", use_lora))[n]) for n in final_got)
