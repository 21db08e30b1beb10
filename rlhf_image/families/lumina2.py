"""Lumina-Image 2.0 (`Lumina2Pipeline`): `Lumina2Transformer2DModel` (a unified next-DiT) on unpacked latents, a
Gemma-2 text encoder with an attention mask and a system prompt, CFG rescaled to the conditional prediction's norm."""

from __future__ import annotations

import numpy as np
import torch

from ..policy import Conditioning, FlowPolicy
from ..schedule import calculate_shift, scheduler_sigmas


class Lumina2Policy(FlowPolicy):
    """Lumina-Image 2.0. The prompt is encoded after the pipeline's system prompt (`"<system> <Prompt Start>
    <prompt>"`, second-to-last Gemma-2 hidden states, padded to `max_sequence_length` and masked), the negative prompt
    without it, as the pipeline does. The transformer takes `1 - sigma` and predicts `x0 - eps`, so `forward` flips
    the sign. CFG is the pipeline's default (`cfg_normalization=True`): `v_neg + g (v - v_neg)` rescaled to the norm
    of `v` along the last axis; the pipeline's `cfg_trunc_ratio` is supported at its default 1 (no truncation).

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 256).
        system_prompt (`str`, *optional*): defaults to the pipeline's.
        cfg_normalization (`bool`, defaults to `True`).
        negative_prompt (`str`, defaults to `""`), batched_cfg (`bool`, *optional*).
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 256,
                 system_prompt: str | None = None, cfg_normalization: bool = True, negative_prompt: str = "",
                 batched_cfg: bool | None = None):
        from diffusers import Lumina2Pipeline

        self.text_pipe = Lumina2Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                         text_encoder=text_encoder, tokenizer=tokenizer)
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length
        self.system_prompt = self.text_pipe.system_prompt if system_prompt is None else system_prompt
        self.cfg_normalization = cfg_normalization
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder]

    def _encode(self, texts: list[str]) -> Conditioning:
        embeds, mask = self.text_pipe._get_gemma_prompt_embeds(prompt=texts, device=self.text_encoder.device,
                                                               max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, attention_mask=mask).to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        return self._encode([f"{self.system_prompt} <Prompt Start> {prompt}" for prompt in prompts])

    @torch.no_grad()
    def encode_negative_prompt(self, batch_size: int) -> Conditioning:
        return self._encode([self.negative_prompt]).select([0] * batch_size)

    def forward(self, transformer, latents, sigma, cond):
        timestep = 1 - sigma * 1000 / 1000  # the pipeline's 1 - t / num_train_timesteps
        out = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds.to(
            self.dtype), encoder_attention_mask=cond.attention_mask.to(latents.device), return_dict=False)[0]
        return -out

    def guide(self, velocity, negative_velocity, guidance_scale):
        combined = negative_velocity + guidance_scale * (velocity - negative_velocity)
        if self.cfg_normalization:
            combined = combined * (torch.norm(velocity, dim=-1, keepdim=True) /
                                   torch.norm(combined, dim=-1, keepdim=True))
        return combined

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """`linspace(1, 1/N, N)` and `mu = calculate_shift(latents.shape[1])`: the pipeline reads the sequence length
        from its unpacked latents' channel axis (so `mu` depends on the channels, not the resolution; it only acts
        under dynamic shifting, which Lumina-Image 2.0's scheduler does not use)."""
        config = self.scheduler_config
        mu = calculate_shift(self.num_latent_channels, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return scheduler_sigmas(config, num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
