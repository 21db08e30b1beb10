"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): `SD3Transformer2DModel` (3.5: dual attention and qk-norm)
on unpacked latents, CLIP-L + CLIP-G (pooled and per-token) and T5 text encoders, CFG in one batched call."""

from __future__ import annotations

import torch

from ..policy import Conditioning, FlowPolicy
from ..schedule import calculate_shift, scheduler_sigmas


class SD3Policy(FlowPolicy):
    """SD3 / SD3.5. Text is encoded by the pipeline's own `encode_prompt` (CLIP states padded to the T5 width and
    concatenated with the T5 states; zeros when the pipeline has no T5).

    Args:
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3,
            scheduler: the pipeline's components (`text_encoder_3` / `tokenizer_3` may be `None`).
        max_sequence_length (`int`, defaults to 256): T5 tokens.
        negative_prompt (`str`, defaults to `""`).
        batched_cfg (`bool`, *optional*): see [`FlowPolicy`].
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler,
                 text_encoder_3=None, tokenizer_3=None, max_sequence_length: int = 256, negative_prompt: str = "",
                 batched_cfg: bool | None = None):
        from diffusers import StableDiffusion3Pipeline

        # The pipeline object only encodes text here; the transformer calls are this adapter's.
        self.text_pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3)
        self.text_encoders = [m for m in (text_encoder, text_encoder_2, text_encoder_3) if m is not None]
        self.max_sequence_length = max_sequence_length
        self.latent_patch = transformer.config.patch_size
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, *self.text_encoders]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.text_pipe.encode_prompt(
            prompts, prompts, prompts, device=self.text_encoders[0].device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds.to(self.device), pooled.to(self.device))

    def forward(self, transformer, latents, sigma, cond):
        return transformer(hidden_states=latents, timestep=sigma * 1000,  # SD3 takes t in [0, 1000]
                           encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
                           pooled_projections=cond.pooled_prompt_embeds.to(self.dtype), return_dict=False)[0]

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """SD3's pipeline passes no sigmas: the scheduler spaces timesteps between its shifted `sigma_max` and
        `sigma_min` (so 10 steps at shift 3 end at 0.0089, not at `shift(1/N)`); `mu` only under dynamic shifting."""
        config, mu = self.scheduler_config, None
        if config.get("use_dynamic_shifting"):
            mu = calculate_shift(self.image_seq_len(height, width), config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.16))
        return scheduler_sigmas(config, num_steps, mu=mu)
