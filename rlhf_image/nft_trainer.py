"""`NFTTrainer`: forward-process RL for flow-matching text-to-image models: DiffusionNFT (Zheng et al. 2025,
arXiv 2509.16117) and, as `loss_type="awm"`, Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050).

The rollouts, rewards and advantages are [`~rlhf_image.online_trainer.OnlineTrainer`]'s, with any sampler (the
deterministic ODE by default) and no log-probabilities: only the clean final latents `x0` of each sample are kept.
Each micro-batch trains on forward-noised copies `x_t = (1 - s) x0 + s eps` at noise levels of the sampling
schedule (`NFTConfig.num_train_timesteps` of them per sample, each with fresh noise), conditional predictions only
(no CFG in training), one backward per noise level. The noise levels and the noise of micro-batch `m` of process
`p` come from `(args.seed, NOISED_COPIES, global step, p * gradient_accumulation_steps + m)`: a resumed run draws what
an uninterrupted one drew, and two processes what one process accumulating their micro-batches draws.

DiffusionNFT keeps an *old policy*: a soft copy of the trained weights (an [`~rlhf_image.ema.EMAModel`] updated
after each rollout batch's last optimizer step with the decay of [`~rlhf_image.nft.old_policy_decay`]). It samples
the rollouts (swapped into the policy's weights for the rollout, so a remote engine is sent it) and gives `v_old`
in the loss; it is saved in every checkpoint (`old_policy.safetensors`) and restored on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from transformers import TrainerCallback

from .ema import EMAModel
from .losses import interpolate, per_sample_mse
from .nft import awm_loss, nft_loss, old_policy_decay, random_schedule_sigmas, stratified_schedule_sigmas
from .nft_config import NFTConfig
from .online_trainer import OnlineTrainer
from .policy import FlowPolicy
from .rollout_engine import RolloutEngine
from .sampling import Trajectory
from .seeding import Stream

OLD_POLICY_FILE = "old_policy.safetensors"  # in a checkpoint (per-rank files under ZeRO-3), with loss_type "nft"


class _OldPolicyCallback(TrainerCallback):
    """Builds the old policy once the model is placed and soft-updates it after each rollout batch's last optimizer
    step, before that step's checkpoint."""

    def __init__(self, trainer: NFTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._setup_old_policy()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.num_iterations == 0:
            self.trainer.old_policy.update(self.trainer.old_policy_decay(state.global_step))


class NFTTrainer(OnlineTrainer):
    """DiffusionNFT, or AWM with `loss_type="awm"`, for flow-matching text-to-image models.

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the policy; a pipeline of a registered family is wrapped with
            `FlowPolicy.from_pipeline`. Its transformer is what trains.
        reward_funcs (a callable or a list of callables): rewards `fn(prompts, images, **columns) ->
            list[float | None]`, sync or async (see `rlhf_image.rewards.base`); `None` means "could not score"
            (the sample's advantage is 0: optimality 1/2 for DiffusionNFT, no weight for AWM).
        args ([`NFTConfig`], *optional*).
        train_dataset (`datasets.Dataset` or `list[dict]`): rows with a `prompt` column; the other columns are
            passed to the rewards as keyword lists.
        eval_dataset (same, *optional*): prompts scored by [`evaluate`] with deterministic (ODE) sampling.
        reward_weights (`list[float]`, *optional*): one weight per reward (or set `args.reward_weights`).
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter (the old policy is a copy of the adapter;
            the reference, with `beta > 0`, the adapter disabled). Without it the whole transformer trains.
        rollout_engine ([`RolloutEngine`], *optional*): where rollouts run; defaults to
            [`InProcessRolloutEngine`].
        callbacks (`list[TrainerCallback]`, *optional*).

    Logged besides [`OnlineTrainer`]'s metrics: `loss/policy`, and with `"nft"` `loss/positive` and
    `loss/negative` (the two parts' per-sample errors `L(v+)`, `L(v-)`), `optimality/{mean,min,max}`,
    `old_deviation` (`mean (v - v_old)^2`) and `old_policy/decay`; with `"awm"` `loss/error` (the weighted matching
    error); `kl` (`mean (v - v_ref)^2`) when `beta > 0`; the Trainer's `loss` and `grad_norm`; the non-finite guard's
    `nonfinite/*`.
    """

    config_class = NFTConfig
    method_name = "DiffusionNFT"

    def __init__(
        self,
        model: FlowPolicy | Any,
        reward_funcs: Callable | Sequence[Callable],
        args: NFTConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        reward_weights: Sequence[float] | None = None,
        peft_config: Any = None,
        rollout_engine: RolloutEngine | None = None,
        callbacks: list[TrainerCallback] | None = None,
    ):
        args = self.check_args(args if args is not None else NFTConfig(output_dir="nft-output"))
        if args.loss_type == "awm":
            self.method_name = "AWM"
        super().__init__(model, reward_funcs, args, train_dataset, eval_dataset, reward_weights=reward_weights,
                         peft_config=peft_config, rollout_engine=rollout_engine, callbacks=callbacks,
                         needs_reference=args.beta > 0)
        self.old_policy: EMAModel | None = None
        if args.loss_type == "nft":
            self.add_callback(_OldPolicyCallback(self))

    # --- the old policy --------------------------------------------------------------------------
    def _setup_old_policy(self) -> None:
        """Build [`old_policy`] as a copy of the trained weights (restored from `resume_checkpoint` on resume)."""
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        self.old_policy = EMAModel(named, decay=0.0)
        if self.resume_checkpoint is not None:
            self.load_averaged_weights(self.old_policy, OLD_POLICY_FILE, self.resume_checkpoint)

    def old_policy_decay(self, step: int) -> float:
        """The soft-update decay after optimizer step `step` ([`~rlhf_image.nft.old_policy_decay`])."""
        args = self.args
        decay = old_policy_decay(step, rate=args.old_policy_decay_rate, max_decay=args.old_policy_max_decay,
                                 flat_steps=args.old_policy_flat_steps)
        self.record_metrics({"old_policy/decay": decay})
        return decay

    def rollout_weights(self):
        # DiffusionNFT collects data with the old policy (Algorithm 1); AWM samples on-policy.
        return self.old_policy.applied() if self.old_policy is not None else nullcontext()

    def checkpoint_files(self) -> list[str]:
        files = super().checkpoint_files()
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if self.args.loss_type == "nft" and not zero3:  # under ZeRO-3 every rank has its own file
            files.append(OLD_POLICY_FILE)
        return files

    def save_extra_state(self, checkpoint_dir: str) -> None:
        super().save_extra_state(checkpoint_dir)
        if self.old_policy is not None:
            self.save_averaged_weights(self.old_policy, OLD_POLICY_FILE, checkpoint_dir)

    def zero_advantage_is_free(self) -> bool:
        # AWM's loss is A times an error; DiffusionNFT's at r = 1/2 still pulls v towards v_old.
        return self.args.loss_type == "awm" and self.args.beta == 0

    # --- loss ------------------------------------------------------------------------------------
    def train_sigmas(self, trajectory: Trajectory, generator: torch.Generator) -> torch.Tensor:
        """The noise levels a micro-batch trains on, `[num_train_timesteps, B]`: for DiffusionNFT distinct steps of
        the sampling schedule per sample, for AWM one per stratum, the same for every sample."""
        args = self.args
        if args.loss_type == "nft":
            return random_schedule_sigmas(trajectory.sigmas, len(trajectory), args.num_train_timesteps, generator)
        high = int(args.timestep_fraction * args.num_inference_steps)
        sigmas = stratified_schedule_sigmas(trajectory.sigmas, args.num_train_timesteps, 1, high, generator)
        return sigmas[:, None].expand(-1, len(trajectory))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over the micro-batch's noise levels of the DiffusionNFT (or AWM) loss plus `beta` times
        `mean (v - v_ref)^2`, with one backward per noise level
        ([`~rlhf_image.online_trainer.OnlineTrainer.backward_by_parts`])."""
        args = self.args
        if inputs.get("skip"):
            return self.skipped_micro_batch_loss(model)
        trajectory: Trajectory = inputs["trajectory"]
        # A / clip in [-1, 1]: AWM's weight, and r = (1 + a) / 2 for DiffusionNFT.
        normalized = (inputs["advantages"].float() / args.advantage_clip).clamp(-1.0, 1.0)
        # Keyed by the samples the micro-batch holds, so 2 processes draw what 1 process accumulating both draws.
        micro_batch = self.args.process_index * self.args.gradient_accumulation_steps + inputs["micro_index"]
        generator = self.generator(Stream.NOISED_COPIES, self.state.global_step, micro_batch)
        sigmas = self.train_sigmas(trajectory, generator)
        x0 = trajectory.final_latents.float()
        stats: dict[str, list[torch.Tensor]] = {}

        def part_loss(k: int) -> torch.Tensor:
            sigma = sigmas[k].to(x0.device)
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            x_t, target = interpolate(x0, noise, sigma)
            loss, part = self._loss(model, trajectory, x_t, sigma, target, normalized)
            for key, value in part.items():
                stats.setdefault(key, []).append(value)
            return loss

        loss = self.backward_by_parts(model, len(sigmas), part_loss)
        values = {key: torch.cat(parts) for key, parts in stats.items()}
        metrics = {f"loss/{key}": value.mean() for key, value in values.items() if key in ("positive", "negative",
                                                                                           "error")}
        if "old_deviation" in values:
            metrics["old_deviation"] = values["old_deviation"].mean()
        if "kl" in values:
            metrics["kl"] = values["kl"].mean()
        if args.loss_type == "nft":
            r = 0.5 + 0.5 * normalized
            metrics.update({"optimality/mean": r.mean(), "optimality/min": r.min(), "optimality/max": r.max()})
        metrics["loss/policy"] = loss.detach()
        self.record_metrics(dict(zip(metrics, torch.stack(list(metrics.values())).tolist())))  # one device sync
        forwards = 3 + (1 if args.loss_type == "nft" else 0) + (1 if args.beta > 0 else 0)
        self.count_train_flops(trajectory, len(sigmas) * forwards)  # forward + backward = 3 forwards
        return loss

    def _loss(self, model, trajectory: Trajectory, x_t: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor,
              normalized: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss at one noise level per sample (`x_t`, `sigma` `[B]`, `target` `[B, ...]`) and its detached
        per-sample statistics `[B]`."""
        args = self.args
        cond = trajectory.cond
        if args.loss_type == "nft":
            # Before the trained forward: autograd must save the trained weights, not the swapped-in old ones.
            with torch.no_grad(), self.old_policy.applied(), self.accelerator.autocast():
                old_velocity = self.policy.predict_velocity(x_t, sigma, cond, transformer=model)
        velocity = self.policy.predict_velocity(x_t, sigma, cond, transformer=model)
        if args.loss_type == "nft":
            loss, stats = nft_loss(velocity, old_velocity, target, sigma, 0.5 + 0.5 * normalized, args.nft_beta,
                                   adaptive_weighting=args.adaptive_weighting, loss_scale=args.advantage_clip)
        else:
            loss, stats = awm_loss(velocity, target, sigma, normalized, args.awm_weighting, args.awm_ghuber_power)
        if args.beta > 0:
            with torch.no_grad(), self.reference_transformer() as reference:
                reference_velocity = self.policy.predict_velocity(x_t, sigma, cond, transformer=reference)
            kl = per_sample_mse(velocity, reference_velocity)
            loss = loss + args.beta * kl.mean()
            stats["kl"] = kl.detach()
        return loss, stats

    # --- model card ------------------------------------------------------------------------------
    def model_card_details(self) -> dict[str, object]:
        args = self.args
        details = {**super().model_card_details(), "loss": args.loss_type,
                   "trained noise levels per sample": args.num_train_timesteps, "beta (reference)": args.beta}
        if args.loss_type == "nft":
            details["nft beta"] = args.nft_beta
            details["old policy"] = (f"eta = min({args.old_policy_decay_rate:g} (step - "
                                     f"{args.old_policy_flat_steps}), {args.old_policy_max_decay:g})")
        else:
            details["AWM weighting"] = args.awm_weighting
        return details
