"""`RayRolloutEngine` on a local Ray (2 CPUs): bit-identical to in-process sampling with 1 and 2 workers, ratio 1
after syncing changed weights (LoRA and full, both transports), recovery from killed workers, staleness rules.

Faults are real process deaths: a worker SIGKILLs itself from inside its transformer call (mid-rollout), a
reward worker exits inside its reward call, or the test `ray.kill`s an actor. A marker file arms each fault
once (the first process to rename it dies), so the replacement runs normally.
"""

import functools
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from rlhf_image.rewards.compose import RewardSet
from rlhf_image.families import OvisImagePolicy
from rlhf_image.policy import FlowPolicy
from rlhf_image.rollout_engine import RolloutSpec
from rlhf_image.sampling import generate, transition_log_prob
from rlhf_image.rollout import RayRolloutEngine, RolloutWorkerError
from rlhf_image.rollout.cluster import init_ray
from tiny_models import MAX_SEQUENCE_LENGTH, tiny_ovis_pipeline

pytestmark = pytest.mark.ray

SPEC = RolloutSpec(height=32, width=32, num_steps=4, sde_type="sde", noise_level=0.7, guidance_scale=1.0,
                   micro_batch_size=2)
WINDOW = (0, 4)
PROMPTS = [p for p in ["a red cube", "a blue ball", 'a sign that says "HI"', "two cats", "a tree", "night sky"]
           for _ in range(2)]  # 6 groups of 2: 3 tasks per worker with 2 workers
SEEDS = list(range(100, 112))
COLUMNS = {"target": [p.upper() for p in PROMPTS]}
POLICY_KWARGS = dict(max_sequence_length=MAX_SEQUENCE_LENGTH)
LORA = dict(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=True)


# --- pieces the workers import (this module is on their PYTHONPATH) ------------------------------------
class KillablePolicy(OvisImagePolicy):
    """Tiny Ovis policy whose process SIGKILLs itself in a transformer call while `marker` exists (renamed
    first, so exactly one process dies per arming); `always=True` keeps the marker (dies every time)."""

    marker: str | None = None
    always: bool = False

    def predict_velocity(self, *args, **kwargs):
        if self.marker is not None and os.path.exists(self.marker):
            if self.always or _claim(self.marker):
                os.kill(os.getpid(), signal.SIGKILL)
        return super().predict_velocity(*args, **kwargs)


def killable_policy(marker: str, always: bool = False) -> KillablePolicy:
    pipe = tiny_ovis_pipeline(seed=0)
    policy = KillablePolicy(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler.config,
                            **POLICY_KWARGS)
    policy.marker, policy.always = marker, always
    return policy


class Brightness:
    """Reward: mean pixel value plus the target's length (so the column reaches it); the process running it
    exits inside the call while `marker` exists (claimed once)."""

    name = "brightness"

    def __init__(self, marker: str | None = None):
        self.marker = marker

    def __call__(self, prompts, images, target=None, **columns):
        if self.marker is not None and os.path.exists(self.marker) and _claim(self.marker):
            os._exit(1)
        return [float(np.asarray(im, dtype=np.float64).mean()) + len(t) for im, t in zip(images, target)]


def _claim(path: str) -> bool:
    try:
        os.rename(path, path + ".done")
        return True
    except FileNotFoundError:
        return False


# --- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    torch.set_num_threads(1)  # the in-process reference uses the workers' thread count
    tests_dir = str(Path(__file__).parent)
    session = init_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    yield session
    session.shutdown()


@pytest.fixture
def markers(tmp_path):
    return {"rollout": str(tmp_path / "kill-rollout"), "reward": str(tmp_path / "kill-reward")}


def make_engine(markers, **kwargs):
    kwargs.setdefault("num_cpus_per_worker", 0.25)
    return RayRolloutEngine(functools.partial(killable_policy, markers["rollout"]), worker_threads=1,
                            num_cpus_per_reward_worker=0.25, **kwargs)


def trainer_policy(lora: bool = False, perturb: int | None = None) -> FlowPolicy:
    """The trainer's side: a tiny policy (LoRA or full) whose trainable weights are moved by a seeded amount."""
    policy = FlowPolicy.from_pipeline(tiny_ovis_pipeline(seed=0), **POLICY_KWARGS)
    if lora:
        policy.transformer = get_peft_model(policy.transformer, LoraConfig(**LORA))
    else:
        policy.transformer.requires_grad_(True)
    if perturb is not None:
        g = torch.Generator().manual_seed(perturb)
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if lora else 0.02))
    return policy


