"""GRPOTrainer with `rollout_engine=RayRolloutEngine(...)` as the only change: the run is the in-process run, bit
for bit (so it learns as that one does), with full fine-tuning and with LoRA."""

import functools
import hashlib
import os
import signal
from pathlib import Path

import pytest
import torch
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_config
from peft import LoraConfig
from transformers import TrainerCallback

from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
from rlhf_image import GRPOTrainer
from rlhf_image.families import OvisImagePolicy
from rlhf_image.rollout import RayRolloutEngine, RolloutWorkerError
from rlhf_image.rollout.cluster import init_ray

pytestmark = pytest.mark.ray

COMPARED = ("loss", "grad_norm", "rewards/total/mean", "rewards/brightness/std", "advantages/std", "ratio/min",
            "ratio/max", "clip_frac")


class DyingPolicy(OvisImagePolicy):
    """`ovis_policy()` whose worker process SIGKILLs itself in every transformer call once `marker` exists."""

    marker: str = ""

    def predict_velocity(self, *args, **kwargs):
        if os.path.exists(self.marker):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict_velocity(*args, **kwargs)


def dying_policy(marker: str) -> DyingPolicy:
    pipe = ovis_image_tiny(tokenizer=ovis_prefix_tokenizer(), seed=0)
    policy = DyingPolicy(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config,
                         max_sequence_length=24)
    policy.marker = marker
    return policy


class ArmAfterFirstSave(TrainerCallback):
    """After checkpoint-1 is written: fingerprint its files, then make every rollout worker die from now on."""

    def __init__(self, marker: str):
        self.marker, self.fingerprint = marker, None

    def on_save(self, args, state, control, **kwargs):
        if self.fingerprint is None:
            self.fingerprint = fingerprint(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            Path(self.marker).touch()


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
    # The learning criterion of the in-process GRPO learning test (Ovis, full, SDE: margin 0.02), here reached
    # in 8 steps (0.471 -> 0.527) rather than 16.
    rewards = logged(remote, "rewards/brightness/mean")
    assert len(rewards) == 8 and sum(rewards[-2:]) / 2 - rewards[0] > 0.02


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


def test_workers_dying_past_max_failures_stop_training_and_leave_the_last_checkpoint_intact(ray_session, tmp_path):
    marker = str(tmp_path / "die")
    callback = ArmAfterFirstSave(marker)
    engine = RayRolloutEngine(functools.partial(dying_policy, marker), num_workers=1, num_cpus_per_worker=0.25,
                              worker_threads=1, max_failures=1)
    args = tiny_config(tmp_path / "run", max_steps=3, save_strategy="steps", save_steps=1)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), rollout_engine=engine,
                          callbacks=[callback])
    with pytest.raises(RolloutWorkerError, match="max_failures=1"):
        trainer.train()
    assert engine.num_failures == 2 and trainer.state.global_step == 1
    checkpoints = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-1"]
    assert callback.fingerprint and fingerprint(tmp_path / "run" / "checkpoint-1") == callback.fingerprint
