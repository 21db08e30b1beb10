"""FLUX.1 (`FluxPipeline`): `FluxTransformer2DModel` on 2x2-packed latents, CLIP (pooled) + T5 (per-token) text
encoders. "dev" style: a distilled guidance embedding (`guidance_embeds=True`); "schnell" style: none. True CFG
(`FluxPipeline(true_cfg_scale=...)`) runs against the negative prompt."""

from __future__ import annotations

import torch

from ..policy import Conditioning, FlowPolicy, latent_image_ids, pack_latents, unpack_latents


class FluxPolicy(FlowPolicy):
    """FLUX.1 dev / schnell.

    Args:
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 512): T5 tokens (FLUX.1-schnell was trained with 256).
        distilled_guidance_scale (`float`, defaults to 3.5): the value fed to the guidance embedding (the pipeline's
            `guidance_scale`), if the transformer has one.
        negative_prompt (`str`, defaults to `""`).
        batched_cfg (`bool`, *optional*): see [`FlowPolicy`].
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler,
                 max_sequence_length: int = 512, distilled_guidance_scale: float = 3.5, negative_prompt: str = "",
                 batched_cfg: bool | None = None):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.distilled_guidance_scale = distilled_guidance_scale
        # Read once here: under DDP the trainer may hold a wrapper that has no `.config`.
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder, self.text_encoder_2]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return Conditioning(embeds.to(self.device), pooled.to(self.device))

    def forward(self, transformer, latents, sigma, cond):
        b, _, h, w = latents.shape
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.distilled_guidance_scale, device=latents.device, dtype=torch.float32)
        velocity = transformer(
            hidden_states=pack_latents(latents),
            timestep=sigma.to(self.dtype),
            guidance=guidance,
            pooled_projections=cond.pooled_prompt_embeds.to(self.dtype),
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=latents.device, dtype=self.dtype),
            img_ids=latent_image_ids(h, w, latents.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(velocity, h, w)
