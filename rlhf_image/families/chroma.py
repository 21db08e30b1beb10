"""Chroma (`ChromaPipeline`): `ChromaTransformer2DModel` (FLUX.1-schnell derived, modulation from a timestep
approximator, no pooled text) on 2x2-packed latents, a T5 text encoder with an attention mask, true CFG in two
calls."""

from __future__ import annotations

import torch

from ..policy import Conditioning, FlowPolicy, latent_image_ids, pack_latents, unpack_latents


class ChromaPolicy(FlowPolicy):
    """Chroma. Text is encoded by the pipeline's own T5 encoding (padded to `max_sequence_length`, every padding token
    but the first masked out, as Chroma requires); the transformer's joint attention mask is built as the pipeline
    builds it.

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 512).
        negative_prompt (`str`, defaults to `""`), batched_cfg (`bool`, *optional*).
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 512,
                 negative_prompt: str = "", batched_cfg: bool | None = None):
        from diffusers import ChromaPipeline

        self.text_pipe = ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                        transformer=transformer)
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.text_pipe._get_t5_prompt_embeds(prompt=list(prompts), device=self.text_encoder.device,
                                                            max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, attention_mask=mask).to(self.device)

    def forward(self, transformer, latents, sigma, cond):
        b, _, h, w = latents.shape
        mask = self.text_pipe._prepare_attention_mask(batch_size=b, sequence_length=(h // 2) * (w // 2),
                                                      dtype=latents.dtype,
                                                      attention_mask=cond.attention_mask.to(latents.device))
        velocity = transformer(
            hidden_states=pack_latents(latents),
            timestep=sigma.to(self.dtype),
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=latents.device, dtype=self.dtype),
            img_ids=latent_image_ids(h, w, latents.device, self.dtype),
            attention_mask=mask,
            return_dict=False,
        )[0]
        return unpack_latents(velocity, h, w)
