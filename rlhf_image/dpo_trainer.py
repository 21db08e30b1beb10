"""`DPOTrainer`: Flow-DPO (Diffusion-DPO on velocity errors) for flow-matching text-to-image models, with the
Diffusion-SDPO safeguard, on top of `transformers.Trainer`.

The `transformers.Trainer` model is the policy's transformer (peft-wrapped with LoRA), so DeepSpeed ZeRO,
gradient accumulation, `report_to="wandb"`, checkpoints and `resume_from_checkpoint` work as for any trainer.
A training step: encode the chosen and rejected images (VAE, or given latents) and the prompt; draw one
sigma and one noise per pair and noise both images with them ([`~rlhf_image.losses.interpolate`]); run winner and
loser through the transformer as one batch of `2B` rows (the conditioning repeated), and the reference on the
same batch; the loss is [`~rlhf_image.losses.dpo_loss`] of the per-sample velocity errors.

Determinism: sigmas, noise and prompt dropout come from a generator seeded by the global micro-batch number
(`rlhf_image.fm_trainer.noise_seed`), not from the global RNG, so a resumed run draws exactly what an
uninterrupted one draws.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .dpo_config import DPOConfig
from .fm_trainer import EVAL_STREAM, TRAIN_STREAM, noise_seed
from .losses import dpo_loss, interpolate, per_sample_mse
from .model_io import frozen_copy, is_lora, prepare_transformer, reference_policy, save_trained, write_model_card
from .policy import Conditioning, FlowPolicy
from .preference_data import PairEncoder, PreferencePairDataset, collate_pairs
from .schedule import calculate_shift, sample_training_sigmas
from .sdpo import output_space_loser_scale, parameter_space_loser_scale, scale_gradient


class DPOTrainer(Trainer):
    """Flow-DPO trainer (trl's `DPOTrainer` shape) for flow-matching text-to-image models.

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the policy to tune (its transformer trains; VAE and text
            encoders stay frozen). A pipeline is wrapped with [`FlowPolicy.from_pipeline`].
        ref_model ([`FlowPolicy`] or `torch.nn.Module`, *optional*): the reference (a policy or its transformer).
            Defaults to the policy with its LoRA adapter disabled when `peft_config` is given, else to a frozen
            copy of the transformer made here. Must be `None` with `peft_config`.
        args ([`DPOConfig`], *optional*): defaults to `DPOConfig(output_dir="dpo-output")`.
        train_dataset, eval_dataset: pair rows `{"prompt", "chosen", "rejected"}` (images as paths, PIL images,
            bytes or latents `[C, h, w]`; see `rlhf_image.preference_data`), or the path of a folder written by
            [`~rlhf_image.pair_builder.build_preference_pairs`].
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter on the transformer.
        callbacks (`list[TrainerCallback]`, *optional*), optimizers (`tuple`, *optional*): as for `Trainer`.
    """

    def __init__(
        self,
        model: FlowPolicy | Any,
        ref_model: FlowPolicy | torch.nn.Module | None = None,
        args: DPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        args = args if args is not None else DPOConfig(output_dir="dpo-output")
        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a DPOConfig, got {type(args).__name__}")
        policy = model if isinstance(model, FlowPolicy) else FlowPolicy.from_pipeline(model)
        unit = policy.vae_scale_factor * policy.latent_patch
        for name, pixels in zip(("height", "width"), args.image_size):
            if pixels % unit:
                raise ValueError(f"DPOConfig image {name} {pixels} (from `{name}` or `resolution`) is not a multiple "
                                 f"of this model's pixel unit {unit} (VAE factor x patch); use "
                                 f"{max(unit, pixels // unit * unit)}")
        if peft_config is not None and ref_model is not None:
            raise ValueError("with peft_config the reference is the policy with its adapter disabled: pass "
                             "ref_model=None")
        policy.to(device=args.device)
        policy.transformer = prepare_transformer(policy.transformer, peft_config)
        self.policy = policy
        self.reference_transformer = None
        if not is_lora(policy.transformer):
            if ref_model is None:
                self.reference_transformer = frozen_copy(policy.transformer)
            else:
                reference = ref_model.transformer if isinstance(ref_model, FlowPolicy) else ref_model
                self.reference_transformer = reference.requires_grad_(False).eval().to(args.device)
        if isinstance(train_dataset, (str, os.PathLike)):
            train_dataset = PreferencePairDataset(train_dataset)
        if isinstance(eval_dataset, (str, os.PathLike)):
            eval_dataset = PreferencePairDataset(eval_dataset)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None and len(dataset) == 0:
                raise ValueError(f"{name} is empty")
        self.encoder = PairEncoder(policy, args.image_size, args.encode_batch_size or args.per_device_train_batch_size,
                                   cache_latents=args.cache_latents, cache_text=args.cache_text_embeddings,
                                   cache_dir=args.cache_dir)
        self._empty_cond = policy.encode_prompt([policy.negative_prompt]) if args.cfg_dropout_prob > 0 else None

        super().__init__(model=policy.transformer, args=args, data_collator=collate_pairs,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks,
                         optimizers=optimizers)
        # The loss is a mean over pairs, not a token sum: the Trainer must divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list),
                                                                   "eval": defaultdict(list)}
        self._draw_step, self._draw_micro, self._eval_draws = -1, 0, 0

    # --- randomness ----------------------------------------------------------------------------
    def _generator(self, mode: str) -> torch.Generator:
        """The generator of this micro-batch's sigmas, noise and prompt dropout, seeded (as the flow-matching
        trainer does) by the global micro-batch number `(step * accumulation + micro) * world + rank`, so that a
        resumed run draws exactly what an uninterrupted one draws."""
        args = self.args
        if mode == "train":
            if self.state.global_step != self._draw_step:
                self._draw_step, self._draw_micro = self.state.global_step, 0
            index = ((self._draw_step * args.gradient_accumulation_steps + self._draw_micro) * args.world_size
                     + args.process_index)
            self._draw_micro += 1
            return torch.Generator("cpu").manual_seed(noise_seed(args.seed, TRAIN_STREAM, index))
        index = self._eval_draws * args.world_size + args.process_index
        self._eval_draws += 1
        return torch.Generator("cpu").manual_seed(noise_seed(args.seed, EVAL_STREAM, index))

    def _sample_sigmas(self, batch_size: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Training sigmas `[B]` for latents of `height x width` (shifted as `DPOConfig.timestep_shift` says)."""
        config, shift = self.policy.scheduler_config, self.args.timestep_shift
        mu = static = None
        if shift == "resolution":
            image_seq_len = (height // self.policy.latent_patch) * (width // self.policy.latent_patch)
            mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
        elif shift == "static":
            static = config.get("shift", 1.0)
        return sample_training_sigmas(batch_size, self.args.timestep_sampling, logit_mean=self.args.logit_mean,
                                      logit_std=self.args.logit_std, mu=mu, shift=static, generator=generator)

    # --- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """Flow-DPO loss of one micro-batch of `B` pairs; records the metrics logged at the next `log`."""
        mode = "train" if model.training else "eval"
        args = self.args
        chosen = self.encoder.latents(inputs["chosen"])
        rejected = self.encoder.latents(inputs["rejected"])
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen latents {tuple(chosen.shape)} and rejected latents {tuple(rejected.shape)} "
                             "differ: the chosen and rejected images of a batch must have one size")
        cond = self.encoder.batch_conditioning(inputs)
        num_pairs, _, height, width = chosen.shape
        generator = self._generator(mode)
        if args.cfg_dropout_prob > 0:
            dropped = (torch.rand(num_pairs, generator=generator) < args.cfg_dropout_prob).tolist()
            cond = Conditioning.cat([self._empty_cond if d else cond.select([i]) for i, d in enumerate(dropped)])
        sigma = self._sample_sigmas(num_pairs, height, width, generator)
        noise = torch.randn(chosen.shape, generator=generator, dtype=torch.float32)
        # Winner and loser share noise and sigma, and go through the transformer as one batch of 2B rows.
        device = chosen.device
        sigma2 = torch.cat([sigma, sigma]).to(device)
        x_t, target = interpolate(torch.cat([chosen, rejected]), torch.cat([noise, noise]).to(device), sigma2)
        cond = Conditioning.cat([cond, cond])

        # Through the wrapper (DDP, DeepSpeed) when there is one, so that gradients are synchronised.
        policy = self.policy
        if model is not self.model:
            policy = copy.copy(self.policy)
            policy.transformer = model
        velocity = policy.predict_velocity(x_t, sigma2, cond)
        with torch.no_grad(), reference_policy(self.policy, self.reference_transformer) as reference:
            ref_velocity = reference.predict_velocity(x_t, sigma2, cond)
        err_w, err_l = per_sample_mse(velocity, target).chunk(2)
        ref_w, ref_l = per_sample_mse(ref_velocity, target).chunk(2)

        scale = None
        if args.sdpo:
            sdpo_kwargs = dict(mu=args.sdpo_mu, lambda_min=args.sdpo_lambda_min, lambda_max=args.sdpo_lambda_max,
                               eps=args.sdpo_eps)
            # Evaluation has no parameter gradients: it logs the output-space scale.
            if args.sdpo_space == "parameter" and torch.is_grad_enabled():
                params = [p for p in model.parameters() if p.requires_grad]
                scale = parameter_space_loser_scale(err_w, err_l, params, **sdpo_kwargs)
            else:
                (v_w, v_l), (u_w, u_l) = velocity.detach().chunk(2), target.chunk(2)
                scale = output_space_loser_scale(v_w, u_w, v_l, u_l, **sdpo_kwargs)
            err_l = scale_gradient(err_l, scale)
        loss, margin = dpo_loss(err_w, err_l, ref_w, ref_l, args.beta)

        record = {
            "dpo_loss": loss.detach(),
            "rewards/accuracy": (margin > 0).float(),
            "rewards/margin": margin.detach(),
            "rewards/chosen": -0.5 * args.beta * (err_w - ref_w).detach(),
            "rewards/rejected": -0.5 * args.beta * (err_l - ref_l).detach(),
            "error/policy_chosen": err_w.detach(),
            "error/policy_rejected": err_l.detach(),
            "error/ref_chosen": ref_w,
            "error/ref_rejected": ref_l,
            "sigma": sigma,
        }
        if scale is not None:
            record["sdpo/lambda"] = scale
        # One gather and one device sync for all metrics (ranks hold equal micro-batches: mean of means).
        local = torch.stack([value.detach().float().mean().to(device) for value in record.values()])
        gathered = self.accelerator.gather(local[None]).reshape(-1, len(record)).mean(dim=0)
        for key, value in zip(record, gathered.tolist()):
            self._metrics[mode][key].append(value)
        return (loss, {"margin": margin.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        self._eval_draws = 0  # every evaluation draws the same sigmas and noise
        return super().evaluate(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)  # in place, so that `evaluate()` also returns them
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # --- saving --------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (`_internal_call`) keep the Trainer's layout, which resumes. A user's call writes what
        stock diffusers loads (see `rlhf_image.model_io`) and a model card."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = self.accelerator.get_state_dict(self.deepspeed) if self.is_deepspeed_enabled else None
        if not self.args.should_save:
            return
        lora = save_trained(self.model, output_dir, state_dict)
        args = self.args
        details = {"beta": args.beta, "steps": self.state.global_step, "image size": "x".join(map(str, args.image_size)),
                   "timesteps": f"{args.timestep_sampling}, shift {args.timestep_shift}",
                   "SDPO safeguard": f"{args.sdpo_space} space, mu {args.sdpo_mu}" if args.sdpo else "off",
                   "learning rate": args.learning_rate}
        last = next((entry for entry in reversed(self.state.log_history) if "dpo_loss" in entry), {})
        metrics = {key: value for key, value in last.items() if key.startswith(("dpo_loss", "rewards/"))}
        write_model_card(output_dir, method="DPO", base_model=self.policy.base_model_name_or_path, lora=lora,
                         details=details, metrics=metrics)
