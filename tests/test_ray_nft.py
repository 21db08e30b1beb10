"""NFTTrainer with `rollout_engine=RayRolloutEngine(...)` as the only change: the run is the in-process run, bit
for bit, for DiffusionNFT (whose rollouts the old policy samples: the engine is sent the old policy's weights) with
LoRA and with full fine-tuning, and for AWM."""

import pytest
import torch
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_nft_config
from peft import LoraConfig
from test_ray_grpo import ray_engine, ray_session  # noqa: F401  (the module's Ray session fixture)

from rlhf_image import NFTTrainer

pytestmark = pytest.mark.ray

COMPARED = ("loss", "grad_norm", "rewards/total/mean", "rewards/brightness/std", "advantages/std", "loss/positive",
            "loss/negative", "loss/error", "old_deviation", "kl")


def train(tmp_path, engine=None, peft_config=None, **overrides):
    args = tiny_nft_config(tmp_path, **overrides)
    trainer = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=peft_config,
                         rollout_engine=engine)
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type,use_lora", [("nft", True), ("nft", False), ("awm", True)],
                         ids=["nft-lora", "nft-full", "awm-lora"])
def test_ray_run_is_the_in_process_run(ray_session, tmp_path, loss_type, use_lora):  # noqa: F811
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS) if use_lora else None
    # Four steps, two per rollout batch, an old policy that moves fast: the second rollout is sampled by an old
    # policy that is neither the initial nor the trained weights.
    overrides = dict(loss_type=loss_type, max_steps=4, num_iterations=2, beta=0.05, old_policy_decay_rate=0.25,
                     learning_rate=3e-2 if use_lora else 1e-2)
    local = train(tmp_path / "local", peft_config=lora, **overrides)
    engine = ray_engine()
    try:
        remote = train(tmp_path / "ray", engine, peft_config=lora, **overrides)
    finally:
        engine.close()
    compared = [key for key in COMPARED if logged(local, key)]
    assert "rewards/total/mean" in compared and ("old_deviation" in compared) == (loss_type == "nft")
    for key in compared:
        assert logged(remote, key) == logged(local, key), key
    rewards = logged(local, "rewards/total/mean")
    assert len(rewards) == 2 and rewards[1] != rewards[0]  # two rollout batches, not the same one twice
    for (name, a), (_, b) in zip(local.model.named_parameters(), remote.model.named_parameters()):
        assert torch.equal(a, b), name
