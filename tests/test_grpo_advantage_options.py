"""The advantage options of the online trainers, against hand computations: the per-prompt statistics tracker
(a prompt's rewards pooled over the rollouts of an epoch, reset at the next epoch, restored on resume), the batch
std over every process (two processes give the advantages of one process sampling both batches), and the same
initial noise for a whole group."""

import json

import numpy as np
import pytest
import torch
from grpo_helpers import PROMPTS, brightness, dataset, ovis_policy, tiny_config
from launch import REPO, run_processes

from rlhf_image import GRPOTrainer
from rlhf_image.online_config import OnlineConfig

# Four prompts, each four times: a rollout (2 prompts x 4 images) often meets a prompt seen earlier in its epoch.
REPEATED = [{"prompt": PROMPTS[i % 4]} for i in range(16)]


class Recording(GRPOTrainer):
    """Keeps each rollout's prompts, total rewards, advantages and trajectory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollouts = []

    def compute_advantages(self, total, group_ids, prompts):
        advantages = super().compute_advantages(total, group_ids, prompts)
        self.rollouts.append({"step": self.state.global_step, "prompts": list(prompts),
                              "rewards": total.clone(), "advantages": advantages.clone()})
        return advantages

    def micro_batches(self, trajectory, advantages):
        self.rollouts[-1]["trajectory"] = trajectory
        return super().micro_batches(trajectory, advantages)


def pooled_advantages(history, prompts, rewards, clip=5.0, eps=1e-4):
    """A by hand: each sample against every reward its prompt got so far in the epoch (this rollout included)."""
    for prompt, reward in zip(prompts, rewards):
        history.setdefault(prompt, []).append(reward)
    out = []
    for prompt, reward in zip(prompts, rewards):
        values = np.asarray(history[prompt])
        out.append(np.clip((reward - values.mean()) / (values.std() + eps), -clip, clip))
    return np.asarray(out)


def test_the_tracker_pools_each_prompt_over_its_epoch_and_resets(tmp_path):
    # 16 rows / 2 prompts per rollout = 8 rollouts per epoch; 10 steps cross into the second epoch.
    args = tiny_config(tmp_path, max_steps=10, gradient_accumulation_steps=2, per_prompt_stat_tracking=True,
                       learning_rate=1e-3)
    trainer = Recording(ovis_policy(), brightness, args=args, train_dataset=REPEATED)
    trainer.train()
    assert [r["step"] for r in trainer.rollouts] == list(range(10))
    history, pooled_some = {}, False
    for rollout in trainer.rollouts:
        if rollout["step"] == 8:
            history = {}  # a new epoch forgets
        rewards = rollout["rewards"].tolist()
        pooled_some |= any(p in history for p in rollout["prompts"])
        expected = pooled_advantages(history, rollout["prompts"], rewards)
        # float32 advantages of rewards ~0.47 with a spread ~0.002: rounding reaches ~2e-5
        np.testing.assert_allclose(rollout["advantages"].numpy(), expected, rtol=0, atol=1e-4)
    assert pooled_some  # some prompt met its earlier rollouts (else this is just the group statistic)
    logged = [e["stat_tracker/prompts"] for e in trainer.state.log_history if "stat_tracker/prompts" in e]
    assert logged[7] == 4 and logged[8] <= 2  # all four prompts by the end of the epoch; then it starts over


def test_the_tracker_resumes_exactly(tmp_path):
    def make(output_dir, max_steps):
        args = tiny_config(output_dir, max_steps=max_steps, per_prompt_stat_tracking=True, save_strategy="steps",
                           save_steps=3, learning_rate=1e-3)
        return Recording(ovis_policy(), brightness, args=args, train_dataset=REPEATED)

    straight = make(tmp_path / "straight", 6)
    straight.train()
    make(tmp_path / "split", 3).train()
    state = json.loads((tmp_path / "split" / "checkpoint-3" / "stat_tracker.json").read_text())
    assert state["epoch"] == 0 and sum(len(v) for v in state["history"].values()) == 3 * 8
    resumed = make(tmp_path / "split", 6)
    resumed.train(resume_from_checkpoint=True)
    assert [r["step"] for r in resumed.rollouts] == [3, 4, 5]
    for got, expected in zip(resumed.rollouts, straight.rollouts[3:]):
        assert torch.equal(got["advantages"], expected["advantages"])


def test_same_noise_per_group_shares_the_start_not_the_steps(tmp_path):
    trainer = Recording(ovis_policy(), brightness, args=tiny_config(tmp_path, max_steps=1, same_noise_per_group=True),
                        train_dataset=dataset())
    trainer.train()
    trajectory = trainer.rollouts[0]["trajectory"]
    start, final = trajectory.latents[:, 0], trajectory.final_latents  # the window is every step: [:, 0] is x_T
    for group in range(2):
        rows = slice(4 * group, 4 * group + 4)
        assert all(torch.equal(start[rows][0], x) for x in start[rows])
        assert len({x.sum().item() for x in final[rows]}) == 4  # the stochastic steps differ
    assert not torch.equal(start[0], start[4])
    seeds = trajectory.seeds
    assert all(isinstance(s, tuple) and s[0] == seeds[4 * (i // 4)][0] for i, s in enumerate(seeds))
    # the step noise is the sample's own seed: without the option the same seeds give the same steps
    plain = Recording(ovis_policy(), brightness, args=tiny_config(tmp_path / "plain", max_steps=1),
                      train_dataset=dataset())
    plain.train()
    assert [s[1] for s in seeds] == plain.rollouts[0]["trajectory"].seeds
    with pytest.raises(ValueError, match="same_noise_per_group"):  # a method that samples with the ODE
        OnlineConfig(output_dir=str(tmp_path), use_cpu=True, sde_type="ode", same_noise_per_group=True)


SCRIPT = r'''
import json, sys
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[2] + "/tests")
from launch import init_process_group_from_env
init_process_group_from_env()
from grpo_helpers import brightness, ovis_policy, tiny_config
from test_grpo_advantage_options import REPEATED, Recording
out, options = sys.argv[1], json.loads(sys.argv[3])
trainer = Recording(ovis_policy(), brightness, args=tiny_config(f"{out}/run", max_steps=3, **options),
                    train_dataset=REPEATED)
trainer.train()
with open(f"{out}/rank{trainer.args.process_index}.json", "w") as f:
    json.dump([{"prompts": r["prompts"], "rewards": r["rewards"].tolist(), "advantages": r["advantages"].tolist()}
               for r in trainer.rollouts], f)
'''


def batch_std_advantages(history, prompts, rewards, tracker, clip=5.0, eps=1e-4):
    """A by hand with the std of the whole (both processes') batch, the mean of the group or, with the tracker,
    of every reward the prompt got in the epoch so far."""
    rewards = np.asarray(rewards)
    if tracker:
        for prompt, reward in zip(prompts, rewards):
            history.setdefault(prompt, []).append(reward)
        means = np.asarray([np.mean(history[p]) for p in prompts])
    else:
        means = rewards.reshape(-1, 4).mean(axis=1).repeat(4)
    return np.clip((rewards - means) / (rewards.std() + eps), -clip, clip)


@pytest.mark.parametrize("options", [{"scale_rewards": "batch"},
                                     {"scale_rewards": "batch", "per_prompt_stat_tracking": True}],
                         ids=["batch-std", "tracker"])
def test_two_processes_share_the_batch_statistics(tmp_path, options):
    """Each of 2 processes samples 8 images (2 groups): their advantages use the std of all 16 rewards and the
    tracker's statistics of both processes' rollouts; at the first step (same weights) they are those of 1 process
    sampling all 16 images with the same prompts and seeds."""
    (tmp_path / "run.py").write_text(SCRIPT)
    results = run_processes(str(tmp_path / "run.py"), [str(tmp_path), REPO, json.dumps(options)], nprocs=2,
                            timeout=600)
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    history = {}
    for step in range(3):
        prompts = ranks[0][step]["prompts"] + ranks[1][step]["prompts"]
        rewards = ranks[0][step]["rewards"] + ranks[1][step]["rewards"]
        expected = batch_std_advantages(history, prompts, rewards, "per_prompt_stat_tracking" in options)
        got = np.concatenate([ranks[0][step]["advantages"], ranks[1][step]["advantages"]])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)  # float32 (see above)
    single = Recording(ovis_policy(), brightness, args=tiny_config(tmp_path / "one", max_steps=1,
                                                                   gradient_accumulation_steps=4, **options),
                       train_dataset=REPEATED)
    single.train()
    got = ranks[0][0]["advantages"] + ranks[1][0]["advantages"]
    assert got == single.rollouts[0]["advantages"].tolist()
