"""FLUX.2 (`Flux2Pipeline`, Mistral-3 text encoder, guidance embedding) and FLUX.2-Klein (`Flux2KleinPipeline`, Qwen3
text encoder, true CFG): `Flux2Transformer2DModel` on 2x2-patchified, batch-normed latents of `AutoencoderKLFlux2`.

The policy's latents are the pipeline's own pre-packing layout `[B, 4C, h/2, w/2]` (one token per cell), normalised
by the VAE's batch-norm statistics, so a cell is `2 * vae_scale_factor` pixels wide.
"""

from __future__ import annotations

import numpy as np
import torch

from ..policy import Conditioning, FlowPolicy
from ..schedule import scheduler_sigmas


class _Flux2Base(FlowPolicy):
    latent_patch = 1  # the latents are already 2x2-patchified: one token per cell
    text_encoder_out_layers: tuple[int, ...] = ()

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 512,
                 text_encoder_out_layers: tuple[int, ...] | None = None, negative_prompt: str = "",
                 batched_cfg: bool | None = None):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.max_sequence_length = max_sequence_length
        if text_encoder_out_layers is not None:
            self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder]

    def _vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * 2

    @property
    def num_latent_channels(self) -> int:
        return self.vae.config.latent_channels * 4

    def _text_states(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        from diffusers import Flux2Pipeline

        embeds = self._text_states(prompts)  # padded to max_sequence_length by the tokenizer
        return Conditioning(embeds.to(self.device), text_ids=Flux2Pipeline._prepare_text_ids(embeds).to(self.device))

    def forward(self, transformer, latents, sigma, cond):
        from diffusers import Flux2Pipeline

        b, c, h, w = latents.shape
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.distilled_guidance_scale, device=latents.device, dtype=torch.float32)
        velocity = transformer(
            hidden_states=latents.reshape(b, c, h * w).permute(0, 2, 1),
            timestep=sigma.to(self.dtype),
            guidance=guidance,
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            txt_ids=cond.text_ids.to(latents.device),
            img_ids=Flux2Pipeline._prepare_latent_ids(latents).to(latents.device),
            return_dict=False,
        )[0]
        return velocity.permute(0, 2, 1).reshape(b, c, h, w)

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """`linspace(1, 1/N, N)` (none under `use_flow_sigmas`) and FLUX.2's empirical `mu`, which depends on the
        number of steps as well as on the image tokens."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        sigmas = None if self.scheduler_config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = compute_empirical_mu(image_seq_len=self.image_seq_len(height, width), num_steps=num_steps)
        return scheduler_sigmas(self.scheduler_config, num_steps, sigmas=sigmas, mu=mu)

    def _batch_norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        mean, std = self._batch_norm(latents)
        latents = Flux2Pipeline._unpatchify_latents(latents * std + mean)
        images = self.vae.decode(latents.to(next(self.vae.parameters()).dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images, generator: torch.Generator | None = None) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        dist = self.vae.encode(self._vae_input(images)).latent_dist
        latents = Flux2Pipeline._patchify_latents(dist.sample(generator) if generator is not None else dist.mode())
        mean, std = self._batch_norm(latents)
        return ((latents - mean) / std).float()


class Flux2Policy(_Flux2Base):
    """FLUX.2 [dev]: a `Mistral3ForConditionalGeneration` text encoder (hidden states of layers 10, 20 and 30 of the
    prompt in its chat template with the FLUX.2 system message, padded to `max_sequence_length`), a guidance
    embedding fed `distilled_guidance_scale` (the pipeline's `guidance_scale`, default 4) and no true CFG in the
    pipeline (`guidance_scale > 1` here adds true CFG against the negative prompt).

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 512).
        text_encoder_out_layers (`tuple[int]`, *optional*): defaults to `(10, 20, 30)`, as the pipeline.
        distilled_guidance_scale (`float`, defaults to 4.0).
        negative_prompt (`str`, defaults to `""`), batched_cfg (`bool`, *optional*).
    """

    text_encoder_out_layers = (10, 20, 30)

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 512,
                 text_encoder_out_layers: tuple[int, ...] | None = None, distilled_guidance_scale: float = 4.0,
                 negative_prompt: str = "", batched_cfg: bool | None = None):
        self.distilled_guidance_scale = distilled_guidance_scale
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length,
                         text_encoder_out_layers, negative_prompt, batched_cfg)

    def _text_states(self, prompts: list[str]) -> torch.Tensor:
        from diffusers import Flux2Pipeline
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, max_sequence_length=self.max_sequence_length,
            system_message=SYSTEM_MESSAGE, hidden_states_layers=self.text_encoder_out_layers)


class Flux2KleinPolicy(_Flux2Base):
    """FLUX.2 [klein]: a `Qwen3ForCausalLM` text encoder (hidden states of layers 9, 18 and 27 of the prompt in its
    chat template, padded to `max_sequence_length`), no guidance embedding, true CFG in two calls as the pipeline
    does (the pipeline skips CFG for its step-distilled checkpoints: use `guidance_scale=1` for those).

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 512).
        text_encoder_out_layers (`tuple[int]`, *optional*): defaults to `(9, 18, 27)`, as the pipeline.
        negative_prompt (`str`, defaults to `""`), batched_cfg (`bool`, *optional*).
    """

    text_encoder_out_layers = (9, 18, 27)
    distilled_guidance_scale = None

    def _text_states(self, prompts: list[str]) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            self.text_encoder, self.tokenizer, prompts, max_sequence_length=self.max_sequence_length,
            hidden_states_layers=self.text_encoder_out_layers)
