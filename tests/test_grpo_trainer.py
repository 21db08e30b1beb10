"""GRPOTrainer invariants on the tiny Ovis-Image model: exact on-policy ratio, zero KL at the reference,
advantages by the formula, the failure policy, windows, evaluation, sample tables and metrics."""

import json
import math
import os

import numpy as np
import pytest
import torch
from grpo_helpers import (LORA_TARGETS, brightness, dataset, flat_for_animals, logged, ovis_policy, redness,
                          tiny_config)
from peft import LoraConfig
from transformers import TrainerCallback

from rlhf_image import GRPOTrainer, InProcessRolloutEngine
from rlhf_image.rewards import RewardError
from rlhf_image.sampling import generate
from rlhf_image.seeding import Stream, derive_seed


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_on_policy_ratio_is_exactly_one_and_kl_zero_at_reference(tmp_path, use_lora):
    # CFG, a Flow-GRPO-Fast window, a subset of trained steps and gradient accumulation all on: every
    # on-policy transformer call must still reproduce the sampler bit for bit (debug_ratio_check raises otherwise).
    args = tiny_config(tmp_path, guidance_scale=3.0, num_inference_steps=5, sde_window_size=3,
                       sde_window_range=[0, 5], timestep_fraction=0.67, beta=0.1, num_iterations=2, max_steps=4,
                       debug_ratio_check=True, learning_rate=1e-2)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(),
                          peft_config=lora() if use_lora else None)
    trainer.train()
    ratio_min, ratio_max, kl = logged(trainer, "ratio/min"), logged(trainer, "ratio/max"), logged(trainer, "kl")
    # Steps 1 and 3 start a rollout batch (on-policy); 2 and 4 are its second pass.
    assert ratio_min[0] == ratio_max[0] == 1.0 and ratio_min[2] == ratio_max[2] == 1.0
    assert ratio_min[1] != 1.0 or ratio_max[1] != 1.0
    assert kl[0] == 0.0  # the policy is the reference before the first update
    assert kl[1] > 0 and kl[3] > 0
    assert logged(trainer, "ratio/on_policy_mismatch_total")[-1] == 0
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_advantages_follow_the_formula_on_logged_rewards(tmp_path):
    # Two rewards with weights, per-prompt std and an advantage clip, recomputed by hand from the sample table.
    args = tiny_config(tmp_path, max_steps=1, log_samples_steps=1, num_log_samples=8, advantage_clip=1.2,
                       reward_weights=[1.0, 0.5])
    trainer = GRPOTrainer(ovis_policy(), [brightness, redness], args=args, train_dataset=dataset())
    trainer.train()
    table = json.load(open(tmp_path / "samples" / "step_000000.json"))["samples"]
    assert os.path.isfile(tmp_path / "samples" / "step_000000.png")
    rewards = np.array([[row["rewards"]["brightness"], row["rewards"]["redness"]] for row in table])
    total = rewards @ np.array([1.0, 0.5])
    np.testing.assert_allclose([row["total"] for row in table], total, rtol=1e-12)
    groups = np.array([row["group"] for row in table])
    expected = np.zeros(len(table))
    for g in np.unique(groups):
        r = total[groups == g]
        expected[groups == g] = (r - r.mean()) / (r.std() + 1e-4)
    expected = np.clip(expected, -1.2, 1.2)
    # group_advantages works in float32 and the tiny model's rewards spread by ~1e-3: allow float32 rounding.
    np.testing.assert_allclose([row["advantage"] for row in table], expected, atol=2e-4)
    assert len({row["prompt"] for row in table if row["group"] == 0}) == 1
    np.testing.assert_allclose(logged(trainer, "rewards/brightness/mean")[0], rewards[:, 0].mean(), rtol=1e-9)
    np.testing.assert_allclose(logged(trainer, "advantages/max")[0], expected.max(), atol=2e-4)


