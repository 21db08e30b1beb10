"""`DPOTrainer`: Flow-DPO (Diffusion-DPO on velocity errors) for flow-matching text-to-image models, with the
Diffusion-SDPO safeguard, on [`~rlhf_image.base_trainer.BaseTrainer`].

A training step: encode the chosen and rejected images (VAE, or given latents) and the prompt; draw one
sigma and one noise per pair and noise both images with them ([`~rlhf_image.losses.interpolate`]); run winner and
loser through the transformer as one batch of `2B` rows (the conditioning repeated), and the reference on the
same batch; the loss is [`~rlhf_image.losses.dpo_loss`] of the per-sample velocity errors.

Determinism: a training micro-batch draws, in order, its CFG-dropout uniforms `[B]`, sigmas `[B]` and noise from a
generator seeded by its global micro-batch number (`rlhf_image.seeding.Stream.MICRO_BATCH`), an evaluation batch
from one seeded by its number in the evaluation (`Stream.EVALUATION`): a resumed run draws exactly what an
uninterrupted one draws, and every evaluation draws the same.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

from .base_trainer import BaseTrainer, describe_sizes
from .dpo_config import DPOConfig
from .encoders import FrozenEncoders, cfg_dropout
from .losses import dpo_loss, interpolate, per_sample_mse
from .policy import Conditioning, FlowPolicy
from .preference_data import PreferencePairDataset, collate_pairs
from .schedule import sample_training_sigmas, shift_training_sigmas
from .sdpo import output_space_loser_scale, parameter_space_loser_scale, scale_gradient
from .seeding import Stream


class DPOTrainer(BaseTrainer):
    """Flow-DPO trainer (trl's `DPOTrainer` shape) for flow-matching text-to-image models.

    Args:
        model ([`FlowPolicy`] or a diffusers pipeline): the policy to tune (its transformer trains; VAE and text
            encoders stay frozen). A pipeline is wrapped with [`FlowPolicy.from_pipeline`].
        ref_model ([`FlowPolicy`] or `torch.nn.Module`, *optional*): the reference (a policy or its transformer).
            Defaults to the policy with its LoRA adapter disabled when `peft_config` is given, else to a frozen
            copy of the transformer made here. Must be `None` with `peft_config`.
        args ([`DPOConfig`], *optional*): defaults to `DPOConfig(output_dir="dpo-output")`.
        train_dataset, eval_dataset: pair rows `{"prompt", "chosen", "rejected"}` (images as paths, PIL images,
            arrays, bytes or latents `[C, h, w]`; see `rlhf_image.preference_data`), or the path of a folder written
            by [`~rlhf_image.pair_builder.build_preference_pairs`].
        peft_config (`peft.LoraConfig`, *optional*): train a LoRA adapter on the transformer.
        callbacks (`list[TrainerCallback]`, *optional*), optimizers (`tuple`, *optional*): as for `Trainer`.

    Logged: `dpo_loss`, `rewards/{accuracy,margin,chosen,rejected}`, the four errors `error/{policy,ref}_{chosen,
    rejected}`, `sigma`, `sdpo/lambda` (with `sdpo`), and the base trainer's `nonfinite/*`.
    """

    config_class = DPOConfig
    method_name = "DPO"
    required_columns = ("prompt", "chosen", "rejected")
    image_columns = ("chosen", "rejected")

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
        if isinstance(train_dataset, (str, os.PathLike)):
            train_dataset = PreferencePairDataset(train_dataset)
        if isinstance(eval_dataset, (str, os.PathLike)):
            eval_dataset = PreferencePairDataset(eval_dataset)
        self.check_args(args)
        reference_dtype = torch.bfloat16 if args.reference_dtype == "bfloat16" else None  # None: as the policy
        super().__init__(model, args, train_dataset, eval_dataset, peft_config=peft_config, ref_model=ref_model,
                         needs_reference=True, reference_dtype=reference_dtype, data_collator=collate_pairs,
                         callbacks=callbacks, optimizers=optimizers)
        self.encoders = FrozenEncoders(self.policy, args.encoder_batch_size, cache_latents=args.cache_latents,
                                       cache_text=args.cache_text_embeddings, cache_dir=args.cache_dir)
        self._eval_batches = 0

    # --- loss ----------------------------------------------------------------------------------
    def _conditioning(self, inputs: dict[str, Any], generator: torch.Generator) -> Conditioning:
        """The text conditioning of a collated batch after CFG dropout: its precomputed embeddings (dropped rows
        encoded from the negative prompt) or the encoded prompts."""
        prompts = list(inputs["prompt"])
        used, dropped = cfg_dropout(prompts, self.args.cfg_dropout_prob, self.policy.negative_prompt, generator)
        if "prompt_embeds" not in inputs:
            return self.encoders.conditioning(used, also_cache=prompts)
        device = self.policy.device
        pooled = inputs.get("pooled_prompt_embeds")
        given = Conditioning(inputs["prompt_embeds"].to(device), None if pooled is None else pooled.to(device))
        if not any(dropped):
            return given
        negative = self.encoders.conditioning([self.policy.negative_prompt])
        return Conditioning.cat([negative if drop else given.select([i]) for i, drop in enumerate(dropped)])

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """Flow-DPO loss of one micro-batch of `B` pairs; records the metrics logged at the next `log`."""
        mode = "train" if model.training else "eval"
        args = self.args
        if mode == "train":
            generator = self.generator(Stream.MICRO_BATCH, self.global_micro_batch)
        else:
            generator = self.generator(Stream.EVALUATION, self._eval_batches * args.world_size + args.process_index)
            self._eval_batches += 1
        chosen = self.encoders.source_latents(inputs["chosen"], args.image_size)
        rejected = self.encoders.source_latents(inputs["rejected"], args.image_size)
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen latents {tuple(chosen.shape)} and rejected latents {tuple(rejected.shape)} "
                             "differ: the chosen and rejected images of a batch must have one size")
        num_pairs, _, height, width = chosen.shape
        cond = self._conditioning(inputs, generator)
        sigma = sample_training_sigmas(num_pairs, args.timestep_sampling, logit_mean=args.logit_mean,
                                       logit_std=args.logit_std, generator=generator)
        image_seq_len = (height // self.policy.latent_patch) * (width // self.policy.latent_patch)
        sigma = shift_training_sigmas(sigma, image_seq_len, self.policy.scheduler_config, args.timestep_shift)
        noise = torch.randn(chosen.shape, generator=generator, dtype=torch.float32)
        # Winner and loser share noise and sigma, and go through the transformer as one batch of 2B rows.
        device = chosen.device
        sigma2 = torch.cat([sigma, sigma]).to(device)
        x_t, target = interpolate(torch.cat([chosen, rejected]), torch.cat([noise, noise]).to(device), sigma2)
        cond = Conditioning.cat([cond, cond])

        # Through the wrapper (DDP, DeepSpeed) that the Trainer hands us, so gradients are synchronised.
        velocity = self.policy.predict_velocity(x_t, sigma2, cond, transformer=model)
        with torch.no_grad(), self.reference_transformer() as reference:
            ref_velocity = self.policy.predict_velocity(x_t, sigma2, cond, transformer=reference)
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
        self.record_metrics(dict(zip(record, gathered.tolist())), mode)
        return (loss, {"margin": margin.detach()}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        self._eval_batches = 0  # every evaluation draws the same sigmas and noise
        with self.saved_weights():  # the EMA, when enabled
            return super().evaluate(*args, **kwargs)

    # --- model card ----------------------------------------------------------------------------
    def model_card_details(self) -> dict[str, object]:
        args = self.args
        return {**super().model_card_details(), "beta": args.beta, "image size": describe_sizes([args.image_size]),
                "timesteps": f"{args.timestep_sampling}, shift {args.timestep_shift}",
                "SDPO safeguard": f"{args.sdpo_space} space, mu {args.sdpo_mu}" if args.sdpo else "off",
                "CFG dropout": args.cfg_dropout_prob}

    def card_metric(self, key: str) -> bool:
        return key == "dpo_loss" or key.startswith("rewards/")
