"""`GRPOTrainer`: Flow-GRPO (Liu et al., 2025) for flow-matching text-to-image models, on `transformers.Trainer`.

The rollouts, rewards, advantages and their logging are [`~rlhf_image.online_trainer.OnlineTrainer`]'s: each process
samples whole groups through the rollout engine (the old log-probs are recorded while sampling) and trains on
micro-batches of exactly the rows the sampler gave each transformer call, so the first (on-policy) pass recomputes
the recorded log-probs bit for bit and the importance ratio is exactly 1 (a self-check). Each micro-batch's loss is
the mean over its trained steps of the clipped surrogate (`grpo_loss`) plus `beta` times the KL to the reference
policy (`step_kl`). The trained steps of micro-batch `m` are drawn from `(args.seed, TRAINED_STEPS, global step, m)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .grpo_config import GRPOConfig
from .losses import clipped_surrogate, grpo_loss, guard_log_ratio, guard_loss_weight
from .online_trainer import OnlineTrainer
from .policy import FlowPolicy
from .rollout_engine import RolloutEngine
from .sampling import Trajectory, transition_log_prob
from .sde import flow_grpo_log_prob, step_kl
from .seeding import Stream, derive_seed

logger = logging.get_logger(__name__)


class GRPOTrainer(OnlineTrainer):
    """Group Relative Policy Optimization for flow-matching text-to-image models (Flow-GRPO).

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the policy; a pipeline of a registered family is wrapped with
            `FlowPolicy.from_pipeline`. Its transformer is what trains.
        reward_funcs (a callable or a list of callables): rewards `fn(prompts, images, **columns) ->
            list[float | None]`, sync or async (see `rlhf_image.rewards.base`); `None` means "could not score".
        args ([`GRPOConfig`], *optional*).
        train_dataset (`datasets.Dataset` or `list[dict]`): rows with a `prompt` column; the other columns are
            passed to the rewards as keyword lists.
        eval_dataset (same, *optional*): prompts scored by [`evaluate`] with deterministic (ODE) sampling.
        reward_weights (`list[float]`, *optional*): one weight per reward (or set `args.reward_weights`).
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter; the reference is the adapter disabled.
            Without it the whole transformer trains and, if `beta > 0`, a frozen copy is the reference.
        rollout_engine ([`RolloutEngine`], *optional*): where rollouts run; defaults to
            [`InProcessRolloutEngine`].
        callbacks (`list[TrainerCallback]`, *optional*).

    Logged besides [`OnlineTrainer`]'s metrics: `ratio/{mean,min,max}`, `clip_frac`, `approx_kl`, `kl` (when
    `beta > 0`), `loss/policy`, the Trainer's `loss` and `grad_norm`, `nonfinite/skipped` (this step) and
    `nonfinite/{skipped_steps_total,consecutive}`, `ratio/on_policy_mismatch_total`.
    """

    config_class = GRPOConfig
    method_name = "GRPO"

    def __init__(
        self,
        model: FlowPolicy | Any,
        reward_funcs: Callable | Sequence[Callable],
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        reward_weights: Sequence[float] | None = None,
        peft_config: Any = None,
        rollout_engine: RolloutEngine | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        args = self.check_args(args if args is not None else GRPOConfig(output_dir="grpo-output"))
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, reward_weights=reward_weights,
                         peft_config=peft_config, rollout_engine=rollout_engine, callbacks=callbacks,
                         needs_reference=args.beta > 0)
        self.counters.setdefault("ratio/on_policy_mismatch_total", 0)

    def _train_steps(self, num_recorded: int, micro_index: int) -> list[int]:
        """Indices (into the recorded window) trained on by micro-batch `micro_index` at this global step."""
        count = max(1, int(self.args.timestep_fraction * num_recorded))
        if count >= num_recorded:
            return list(range(num_recorded))
        rng = np.random.default_rng(derive_seed(self.args.seed, Stream.TRAINED_STEPS, self.state.global_step,
                                                micro_index))
        return sorted(rng.choice(num_recorded, size=count, replace=False).tolist())

    def zero_advantage_is_free(self) -> bool:
        # The clipped surrogate of a zero advantage is 0 whatever the ratio; the KL term is not.
        return self.args.beta == 0

    # --- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over the trained steps of the clipped GRPO surrogate plus `beta` * KL to the reference, with one
        backward per trained step ([`~rlhf_image.online_trainer.OnlineTrainer.backward_by_parts`]): peak activation
        memory is that of one step's graph, whatever the number of trained steps."""
        args = self.args
        if inputs.get("skip"):
            return self.skipped_micro_batch_loss(model)
        trajectory: Trajectory = inputs["trajectory"]
        advantages: torch.Tensor = inputs["advantages"]
        guidance = trajectory.guidance_scale if args.train_with_cfg else 1.0
        steps = self._train_steps(trajectory.log_probs.shape[1], inputs["micro_index"])
        ratios, stats_list, kls = [], [], []

        def step_loss(position: int) -> torch.Tensor:
            loss, stats, kl = self._step_loss(model, trajectory, steps[position], advantages, guidance)
            ratios.append(stats["ratio"])
            stats_list.append(stats)
            if kl is not None:
                kls.append(kl)
            return loss

        loss = self.backward_by_parts(model, len(steps), step_loss)

        ratio = torch.cat(ratios)
        stats = {"ratio/mean": ratio.mean(), "ratio/min": ratio.min(), "ratio/max": ratio.max(),
                 "clip_frac": torch.cat([s["clip_frac"] for s in stats_list]).mean(),
                 "approx_kl": torch.cat([s["approx_kl"] for s in stats_list]).mean(), "loss/policy": loss.detach(),
                 "on_policy_exact": (ratio == 1).all().float()}
        if kls:
            stats["kl"] = torch.cat(kls).mean()
        values = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one device sync
        exact = values.pop("on_policy_exact") == 1.0
        if inputs["iteration"] == 0 and guidance == trajectory.guidance_scale and not exact:
            self._on_policy_ratio_mismatch(values["ratio/min"], values["ratio/max"])
        self.record_metrics(values)
        self._count_train_flops(trajectory, len(steps), guidance > 1)
        return loss

    def _step_loss(self, model, trajectory: Trajectory, j: int, advantages: torch.Tensor, guidance: float):
        """Loss of the recorded step `j` of a micro-batch, in the config's conventions: `(loss, surrogate stats,
        detached per-sample KL [B] or None)`."""
        args = self.args
        # Through the wrapper (DDP, DeepSpeed) that the Trainer hands us, so gradients are synchronised.
        log_prob, mean, std = transition_log_prob(self.policy, trajectory, j, guidance_scale=guidance,
                                                  transformer=model)
        old_log_prob = trajectory.log_probs[:, j]
        step = int(trajectory.step_indices[j])
        dt = trajectory.sigmas[step + 1] - trajectory.sigmas[step]
        if args.grpo_guard:
            log_ratio = guard_log_ratio(log_prob, old_log_prob, mean, trajectory.means[:, j], std)
            loss, stats = clipped_surrogate(log_ratio, advantages, args.epsilon)
            loss = loss * guard_loss_weight(trajectory.sigmas[step], trajectory.sigmas[step + 1])
        else:
            if args.log_prob_convention == "flow_grpo" and trajectory.sde_type == "cps":
                next_state = trajectory.latents[:, j + 1].float()
                squared = ((next_state - mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
                log_prob = flow_grpo_log_prob(log_prob, std, squared)
                old_log_prob = flow_grpo_log_prob(old_log_prob, std)
            loss, stats = grpo_loss(log_prob, old_log_prob, advantages, args.epsilon)
        if args.beta == 0:
            return loss, stats, None
        with torch.no_grad(), self.reference_transformer() as reference:
            _, reference_mean, _ = transition_log_prob(self.policy, trajectory, j, guidance_scale=guidance,
                                                       transformer=reference)
        flow_grpo_sde = args.kl_convention == "flow_grpo" and trajectory.sde_type == "sde"
        kl = step_kl(mean, reference_mean, std, args.kl_convention, dt=dt if flow_grpo_sde else None)
        return loss + args.beta * kl.mean(), stats, kl.detach()

    def _on_policy_ratio_mismatch(self, ratio_min: float, ratio_max: float) -> None:
        self.counters["ratio/on_policy_mismatch_total"] += 1
        message = (f"on-policy importance ratio is not exactly 1 (min {ratio_min!r}, max {ratio_max!r}): training "
                   "does not recompute the sampler's log-probs bit for bit (different micro-batch size, dtype, "
                   "autocast, dropout, or a remote engine on other hardware)")
        if self.args.debug_ratio_check:
            raise RuntimeError(message)
        if self.counters["ratio/on_policy_mismatch_total"] == 1:
            logger.warning(message)

    def _count_train_flops(self, trajectory: Trajectory, num_steps: int, cfg: bool) -> None:
        # Forward + backward = 3 forwards per call; the reference adds one forward.
        calls = num_steps * (2 if cfg else 1)
        self.count_train_flops(trajectory, calls * (3 + (1 if self.args.beta > 0 else 0)))

    # --- model card ------------------------------------------------------------------------------
    def model_card_details(self) -> dict[str, object]:
        return {**super().model_card_details(), "beta": self.args.beta}