@pytest.mark.parametrize("scale,mode", [("batch", "normalize_then_sum"), ("none", "sum_then_normalize")])
def test_advantage_options(tmp_path, scale, mode):
    args = tiny_config(tmp_path, max_steps=1, log_samples_steps=1, num_log_samples=8, scale_rewards=scale,
                       reward_aggregation=mode, advantage_clip=None)
    trainer = GRPOTrainer(ovis_policy(), [brightness, redness], args=args, train_dataset=dataset())
    trainer.train()
    table = json.load(open(tmp_path / "samples" / "step_000000.json"))["samples"]
    rewards = np.array([[row["rewards"]["brightness"], row["rewards"]["redness"]] for row in table])
    if mode == "normalize_then_sum":
        rewards = (rewards - rewards.mean(0)) / rewards.std(0)
    total = rewards.sum(1)
    groups = np.array([row["group"] for row in table])
    centred = total - np.array([total[groups == g].mean() for g in groups])
    expected = centred / (total.std() + 1e-4) if scale == "batch" else centred
    np.testing.assert_allclose([row["advantage"] for row in table], expected, atol=2e-4 if scale == "batch" else 1e-7)


@pytest.mark.parametrize("unscored", [None, math.nan])
def test_unscored_samples_get_zero_advantage_and_are_counted(tmp_path, unscored):
    def picky(prompts, images, **columns):
        # Cannot score the 2nd and 3rd image of each group of 4 (None, or NaN: both mean unscored).
        values = brightness(prompts, images)
        return [unscored if i % 4 in (1, 2) else v for i, v in enumerate(values)]

    args = tiny_config(tmp_path, max_steps=2, log_samples_steps=1, num_log_samples=8, advantage_clip=None)
    trainer = GRPOTrainer(ovis_policy(), picky, args=args, train_dataset=dataset())
    trainer.train()
    table = json.load(open(tmp_path / "samples" / "step_000000.json"))["samples"]
    for g in (0, 1):
        rows = [row for row in table if row["group"] == g]
        assert [row["total"] is None for row in rows] == [False, True, True, False]
        assert rows[1]["advantage"] == rows[2]["advantage"] == 0.0
        r = np.array([rows[0]["total"], rows[3]["total"]])  # the group's statistics use the scored samples only
        np.testing.assert_allclose([rows[0]["advantage"], rows[3]["advantage"]], (r - r.mean()) / (r.std() + 1e-4),
                                   atol=2e-4)
    assert logged(trainer, "rewards/unscored") == [4.0, 4.0]
    assert logged(trainer, "rewards/unscored_total")[-1] == 8.0
    assert all(math.isfinite(v) for v in logged(trainer, "loss"))


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    args = tiny_config(tmp_path, max_steps=3)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=lora())
    poisoned_steps = {0}

    def poison(module, inputs, output):  # NaN velocity in the training forward of chosen steps only
        if torch.is_grad_enabled() and trainer.state.global_step in poisoned_steps:
            return (output[0] * float("nan"),)
        return output

    trainer.model.get_base_model().register_forward_hook(poison)
    before = trainable(trainer)
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(trainable(trainer))

    trainer.add_callback(Snapshot())
    trainer.train()
    assert all(torch.equal(snapshots[0][n], before[n]) for n in before)  # step 1 skipped: nothing moved
    assert any(not torch.equal(snapshots[1][n], before[n]) for n in before)  # step 2 trained
    assert logged(trainer, "nonfinite/skipped") == [1.0, 0.0, 0.0]
    assert logged(trainer, "nonfinite/skipped_steps_total") == [1.0, 1.0, 1.0]
    assert math.isnan(logged(trainer, "loss/policy")[0])
    # Adam saw two updates, not three: the skipped step left no moment or step count behind.
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {2}


def test_consecutive_nonfinite_steps_stop_training(tmp_path):
    args = tiny_config(tmp_path, max_steps=5, max_consecutive_nonfinite=2)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), peft_config=lora())
    parameter = next(p for p in trainer.model.parameters() if p.requires_grad)
    parameter.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(RuntimeError, match=r"2 optimizer steps in a row had a non-finite loss or gradient.*"
                                           r"max_consecutive_nonfinite=2"):
        trainer.train()
    assert trainer.state.global_step == 1


