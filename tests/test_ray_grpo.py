"""GRPOTrainer with `rollout_engine=RayRolloutEngine(...)` as the only change: the run is the in-process run, bit
for bit (so it learns as that one does), with full fine-tuning and with LoRA."""

import functools
from pathlib import Path

import pytest
import torch
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_config
from peft import LoraConfig

from rlhf_image import GRPOTrainer
from rollout import RayRolloutEngine
from rollout.cluster import init_ray

pytestmark = pytest.mark.ray

COMPARED = ("loss", "grad_norm", "rewards/total/mean", "rewards/brightness/std", "advantages/std", "ratio/min",
            "ratio/max", "clip_frac")


@pytest.fixture(scope="module")
def ray_session():
    torch.set_num_threads(1)  # as in the workers (worker_threads=1)
    session = init_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield session
    session.shutdown()


def train(tmp_path, engine=None, peft_config=None, **overrides):
    args = tiny_config(tmp_path, debug_ratio_check=True, **overrides)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=peft_config,
                          rollout_engine=engine)
    trainer.train()
    return trainer


def ray_engine():
    return RayRolloutEngine(functools.partial(ovis_policy, 0), num_workers=2, num_cpus_per_worker=0.25,
                            worker_threads=1)


def assert_same_run(local, remote):
    for key in COMPARED:
        assert logged(remote, key) == logged(local, key), key
    assert logged(remote, "ratio/on_policy_mismatch_total")[-1] == 0
    for (name, a), (_, b) in zip(local.model.named_parameters(), remote.model.named_parameters()):
        assert torch.equal(a, b), name


def test_full_fine_tuning_through_ray_is_the_in_process_run_and_learns(ray_session, tmp_path):
    overrides = dict(max_steps=8, learning_rate=1e-2, seed=0)
    local = train(tmp_path / "local", **overrides)
    engine = ray_engine()
    try:
        remote = train(tmp_path / "ray", engine, **overrides)
    finally:
        engine.close()
    assert_same_run(local, remote)
    rewards = logged(remote, "rewards/total/mean")
    assert len(rewards) == 8 and sum(rewards[-2:]) / 2 > rewards[0] + 0.02  # brightness climbs (0.471 -> 0.527)


def test_lora_through_ray_is_the_in_process_run(ray_session, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    overrides = dict(max_steps=2, learning_rate=3e-2, num_iterations=2, beta=0.05)
    local = train(tmp_path / "local", peft_config=lora, **overrides)
    engine = ray_engine()
    try:
        remote = train(tmp_path / "ray", engine, peft_config=lora, **overrides)
    finally:
        engine.close()
    assert_same_run(local, remote)
    assert logged(remote, "ratio/min")[0] == logged(remote, "ratio/max")[0] == 1.0