def reference(policy: FlowPolicy):
    """In-process trajectory and rewards: `generate` on the trainer's policy, then the reward on its images."""
    trajectory = generate(policy, PROMPTS, SEEDS, height=SPEC.height, width=SPEC.width, num_steps=SPEC.num_steps,
                          sde_type=SPEC.sde_type, noise_level=SPEC.noise_level, window=WINDOW,
                          guidance_scale=SPEC.guidance_scale, micro_batch_size=SPEC.micro_batch_size)
    rewards = RewardSet([Brightness()])(PROMPTS, trajectory.pil_images(), **COLUMNS).per_reward
    return trajectory, torch.from_numpy(rewards)


def assert_same(batch, trajectory, rewards):
    for name in ("latents", "log_probs", "final_latents", "images", "sigmas", "step_indices"):
        assert torch.equal(getattr(batch.trajectory, name), getattr(trajectory, name)), name
    assert torch.equal(batch.trajectory.cond.prompt_embeds, trajectory.cond.prompt_embeds)
    assert batch.trajectory.prompts == PROMPTS and batch.trajectory.seeds == SEEDS
    assert batch.per_reward.dtype == torch.float64 and torch.equal(batch.per_reward, rewards)


def assert_ratio_one(policy, batch):
    """The trainer's recomputation, on micro-batches of the sampling size, equals the workers' log-probs."""
    trajectory = batch.trajectory
    with torch.no_grad():
        for first in range(0, len(trajectory), SPEC.micro_batch_size):
            rows = list(range(first, first + SPEC.micro_batch_size))
            part = trajectory.select(rows)
            for j in range(len(trajectory.step_indices)):
                log_prob, _, _ = transition_log_prob(policy, part, j)
                assert torch.equal(torch.exp(log_prob - part.log_probs[:, j]), torch.ones(len(rows)))


# --- tests ---------------------------------------------------------------------------------------------
def test_local_ray_listens_on_loopback_only_without_dashboard(ray_session):
    import psutil

    assert ray_session.local and ray_session.owned
    assert os.environ["HOME"] != ray_session.home  # the driver's own HOME is back
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in children]
    assert listening, "found no Ray server socket to check"
    exposed = [(c.laddr.ip, c.laddr.port) for c in listening
               if not c.laddr.ip.removeprefix("::ffff:").startswith("127.") and c.laddr.ip != "::1"]
    assert exposed == []
    assert 8265 not in {c.laddr.port for c in listening}  # no dashboard


def test_two_workers_with_a_reward_worker_match_in_process_then_sync_full_weights_then_survive_kills(
        ray_session, markers):
    import ray

    policy = trainer_policy()
    engine = make_engine(markers, num_workers=2, num_reward_workers=1)
    try:
        engine.bind(policy, [Brightness(markers["reward"])], ["brightness"])
        base = engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)  # the first rollout syncs the bound weights
        assert base.weights_version == -1
        assert_same(base, *reference(policy))

        # full fine-tuning: changed weights reach the workers, and the trainer's recomputation gives ratio 1
        policy = trainer_policy(perturb=1)
        engine.sync_weights(policy, 1)
        batch = engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        expected = reference(policy)
        assert batch.weights_version == 1
        assert not torch.equal(batch.trajectory.log_probs, base.trajectory.log_probs)
        assert_same(batch, *expected)
        assert_ratio_one(policy, batch)

        # a rollout worker dies inside its transformer call: replaced, reloaded, only its tasks re-issued
        pids = ray.get([slot.actor.pid.remote() for slot in engine.workers])
        Path(markers["rollout"]).touch()
        batch = engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        assert engine.num_failures == 1 and os.path.exists(markers["rollout"] + ".done")
        assert 1 <= engine.num_tasks_reissued <= 3  # the dead worker's tasks, not the batch (6 tasks)
        assert sum(a != b for a, b in zip(pids, ray.get([slot.actor.pid.remote() for slot in engine.workers]))) == 1
        assert_same(batch, *expected)

        # the reward worker dies inside a reward call: replaced, the lost scores recomputed
        Path(markers["reward"]).touch()
        batch = engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        assert engine.num_failures == 2 and os.path.exists(markers["reward"] + ".done")
        assert_same(batch, *expected)
    finally:
        engine.close()