class RecordingEngine(InProcessRolloutEngine):
    """The default engine, recording what the trainer asks for."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def rollout(self, prompts, seeds, columns, spec, window):
        self.calls.append({"prompts": prompts, "seeds": seeds, "columns": columns, "window": window})
        return super().rollout(prompts, seeds, columns, spec, window)


def test_window_seeds_columns_and_custom_engine(tmp_path):
    rows = [{"prompt": p, "target": p.upper()} for p in ["a cat", "a dog", "a red house", "the sea"]]
    args = tiny_config(tmp_path, max_steps=3, num_inference_steps=6, sde_window_size=2, sde_window_range=[1, 5])
    engine = RecordingEngine()
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=rows, rollout_engine=engine)
    trainer.train()
    assert len(engine.calls) == 3
    windows = [call["window"] for call in engine.calls]
    assert all(1 <= start and start + 2 == end <= 5 for start, end in windows)
    assert windows == [trainer._window(step) for step in range(3)]  # a function of (seed, step) only
    for step, call in enumerate(engine.calls):
        assert call["seeds"] == [derive_seed(0, Stream.SAMPLE_NOISE, step, i) for i in range(8)]
        assert call["columns"]["target"] == [p.upper() for p in call["prompts"]]
        assert call["prompts"][0] == call["prompts"][3] and call["prompts"][4] == call["prompts"][7]
    assert len({s for call in engine.calls for s in call["seeds"]}) == 24  # distinct noise per sample


def test_height_and_width_give_non_square_rollouts(tmp_path):
    sizes = []

    def record_size(prompts, images, **columns):
        sizes.extend(image.size for image in images)
        return brightness(prompts, images)

    args = tiny_config(tmp_path, max_steps=1, height=16, width=48)
    assert args.image_size == (16, 48) and tiny_config(tmp_path).image_size == (32, 32)
    GRPOTrainer(ovis_policy(), record_size, args=args, train_dataset=dataset()).train()
    assert sizes == [(48, 16)] * 8  # PIL sizes are (width, height)
    with pytest.raises(ValueError, match="width"):
        tiny_config(tmp_path, width=0)


def test_evaluate_scores_deterministic_samples(tmp_path):
    args = tiny_config(tmp_path, max_steps=1)
    eval_rows = [{"prompt": "a cat"}, {"prompt": "a boat"}, {"prompt": "the sun"}]
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(), eval_dataset=eval_rows)
    metrics = trainer.evaluate()
    seeds = [derive_seed(0, Stream.EVALUATION, i) for i in range(3)]
    trajectory = generate(trainer.policy, [r["prompt"] for r in eval_rows], seeds, height=32, width=32, num_steps=4,
                          micro_batch_size=4)
    expected = np.mean(brightness(None, trajectory.pil_images()))
    assert metrics["eval_rewards/brightness/mean"] == pytest.approx(expected, rel=1e-12)
    assert metrics["eval_rewards/total/mean"] == metrics["eval_rewards/brightness/mean"]


def test_phase_times_and_mfu_are_logged(tmp_path):
    args = tiny_config(tmp_path, max_steps=1, peak_flops=1e12)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset())
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "mfu/train" in e)
    for key in ("time/rollout", "time/reward", "time/train", "mfu/rollout", "mfu/train", "mfu/total", "grad_norm",
                "clip_frac", "approx_kl", "frac_reward_zero_std", "advantages/std", "rewards/brightness/std"):
        assert key in entry and math.isfinite(entry[key]), key
    assert entry["time/train"] > 0 and 0 < entry["mfu/train"] < 1


def test_reward_weights_given_twice_or_mismatched(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        GRPOTrainer(ovis_policy(), brightness, args=tiny_config(tmp_path, reward_weights=[1.0]),
                    train_dataset=dataset(), reward_weights=[2.0])
    with pytest.raises(ValueError, match="one weight per reward"):
        GRPOTrainer(ovis_policy(), [brightness, redness], args=tiny_config(tmp_path), train_dataset=dataset(),
                    reward_weights=[2.0])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\].*first row has \['text'\]"):
        GRPOTrainer(ovis_policy(), brightness, args=tiny_config(tmp_path), train_dataset=[{"text": "x"}])


def test_samples_go_to_a_wandb_table_when_reporting_to_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # no run directory, no network
    logged_tables = []

    class CaptureRun(TrainerCallback):  # runs after the wandb integration has started its run
        def on_train_begin(self, args, state, control, **kwargs):
            monkeypatch.setattr(wandb.run, "log", lambda data, *a, **k: logged_tables.append(data))

    args = tiny_config(tmp_path, max_steps=1, log_samples_steps=1, num_log_samples=3, report_to=["wandb"])
    trainer = GRPOTrainer(ovis_policy(), [brightness, redness], args=args, train_dataset=dataset(),
                          callbacks=[CaptureRun()])
    trainer.train()
    logged_tables = [data for data in logged_tables if "samples" in data]
    (data,) = logged_tables
    table = data["samples"]
    assert table.columns == ["image", "prompt", "brightness", "redness", "total", "advantage"]
    assert len(table.data) == 3 and data["train/global_step"] == 0
    assert not (tmp_path / "samples").exists()  # the table went to wandb instead of PNG + JSON


def test_a_reward_that_raises_names_itself_and_the_step(tmp_path):
    calls = []

    def flaky_ocr(prompts, images, **columns):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise ConnectionError("OCR server unreachable")
        return brightness(prompts, images)

    trainer = GRPOTrainer(ovis_policy(), [brightness, flaky_ocr], args=tiny_config(tmp_path, max_steps=3),
                          train_dataset=dataset())
    with pytest.raises(RewardError, match=r"GRPO step 2: reward 'flaky_ocr' raised ConnectionError on a batch of 8 "
                                          r"samples: OCR server unreachable") as info:
        trainer.train()
    cause = info.value.__cause__
    assert isinstance(cause, RewardError) and isinstance(cause.__cause__, ConnectionError)  # the user's exception


def test_rollouts_with_no_sample_scored_warn_then_stop(tmp_path, caplog):
    def unreachable(prompts, images, **columns):
        return [None] * len(prompts)  # e.g. a served reward with on_failure="none" whose server is down

    trainer = GRPOTrainer(ovis_policy(), unreachable, args=tiny_config(tmp_path, max_steps=5,
                                                                       max_consecutive_unscored=3),
                          train_dataset=dataset())
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match=r"3 rollout batches in a row had no sample "
                                                                        r"scored .*up to step 3 .*"
                                                                        r"max_consecutive_unscored=3"):
        trainer.train()
    warnings = [r.message for r in caplog.records if "could be scored" in r.message]
    assert len(warnings) == 1 and "step 1" in warnings[0]
    assert trainer.state.global_step == 2


def test_unscored_rollouts_in_a_row_reset_when_one_scores(tmp_path):
    calls = []

    def sometimes(prompts, images, **columns):
        calls.append(1)
        return [None] * len(prompts) if len(calls) % 2 else brightness(prompts, images)

    trainer = GRPOTrainer(ovis_policy(), sometimes, args=tiny_config(tmp_path, max_steps=4,
                                                                     max_consecutive_unscored=2),
                          train_dataset=dataset())
    trainer.train()
    assert logged(trainer, "rewards/unscored_rollouts_consecutive") == [1.0, 0.0, 1.0, 0.0]


def test_zero_advantage_micro_batches_are_skipped_with_the_same_update(tmp_path):
    # One group per micro-batch: the animal groups have all-zero advantages. Skipping them must give the very
    # same weights (optimizer moments included: a fully skipped step still steps with zero gradients) and save
    # their training forwards.
    runs = {}
    for skip in (False, True):
        args = tiny_config(tmp_path / str(skip), max_steps=4, skip_zero_advantage=skip, log_samples_steps=1,
                           num_log_samples=8, debug_ratio_check=True)
        trainer = GRPOTrainer(ovis_policy(), flat_for_animals, args=args, train_dataset=dataset())
        calls = []
        trainer.policy.transformer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        trainer.train()
        runs[skip] = trainer, sum(calls)
    (plain, plain_calls), (skipping, skipping_calls) = runs[False], runs[True]
    for (name, a), b in zip(trainable(plain).items(), trainable(skipping).values()):
        assert torch.equal(a, b), name
    expected = []
    for step in range(4):
        table = json.load(open(tmp_path / "True" / "samples" / f"step_{step:06d}.json"))["samples"]
        expected.append(np.mean([all(row["advantage"] == 0 for row in table[m * 4:(m + 1) * 4]) for m in (0, 1)]))
    assert 1.0 in expected and 0.5 in expected  # fully and partly skipped steps both occur
    assert logged(skipping, "frac_skipped_zero_advantage") == expected
    assert logged(plain, "frac_skipped_zero_advantage") == [0.0] * 4
    # 4 trained steps per micro-batch with grad enabled; sampling runs without grad
    assert plain_calls - skipping_calls == 4 * 2 * sum(expected)
    assert logged(skipping, "loss") == logged(plain, "loss")


def test_nothing_is_skipped_when_the_kl_term_has_a_gradient(tmp_path):
    args = tiny_config(tmp_path, max_steps=2, beta=0.1)
    trainer = GRPOTrainer(ovis_policy(), flat_for_animals, args=args, train_dataset=dataset())
    trainer.train()
    assert logged(trainer, "frac_skipped_zero_advantage") == [0.0, 0.0]
