"""NFT resume is exact: 4 steps straight == 2 steps, stop, new trainer, resume, 2 steps (losses, rewards, weights,
the old policy and the EMA), for DiffusionNFT (LoRA and full) and AWM."""

import os

import pytest
import torch
from grpo_helpers import LORA_TARGETS, brightness, dataset, ovis_policy, tiny_nft_config
from peft import LoraConfig
from test_grpo_resume import StopAt, weights

from rlhf_image import NFTTrainer
from rlhf_image.checkpoints import CheckpointError

COMPARED = ("loss", "loss/policy", "loss/positive", "loss/negative", "loss/error", "old_deviation", "grad_norm",
            "rewards/total/mean", "advantages/std", "kl", "learning_rate", "old_policy/decay")


def make_trainer(output_dir, loss_type, use_lora, callbacks=None):
    # Two passes per rollout batch, an old policy that moves fast (so v_old differs from v), the KL term, a decaying
    # learning rate and an EMA with its warm-up: every piece of state a resume must restore is in play.
    args = tiny_nft_config(output_dir, loss_type=loss_type, max_steps=4, num_iterations=2, save_strategy="steps",
                           save_steps=2, beta=0.05, lr_scheduler_type="linear", learning_rate=2e-2,
                           old_policy_decay_rate=0.25, use_ema=True, ema_decay=0.5, ema_warmup=True)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS) if use_lora else None
    return NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=peft_config,
                      callbacks=callbacks)


def history(trainer):
    return [{k: e[k] for k in COMPARED if k in e} for e in trainer.state.log_history if "loss/policy" in e]


@pytest.mark.parametrize("loss_type,use_lora", [("nft", True), ("nft", False), ("awm", True)],
                         ids=["nft-lora", "nft-full", "awm-lora"])
def test_resume_continues_exactly(tmp_path, loss_type, use_lora):
    straight = make_trainer(tmp_path / "straight", loss_type, use_lora)
    straight.train()

    first = make_trainer(tmp_path / "split", loss_type, use_lora, callbacks=[StopAt(2)])
    first.train()
    checkpoint = tmp_path / "split" / "checkpoint-2"
    assert os.path.isfile(checkpoint / "old_policy.safetensors") == (loss_type == "nft")
    resumed = make_trainer(tmp_path / "split", loss_type, use_lora)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4

    expected, got = history(straight), history(resumed)
    assert len(expected) == len(got) == 4
    assert got == expected  # every compared value is equal (==), step by step
    if loss_type == "nft":
        assert expected[3]["old_deviation"] > 0
    final_expected, final_got = weights(straight), weights(resumed)
    assert all(torch.equal(final_expected[n], final_got[n]) for n in final_expected)
    assert all(torch.equal(straight.ema.shadow[n], resumed.ema.shadow[n]) for n in final_got)
    if loss_type == "nft":
        assert all(torch.equal(straight.old_policy.shadow[n], resumed.old_policy.shadow[n]) for n in final_got)


def test_a_checkpoint_without_its_old_policy_is_refused(tmp_path):
    first = make_trainer(tmp_path / "run", "nft", True, callbacks=[StopAt(2)])
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    os.remove(checkpoint / "old_policy.safetensors")
    with pytest.raises(CheckpointError, match="old_policy.safetensors"):
        make_trainer(tmp_path / "run", "nft", True).train(resume_from_checkpoint=str(checkpoint))