def test_one_worker_matches_and_one_step_off_policy_keeps_each_rollouts_version(ray_session, markers):
    engine = make_engine(markers, num_workers=1, max_staleness=1)
    try:
        old, new = trainer_policy(perturb=2), trainer_policy(perturb=3)
        engine.bind(old, [Brightness()], ["brightness"])
        engine.sync_weights(old, 10)
        first = engine.submit(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        engine.sync_weights(new, 11)  # allowed: `first` is one sync behind
        second = engine.submit(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        with pytest.raises(RuntimeError, match="not collected"):
            engine.sync_weights(new, 12)  # would make `first` two syncs stale
        batch_old, batch_new = engine.collect(first), engine.collect(second)
        assert (batch_old.weights_version, batch_new.weights_version) == (10, 11)
        assert_same(batch_old, *reference(old))
        assert_same(batch_new, *reference(new))
    finally:
        engine.close()


def test_lora_over_a_gloo_group_gives_ratio_one_and_recovers_from_kills(ray_session, markers):
    import ray

    engine = make_engine(markers, num_workers=2, weight_transport="collective")
    try:
        assert engine.collective_backend == "gloo"
        policy = trainer_policy(lora=True, perturb=4)
        engine.bind(policy, [Brightness()], ["brightness"])
        engine.sync_weights(policy, 1)
        # every member on this machine: they meet through a file, not a TCP store (which looks up names)
        assert isinstance(engine._group.store, torch.distributed.FileStore)
        batch = engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        assert_same(batch, *reference(policy))
        assert_ratio_one(policy, batch)
        assert not torch.equal(batch.trajectory.log_probs, reference(trainer_policy(lora=True))[0].log_probs)

        ray.kill(engine.workers[0].actor)  # dead between steps: found before the next broadcast
        policy = trainer_policy(lora=True, perturb=5)
        engine.sync_weights(policy, 2)
        assert engine.num_failures == 1
        batch = engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        expected = reference(policy)
        assert_same(batch, *expected)
        assert_ratio_one(policy, batch)

        # dead mid-rollout: the replacement gets the synced adapter through the object store, then the group
        # is rebuilt for the next broadcast
        Path(markers["rollout"]).touch()
        batch = engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
        assert engine.num_failures == 2
        assert_same(batch, *expected)
        policy = trainer_policy(lora=True, perturb=6)
        engine.sync_weights(policy, 3)
        assert_same(engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW), *reference(policy))
    finally:
        engine.close()


def test_too_many_deaths_stop_the_run_with_a_clear_error_and_leave_the_trainer_untouched(ray_session, markers):
    policy = trainer_policy(perturb=6)
    before = {k: v.clone() for k, v in policy.transformer.state_dict().items()}
    engine = RayRolloutEngine(functools.partial(killable_policy, markers["rollout"], always=True), num_workers=1,
                              num_cpus_per_worker=0.25, worker_threads=1, max_failures=1)
    Path(markers["rollout"]).touch()
    engine.bind(policy, [Brightness()], ["brightness"])
    with pytest.raises(RolloutWorkerError, match="max_failures=1"):
        engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
    assert engine.num_failures == 2
    with pytest.raises(RuntimeError, match="closed"):
        engine.rollout(PROMPTS, SEEDS, COLUMNS, SPEC, WINDOW)
    after = policy.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_workers=0), "num_workers"),
    (dict(weight_transport="pickle"), "weight_transport"),
    (dict(max_staleness=2), "max_staleness"),
    (dict(max_staleness=1, weight_transport="collective"), "max_staleness"),
    (dict(reward_recipes=[Brightness]), "reward_recipes"),
    (dict(collective_backend="mpi"), "collective_backend"),
    (dict(max_chunk_bytes=10), "max_chunk_bytes"),
])
def test_bad_configuration_fails_at_construction_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"invalid `{field}`"):
        RayRolloutEngine(functools.partial(tiny_ovis_pipeline, seed=0), **kwargs)
