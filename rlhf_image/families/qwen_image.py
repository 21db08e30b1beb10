"""Qwen-Image (`QwenImagePipeline`): `QwenImageTransformer2DModel` on 2x2-packed latents of the single-frame video
VAE `AutoencoderKLQwenImage`, a `Qwen2_5_VLForConditionalGeneration` text encoder with an attention mask, and true
CFG rescaled to the conditional prediction's norm."""

from __future__ import annotations

import torch

from ..policy import Conditioning, FlowPolicy, pack_latents, pad_to_length, unpack_latents


class QwenImagePolicy(FlowPolicy):
    """Qwen-Image. Text is encoded by the pipeline's own `encode_prompt` (the prompt in its template, last hidden
    states with the template prefix dropped) and padded to `max_sequence_length` with a mask (the transformer masks
    the padding). CFG is the pipeline's: `v_neg + g (v - v_neg)` rescaled token by token to the norm of `v`.

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 512): text tokens (the pipeline's truncation length).
        distilled_guidance_scale (`float`, *optional*): the guidance embedding's value for guidance-distilled
            transformers (`guidance_embeds=True`; the pipeline's `guidance_scale`).
        negative_prompt (`str`, defaults to `""`), batched_cfg (`bool`, *optional*).
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 512,
                 distilled_guidance_scale: float | None = None, negative_prompt: str = "",
                 batched_cfg: bool | None = None):
        from diffusers import QwenImagePipeline

        self.text_pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                           tokenizer=tokenizer, transformer=transformer)
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        if self.guidance_embeds and distilled_guidance_scale is None:
            raise ValueError("this Qwen-Image transformer is guidance-distilled: pass distilled_guidance_scale")
        self.distilled_guidance_scale = distilled_guidance_scale
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder]

    def _vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def num_latent_channels(self) -> int:
        return self.vae.config.z_dim

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.text_pipe.encode_prompt(prompts, device=self.text_encoder.device,
                                                    max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        cond = Conditioning(embeds, attention_mask=mask.long())
        return pad_to_length(cond, self.max_sequence_length).to(self.device)

    def forward(self, transformer, latents, sigma, cond):
        b, _, h, w = latents.shape
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.distilled_guidance_scale, device=latents.device, dtype=torch.float32)
        velocity = transformer(
            hidden_states=pack_latents(latents),
            timestep=sigma.to(self.dtype),
            guidance=guidance,
            encoder_hidden_states_mask=cond.attention_mask.to(latents.device),
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(velocity, h, w)

    def guide(self, velocity, negative_velocity, guidance_scale):
        h, w = velocity.shape[2:]
        cond, neg = pack_latents(velocity), pack_latents(negative_velocity)
        combined = neg + guidance_scale * (cond - neg)
        combined = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return unpack_latents(combined, h, w)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel mean and the reciprocal of its std, `[1, C, 1, h, w]`-broadcastable."""
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(next(self.vae.parameters()).dtype).unsqueeze(2)  # one frame
        mean, inv_std = self._latent_stats(latents)
        images = self.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(self._vae_input(images).unsqueeze(2)).latent_dist
        latents = dist.sample(generator) if generator is not None else dist.mode()
        mean, inv_std = self._latent_stats(latents)
        return ((latents - mean) * inv_std)[:, :, 0].float()
