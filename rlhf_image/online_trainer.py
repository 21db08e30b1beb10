"""[`OnlineTrainer`]: the base of the trainers that learn from their own samples (GRPO, forward-process RL).

Each optimizer step trains on one slice of a rollout batch: every `gradient_accumulation_steps * num_iterations`
micro-steps, each process samples `per_device_train_batch_size * gradient_accumulation_steps` images (whole groups of
`num_generations` images per prompt) through the rollout engine, the rewards are combined and turned into
group-relative advantages, and the batch is split into `gradient_accumulation_steps` micro-batches of exactly
`per_device_train_batch_size` images: the rows the sampler gave each transformer call, so a method that recomputes
the sampler's log-probs gets them bit for bit. A method's trainer subclasses it with its config (a subclass of
[`~rlhf_image.OnlineConfig`]) and implements `compute_loss` on a micro-batch `{"trajectory", "advantages",
"iteration", "micro_index"}`.

Determinism (the streams of `rlhf_image.seeding`): every sample's noise comes from its own seed, derived from
`(args.seed, SAMPLE_NOISE, global step at sampling, process index * rollout batch + index)` (with
`same_noise_per_group` its initial noise from `(args.seed, GROUP_NOISE, global step, global group index)`); the SDE
window from `(args.seed, SDE_WINDOW, global step)`; the prompt order is a permutation derived from `(args.seed,
DATA_ORDER, epoch)`. So a run resumed from a checkpoint (taken at a rollout boundary) continues exactly as if it had
never stopped.

Logged every `logging_steps` (through `Trainer.log`, so wandb and the other integrations get them):
`rewards/<name>/{mean,std}` per reward and `rewards/total/{mean,std}`, `rewards/unscored` (samples with a
`None`) and `rewards/unscored_total`, `frac_reward_zero_std` (groups with no reward spread),
`frac_skipped_zero_advantage` (micro-batches whose work `skip_zero_advantage` saved),
`advantages/{mean,std,min,max}`, `stat_tracker/{prompts,mean_rewards_per_prompt}` (with
`per_prompt_stat_tracking`), `rewards/unscored_rollouts_consecutive`, `time/<phase>` (seconds per step for
`rollout`, `reward`, `rollout_overhead`, `train`) and `mfu/{rollout,train,total}`, with what the method records.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Sampler
from transformers import TrainerCallback
from transformers.utils import logging

from rlhf_image.rewards.base import RewardError, reward_name
from rlhf_image.rewards.compose import aggregate

from .advantages import PerPromptStatTracker, group_advantages
from .base_trainer import BaseTrainer, describe_sizes
from .metrics import PhaseTimer, forward_flops, measure_peak_flops, mfu, save_sample_table, synchronize
from .online_config import OnlineConfig
from .policy import Conditioning, FlowPolicy, tensor_to_pil
from .rollout_engine import InProcessRolloutEngine, RolloutEngine, RolloutSpec
from .sampling import Trajectory
from .seeding import Stream, derive_seed

logger = logging.get_logger(__name__)

STAT_TRACKER_FILE = "stat_tracker.json"  # in a checkpoint, with `per_prompt_stat_tracking`


class GroupedPromptSampler(Sampler[int]):
    """Dataset indices for rollouts: each rollout takes `num_prompts` prompts of a permutation derived from
    `(seed, epoch)`, repeats each `num_generations` times consecutively (a group), and repeats the whole block
    `repeat` times (once per micro-step that trains on it). Incomplete rollouts at the end are dropped."""

    def __init__(self, dataset_size: int, num_prompts: int, num_generations: int, repeat: int, seed: int):
        if dataset_size < num_prompts:
            raise ValueError(f"train_dataset has {dataset_size} prompts but one rollout batch needs {num_prompts} "
                             "(rollout batch * processes / num_generations); add prompts or shrink the batch")
        self.dataset_size, self.num_prompts = dataset_size, num_prompts
        self.num_generations, self.repeat, self.seed = num_generations, repeat, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, Stream.DATA_ORDER, self.epoch))
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        for first in range(0, len(self) // (self.num_generations * self.repeat), self.num_prompts):
            block = [i for i in order[first:first + self.num_prompts] for _ in range(self.num_generations)]
            for _ in range(self.repeat):
                yield from block

    def __len__(self) -> int:
        rollouts = self.dataset_size // self.num_prompts
        return rollouts * self.num_prompts * self.num_generations * self.repeat


def _trajectory_to(trajectory: Trajectory, device: torch.device) -> Trajectory:
    """The trajectory with every tensor (conditioning included) on `device`."""
    values = {f.name: getattr(trajectory, f.name) for f in fields(trajectory)}
    for name, value in values.items():
        if isinstance(value, (torch.Tensor, Conditioning)):
            values[name] = value.to(device)
    return Trajectory(**values)


def _identity(rows: list[dict]) -> list[dict]:
    return rows


class OnlineTrainer(BaseTrainer):
    """Base of the trainers that sample their own rollouts and learn from rewards (see the module docstring).

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the policy; a pipeline of a registered family is wrapped with
            `FlowPolicy.from_pipeline`. Its transformer is what trains.
        reward_funcs (a callable or a list of callables): rewards `fn(prompts, images, **columns) ->
            list[float | None]`, sync or async (see `rlhf_image.rewards.base`); `None` means "could not score".
        args ([`OnlineConfig`]): the method's config.
        train_dataset (`datasets.Dataset` or `list[dict]`): rows with a `prompt` column; the other columns are
            passed to the rewards as keyword lists.
        eval_dataset (same, *optional*): prompts scored by [`evaluate`] with deterministic (ODE) sampling.
        reward_weights (`list[float]`, *optional*): one weight per reward (or set `args.reward_weights`).
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter; the reference is the adapter disabled.
        rollout_engine ([`RolloutEngine`], *optional*): where rollouts run; defaults to
            [`InProcessRolloutEngine`].
        callbacks (`list[TrainerCallback]`, *optional*).
        needs_reference (`bool`, defaults to `False`): the method's loss uses the reference policy.

    A rollout batch in which no sample could be scored trains on zero advantages: the first one logs a warning and
    `args.max_consecutive_unscored` of them in a row stop training. A reward that raises stops training with a
    [`~rlhf_image.rewards.base.RewardError`] naming the reward and the step, the reward's exception chained.
    """

    config_class = OnlineConfig
    method_name = "Online RL"
    required_columns = ("prompt",)

    def __init__(
        self,
        model: FlowPolicy | Any,
        reward_funcs: Callable | Sequence[Callable],
        args: OnlineConfig,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        reward_weights: Sequence[float] | None = None,
        peft_config: Any = None,
        rollout_engine: RolloutEngine | None = None,
        callbacks: list[TrainerCallback] | None = None,
        *,
        needs_reference: bool = False,
    ):
        args = self.check_args(args)
        self.reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        self.reward_names = [reward_name(f) for f in self.reward_funcs]
        if reward_weights is not None and args.reward_weights is not None:
            raise ValueError("reward weights given twice: pass `reward_weights` to the trainer or set "
                             f"{type(args).__name__}.reward_weights, not both")
        weights = reward_weights if reward_weights is not None else args.reward_weights
        weights = [1.0] * len(self.reward_funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"got {len(weights)} reward weights for {len(self.reward_funcs)} reward functions "
                             f"({self.reward_names}); pass one weight per reward")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights={weights}: weights must be finite numbers")
        self.reward_weights = np.asarray(weights, dtype=np.float64)

        super().__init__(model, args, train_dataset, eval_dataset, peft_config=peft_config,
                         needs_reference=needs_reference, data_collator=_identity, callbacks=callbacks)
        self.rollout_engine = rollout_engine if rollout_engine is not None else InProcessRolloutEngine()
        self.rollout_engine.bind(self.policy, self.reward_funcs, self.reward_names)
        self.spec = RolloutSpec(
            height=args.image_size[0], width=args.image_size[1], num_steps=args.num_inference_steps,
            sde_type=args.sde_type, noise_level=args.noise_level, guidance_scale=args.guidance_scale,
            micro_batch_size=args.micro_batch_size)
        self.peak_flops = args.peak_flops
        self.counters.update({"nonfinite/skipped_steps_total": 0, "nonfinite/consecutive": 0,
                              "rewards/unscored_total": 0, "rewards/unscored_rollouts_consecutive": 0})
        self._timer = PhaseTimer(args.device)
        self._flops: dict[str, float] = defaultdict(float)
        self._buffer: list[dict] | None = None
        self._buffer_cycle = -1
        self._rollout_seconds = 0.0
        self._micro_step_flops = 0
        self._last_logged_step = 0
        self.stat_tracker: PerPromptStatTracker | None = None
        if args.per_prompt_stat_tracking:
            self.stat_tracker = PerPromptStatTracker(**self._advantage_options())
        self._tracked_epoch = -1

    # --- data ------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: training requires a train_dataset")
        args = self.args
        num_prompts = args.rollout_batch_size * args.world_size // args.num_generations
        sampler = GroupedPromptSampler(len(self.train_dataset), num_prompts, args.num_generations,
                                       repeat=args.gradient_accumulation_steps * args.num_iterations, seed=args.seed)
        loader = DataLoader(self.train_dataset, batch_size=args.rollout_batch_size, sampler=sampler,
                            collate_fn=_identity, num_workers=args.dataloader_num_workers, drop_last=True)
        return self.accelerator.prepare(loader)

    def _prepare_inputs(self, rows: list[dict]) -> dict[str, Any]:
        """Called by `training_step` with this process's rows of the current rollout: samples and scores at the
        start of each rollout cycle (`gradient_accumulation_steps * num_iterations` micro-batches), then hands out
        its micro-batches in order."""
        args = self.args
        accumulation = args.gradient_accumulation_steps
        cycle_length = accumulation * args.num_iterations
        micro_step = self.state.global_step * accumulation + self.micro_batch_index
        cycle, position = divmod(micro_step, cycle_length)
        if position == 0 or self._buffer_cycle != cycle:
            if position:
                logger.warning("resuming inside a rollout batch (global step %d is not a multiple of "
                               "num_iterations=%d): the batch is sampled again, so the run is not exact",
                               self.state.global_step, args.num_iterations)
            engine_before = sum(self._timer.seconds[p] for p in ("rollout", "reward"))
            start = time.perf_counter()
            self._buffer, self._buffer_cycle = self._rollout(rows), cycle
            self._rollout_seconds = time.perf_counter() - start
            engine = sum(self._timer.seconds[p] for p in ("rollout", "reward")) - engine_before
            # Moving tensors, advantages, logging: the trainer's own overhead around the engine.
            self._timer.add("rollout_overhead", self._rollout_seconds - engine)
        micro_index = micro_step % accumulation
        return {**self._buffer[micro_index], "iteration": position // accumulation, "micro_index": micro_index}

    def _rollout(self, rows: list[dict]) -> list[dict]:
        args = self.args
        step = self.state.global_step
        prompts = [row["prompt"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        offset = self.accelerator.process_index * len(rows)
        seeds = [derive_seed(args.seed, Stream.SAMPLE_NOISE, step, offset + i) for i in range(len(rows))]
        if args.same_noise_per_group:  # (initial, steps) pairs: a group's initial noise from its global index
            seeds = [(derive_seed(args.seed, Stream.GROUP_NOISE, step, (offset + i) // args.num_generations), seed)
                     for i, seed in enumerate(seeds)]
        with self.rollout_weights():
            self.rollout_engine.sync_weights(self.policy, version=step)
            try:
                batch = self.rollout_engine.rollout(prompts, seeds, columns, self.spec, self._window(step))
            except RewardError as error:
                raise RewardError(f"{self.method_name} step {step + 1}: {error}") from error
        if batch.weights_version != step:
            raise RuntimeError(f"the rollout engine sampled with weights version {batch.weights_version}, expected "
                               f"{step}: an online update trains on samples of the current weights")
        if batch.reward_names != self.reward_names:
            raise RuntimeError(f"the rollout engine returned rewards {batch.reward_names}, "
                               f"expected {self.reward_names}")
        trajectory = _trajectory_to(batch.trajectory, self.args.device)
        group_ids = torch.arange(len(rows)) // args.num_generations
        for i in range(len(rows)):
            if prompts[i] != prompts[int(group_ids[i]) * args.num_generations]:
                raise RuntimeError("rows of a rollout batch must come in groups of num_generations equal prompts")

        per_reward = batch.per_reward.double().cpu().numpy()
        total = aggregate(per_reward, self.reward_weights, args.reward_aggregation)
        advantages = self.compute_advantages(torch.from_numpy(total), group_ids, prompts)
        self._log_rollout(step, trajectory, per_reward, total, group_ids, advantages, seeds, batch.timings)

        batches = self.micro_batches(trajectory, advantages.to(self.args.device))
        self._mark_skipped(batches)
        return batches

    def compute_advantages(self, total: torch.Tensor, group_ids: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Group-relative advantages of this process's rollout batch (`[N]`, from the aggregated rewards `total`
        `[N]`, NaN where unscored, the group of each sample `[N]` and its prompt), as `scale_rewards`,
        `per_prompt_stat_tracking` and `advantage_clip` say. Every process calls it (the batch std and the tracker
        gather every process's rewards)."""
        args = self.args
        options = self._advantage_options()
        if self.stat_tracker is not None:
            self._track_epoch(self.state.global_step)
            everyone = self._gather_rewards(total)
            all_prompts = gather_object(list(prompts)) if args.world_size > 1 else list(prompts)
            start = self.accelerator.process_index * len(total)
            advantages = self.stat_tracker.update(all_prompts, everyone)[start:start + len(total)]
            self.record_metrics({f"stat_tracker/{key}": value for key, value in self.stat_tracker.stats().items()})
            return advantages
        batch_rewards = self._gather_rewards(total) if options["batch_std"] else None
        return group_advantages(total, group_ids, batch_rewards=batch_rewards, **options)

    def _advantage_options(self) -> dict[str, Any]:
        """`scale_rewards` and `advantage_clip` as the options of `group_advantages` and the tracker."""
        args = self.args
        return {"scale_by_std": args.scale_rewards != "none", "batch_std": args.scale_rewards == "batch",
                "clip": args.advantage_clip}

    def _gather_rewards(self, total: torch.Tensor) -> torch.Tensor:
        """Every process's `total` (`[N]` each), concatenated in process order: `[world_size * N]`, float64."""
        if self.args.world_size == 1:
            return total.double()
        return self.accelerator.gather(total.double().to(self.args.device)).cpu()

    def _track_epoch(self, step: int) -> None:
        """Clear the per-prompt statistics when the rollout sampled at `step` is the first of an epoch of the
        prompt dataset (the sampler's epoch: `rollouts_per_epoch * num_iterations` optimizer steps each)."""
        args = self.args
        num_prompts = args.rollout_batch_size * args.world_size // args.num_generations
        epoch = step // args.num_iterations // (len(self.train_dataset) // num_prompts)
        if epoch != self._tracked_epoch:
            self.stat_tracker.clear()
            self._tracked_epoch = epoch

    def micro_batches(self, trajectory: Trajectory, advantages: torch.Tensor) -> list[dict[str, Any]]:
        """The rollout batch cut into `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size`
        samples, in order: `{"trajectory", "advantages"}` each."""
        size = self.args.per_device_train_batch_size
        return [{"trajectory": trajectory.select(list(range(m * size, (m + 1) * size))),
                 "advantages": advantages[m * size:(m + 1) * size]}
                for m in range(self.args.gradient_accumulation_steps)]

    # --- the tracker's state in checkpoints ----------------------------------------------------------
    def checkpoint_files(self) -> list[str]:
        return [*super().checkpoint_files(), *([STAT_TRACKER_FILE] if self.args.per_prompt_stat_tracking else [])]

    def save_extra_state(self, checkpoint_dir: str) -> None:
        super().save_extra_state(checkpoint_dir)
        if self.stat_tracker is not None and self.args.should_save:
            # every process holds the same statistics (built from gathered rewards); JSON round-trips the floats
            with open(os.path.join(checkpoint_dir, STAT_TRACKER_FILE), "w") as f:
                json.dump({"epoch": self._tracked_epoch, **self.stat_tracker.state_dict()}, f)

    def load_extra_state(self, checkpoint_dir: str) -> None:
        super().load_extra_state(checkpoint_dir)
        if self.stat_tracker is not None:
            with open(os.path.join(checkpoint_dir, STAT_TRACKER_FILE)) as f:
                state = json.load(f)
            self._tracked_epoch = state.pop("epoch")
            self.stat_tracker.load_state_dict(state)

    def rollout_weights(self):
        """Context in which the policy's weights are those that sample the training rollouts: the trained weights
        (on-policy) by default; a method that collects data with another policy (DiffusionNFT's old policy)
        swaps it in here. The rollout engine is synced inside it."""
        return nullcontext()

    def zero_advantage_is_free(self) -> bool:
        """Whether the method's loss has exactly zero gradient on a micro-batch whose advantages are all 0, so that
        skipping it changes nothing (`args.skip_zero_advantage`). No by default; GRPO says yes when `beta == 0`."""
        return False

    def _mark_skipped(self, batches: list[dict[str, Any]]) -> None:
        """Flag (`"skip"`) the micro-batches whose work `args.skip_zero_advantage` saves, and log their share."""
        args = self.args
        free = args.skip_zero_advantage and self.zero_advantage_is_free()
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            free = False  # a skipped micro-batch touches the parameters outside a forward: not under ZeRO-3
        flags = torch.tensor([free and bool((batch["advantages"] == 0).all()) for batch in batches],
                             device=args.device)
        if args.world_size > 1:
            # Every process skips the same micro-batches: the gradient hooks of ZeRO must fire alike on all ranks.
            flags = self.accelerator.gather(flags).view(args.world_size, -1).all(dim=0)
            if not self.is_deepspeed_enabled:
                flags[-1] = False  # DDP all-reduces the step's gradients in its last micro-batch's backward
        for batch, flag in zip(batches, flags.tolist()):
            batch["skip"] = flag
        self.record_metrics({"frac_skipped_zero_advantage": sum(b["skip"] for b in batches) / len(batches)})

    def skipped_micro_batch_loss(self, model: torch.nn.Module) -> torch.Tensor:
        """The loss of a skipped micro-batch, without a transformer call: exactly 0, with exactly zero gradients for
        every trainable parameter, so the optimizer (moments included) and DeepSpeed's gradient hooks see what the
        computed micro-batch would have given them."""
        return torch.stack([p.sum() for p in model.parameters() if p.requires_grad]).sum() * 0.0

    def backward_by_parts(self, model: torch.nn.Module, num_parts: int,
                          part_loss: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """A micro-batch's loss `sum_k part_loss(k) / num_parts` (its trained timesteps, say), with one backward per
        part: every part but the last is backpropagated here as soon as its loss is computed (its autograd graph is
        freed before the next part's forward), and the returned loss carries the last part's graph plus the others'
        detached values, for the `Trainer`'s own backward (which also does the gradient synchronisation and, under
        DeepSpeed, the engine step). Peak activation memory is that of one part; the gradient is that of one
        backward through all of them.

        Args:
            model (`torch.nn.Module`): the module `compute_loss` was handed (DDP / DeepSpeed wrapper).
            num_parts (`int`).
            part_loss (`Callable[[int], torch.Tensor]`): the scalar loss of part `k` (it may record statistics).
        """
        done = torch.zeros((), device=self.args.device)  # the parts already backpropagated (detached)
        for k in range(num_parts):
            last = k == num_parts - 1
            with nullcontext() if last else self._no_gradient_sync(model):
                loss = part_loss(k) / num_parts
                if not last and loss.requires_grad:
                    self._backward_now(model, loss)
                    loss = loss.detach()
                if not last:
                    done = done + loss
        return loss + done

    def _no_gradient_sync(self, model):
        """DDP accumulates a part's gradient locally (the all-reduce happens once, in the `Trainer`'s backward of
        the last part)."""
        return model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext()

    def _backward_now(self, model, loss: torch.Tensor) -> None:
        """Backward of one part, scaled as the `Trainer` scales the loss it backpropagates, without the optimizer
        step: under DeepSpeed the engine's backward off the accumulation boundary (ZeRO reduces and accumulates
        each backward's gradients), else the accelerator's (mixed-precision scaling)."""
        loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)  # set by the training loop
        if self.is_deepspeed_enabled:
            model.set_gradient_accumulation_boundary(False)
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def _window(self, step: int) -> tuple[int, int]:
        """The stochastic steps `[start, end)` of the rollout sampled at `step` (Flow-GRPO-Fast); none for ODE."""
        args = self.args
        if args.sde_type == "ode":
            return 0, 0
        if args.sde_window_size == 0:
            return 0, args.num_inference_steps
        low, high = args.sde_window_range
        rng = np.random.default_rng(derive_seed(args.seed, Stream.SDE_WINDOW, step))
        start = int(rng.integers(low, high - args.sde_window_size + 1))
        return start, start + args.sde_window_size

    # --- training --------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        self._rollout_seconds = 0.0
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        synchronize(self.args.device)
        self._timer.add("train", time.perf_counter() - start - self._rollout_seconds)
        return loss

    # --- logging ---------------------------------------------------------------------------------
    def _log_rollout(self, step, trajectory, per_reward, total, group_ids, advantages, seeds, timings) -> None:
        # Statistics over every process's samples (each process holds whole groups).
        group_zero_spread = np.zeros(len(total))
        for group in torch.unique(group_ids):
            members = (group_ids == group).numpy()
            values = total[members][~np.isnan(total[members])]
            group_zero_spread[members] = float(values.size < 2 or float(values.std()) == 0.0)
        local = np.concatenate([per_reward, total[:, None], advantages.double().cpu().numpy()[:, None],
                                group_zero_spread[:, None]], axis=1)
        gathered = self.accelerator.gather(torch.from_numpy(local).to(self.args.device)).cpu().numpy()
        per_reward, total, advantages, group_zero_spread = (gathered[:, :-3], gathered[:, -3], gathered[:, -2],
                                                            gathered[:, -1])
        metrics = {}
        for name, column in [*zip(self.reward_names, per_reward.T), ("total", total)]:
            scored = column[~np.isnan(column)]
            metrics[f"rewards/{name}/mean"] = float(scored.mean()) if scored.size else math.nan
            metrics[f"rewards/{name}/std"] = float(scored.std()) if scored.size else math.nan
        unscored = int(np.isnan(total).sum())
        self.counters["rewards/unscored_total"] += unscored
        metrics["rewards/unscored"] = float(unscored)
        # Per-sample flags of equal-size groups: their mean is the share of groups.
        metrics["frac_reward_zero_std"] = float(group_zero_spread.mean())
        metrics.update({"advantages/mean": float(advantages.mean()), "advantages/std": float(advantages.std()),
                        "advantages/min": float(advantages.min()), "advantages/max": float(advantages.max())})
        self.record_metrics(metrics)
        self._check_unscored(step, unscored == len(total))
        for phase in ("rollout", "reward"):
            self._timer.add(phase, timings.get(phase, 0.0))
        self._count_rollout_flops(trajectory)
        if self.args.log_samples_steps and step % self.args.log_samples_steps == 0 and self.is_world_process_zero():
            self._log_samples(step, trajectory, local[:, :-3], local[:, -3], group_ids, local[:, -2], seeds)

    def _check_unscored(self, step: int, none_scored: bool) -> None:
        """The policy for rollouts in which no sample was scored (every process decides alike: `total` is gathered)."""
        key = "rewards/unscored_rollouts_consecutive"
        self.counters[key] = self.counters[key] + 1 if none_scored else 0
        count, limit = self.counters[key], self.args.max_consecutive_unscored
        if count >= limit:
            raise RuntimeError(
                f"{count} rollout batches in a row had no sample scored (every reward returned None; rewards "
                f"{self.reward_names}), up to step {step + 1} ({type(self.args).__name__}.max_consecutive_unscored={limit}): training "
                "on zero advantages changes nothing. Check the rewards (a remote reward server that is down, a "
                "missing dataset column a reward needs) or raise max_consecutive_unscored.")
        if count == 1:
            logger.warning("no sample of the rollout batch at step %d could be scored (rewards %s returned None for "
                           "every sample): this step trains on zero advantages", step + 1, self.reward_names)

    def _log_samples(self, step, trajectory, per_reward, total, group_ids, advantages, seeds) -> None:
        count = min(self.args.num_log_samples, len(trajectory))
        images = tensor_to_pil(trajectory.images[:count])
        rows = [{"prompt": trajectory.prompts[i], "seed": seeds[i], "group": int(group_ids[i]),
                 "rewards": {name: _none_if_nan(per_reward[i, k]) for k, name in enumerate(self.reward_names)},
                 "total": _none_if_nan(total[i]), "advantage": float(advantages[i])} for i in range(count)]
        if "wandb" in self.args.report_to:
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=["image", "prompt", *self.reward_names, "total", "advantage"])
                for image, row in zip(images, rows):
                    table.add_data(wandb.Image(image), row["prompt"], *row["rewards"].values(), row["total"],
                                   row["advantage"])
                wandb.run.log({"samples": table, "train/global_step": step})
                return
        save_sample_table(os.path.join(self.args.output_dir, "samples"), step, images, rows)

    def _count_rollout_flops(self, trajectory: Trajectory) -> None:
        calls = math.ceil(len(trajectory) / self.args.micro_batch_size) * self.args.num_inference_steps
        calls *= 2 if trajectory.guidance_scale > 1 else 1
        flops = calls * self._forward_flops(trajectory)
        self._flops["rollout"] += flops
        self._micro_step_flops += flops

    def count_train_flops(self, trajectory: Trajectory, forwards: float) -> None:
        """Count `forwards` transformer forward passes of micro-batch size (a backward counts as two) in the train
        phase, for the MFU metrics and `state.total_flos`."""
        flops = forwards * self._forward_flops(trajectory)
        self._flops["train"] += flops
        self._micro_step_flops += flops

    def _forward_flops(self, trajectory: Trajectory) -> int:
        return forward_flops(self.policy, trajectory.cond, trajectory.height, trajectory.width,
                             self.args.micro_batch_size)

    def floating_point_ops(self, inputs) -> int:
        """Transformer FLOPs of the micro-step just run (its share of rollout included), for `state.total_flos`."""
        flops, self._micro_step_flops = self._micro_step_flops, 0
        return int(flops)

    def _phase_metrics(self) -> dict[str, float]:
        steps = max(1, self.state.global_step - self._last_logged_step)
        self._last_logged_step = self.state.global_step
        seconds = self._timer.pop()
        if self.peak_flops is None:
            dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else self.policy.dtype
            self.peak_flops = measure_peak_flops(self.args.device, dtype)
        out = {f"time/{phase}": value / steps for phase, value in seconds.items()}
        for phase in ("rollout", "train"):
            if seconds.get(phase):
                out[f"mfu/{phase}"] = mfu(self._flops[phase], seconds[phase], self.peak_flops)
        if seconds:
            out["mfu/total"] = mfu(sum(self._flops.values()), sum(seconds.values()), self.peak_flops)
        self._flops.clear()
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(key.startswith("eval_") for key in logs) and "train_runtime" not in logs:
            logs.update(self._phase_metrics())
        super().log(logs, start_time)

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score the eval prompts on deterministic (ODE) samples with fixed seeds, so numbers are comparable across
        steps, with the EMA weights when `use_ema` is set. Every process evaluates the whole eval set. Returns
        `{prefix}_rewards/<name>/mean` and the total."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError(f"{type(self).__name__}.evaluate needs an eval_dataset")
        if dataset is not self.eval_dataset:
            self.check_dataset("eval_dataset", dataset)
        rows = [dataset[i] for i in range(len(dataset))]
        prompts = [row["prompt"] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        seeds = [derive_seed(self.args.seed, Stream.EVALUATION, i) for i in range(len(rows))]
        # With `use_ema` the EMA weights sample (a remote engine is sent them; the next training rollout sends the
        # trained weights back).
        with self.saved_weights():
            self.rollout_engine.sync_weights(self.policy, version=self.state.global_step)
            try:
                batch = self.rollout_engine.rollout(prompts, seeds, columns, replace(self.spec, sde_type="ode"),
                                                    (0, 0))
            except RewardError as error:
                raise RewardError(f"{self.method_name} evaluation at step {self.state.global_step}: {error}") \
                    from error
        per_reward = batch.per_reward.double().cpu().numpy()
        total = aggregate(per_reward, self.reward_weights, self.args.reward_aggregation)
        metrics = {}
        for k, name in enumerate(self.reward_names):
            metrics[f"{metric_key_prefix}_rewards/{name}/mean"] = float(np.nanmean(per_reward[:, k]))
        metrics[f"{metric_key_prefix}_rewards/total/mean"] = float(np.nanmean(total))
        metrics[f"{metric_key_prefix}_time/rollout"] = batch.timings.get("rollout", 0.0)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- model card ------------------------------------------------------------------------------
    def model_card_details(self) -> dict[str, object]:
        args = self.args
        rewards = ", ".join(f"{name} (weight {w:g})" for name, w in zip(self.reward_names, self.reward_weights))
        sampler = args.sde_type if args.sde_type == "ode" else f"{args.sde_type}, noise level {args.noise_level}"
        return {**super().model_card_details(), "reward functions": rewards,
                "reward aggregation": args.reward_aggregation, "sampler": sampler,
                "group size": args.num_generations, "image size": describe_sizes([args.image_size]),
                "inference steps": args.num_inference_steps, "guidance scale": args.guidance_scale}

    def card_metric(self, key: str) -> bool:
        return key.startswith("rewards/") and key.endswith("/mean")


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(float(value)) else float(value)
