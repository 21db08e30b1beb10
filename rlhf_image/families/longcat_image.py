"""LongCat-Image (`LongCatImagePipeline`): `LongCatImageTransformer2DModel` (FLUX-style MMDiT) on 2x2-packed
16-channel latents, a `Qwen2_5_VLForConditionalGeneration` text encoder with quoted text tokenised character by
character, true CFG with the pipeline's clamped renormalisation."""

from __future__ import annotations

import torch

from ..policy import Conditioning, FlowPolicy, pack_latents, unpack_latents


class LongCatImagePolicy(FlowPolicy):
    """LongCat-Image. Text is encoded by the pipeline's own `encode_prompt` at `max_sequence_length` tokens (the
    pipeline's `tokenizer_max_length`, 512, which also offsets the image positions); CFG is the pipeline's default
    (`enable_cfg_renorm=True`, `cfg_renorm_min=0`): `v_neg + g (v - v_neg)` scaled token by token by
    `clamp(|v| / (|combined| + 1e-8), cfg_renorm_min, 1)`. Prompts are encoded as given: the pipeline's default
    `enable_prompt_rewrite=True` first rewrites each prompt with the text encoder's language model, a preprocessing
    of the prompts (apply it to a dataset before training if wanted), not part of the policy.

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components (`text_processor`, only used
            by the pipeline's prompt rewriting, is not needed).
        max_sequence_length (`int`, defaults to 512): must equal the pipeline's `tokenizer_max_length` to sample what
            the pipeline samples.
        enable_cfg_renorm (`bool`, defaults to `True`), cfg_renorm_min (`float`, defaults to 0.0).
        negative_prompt (`str`, defaults to `""`), batched_cfg (`bool`, *optional*).
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 512,
                 enable_cfg_renorm: bool = True, cfg_renorm_min: float = 0.0, negative_prompt: str = "",
                 batched_cfg: bool | None = None):
        from diffusers import LongCatImagePipeline

        self.text_pipe = LongCatImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                              tokenizer=tokenizer, text_processor=None, transformer=transformer)
        self.text_pipe.tokenizer_max_length = max_sequence_length
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length
        self.enable_cfg_renorm, self.cfg_renorm_min = enable_cfg_renorm, cfg_renorm_min
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, text_ids = self.text_pipe.encode_prompt(prompt=list(prompts))
        text_ids = text_ids.unsqueeze(0).expand(len(prompts), -1, -1)
        return Conditioning(embeds, text_ids=text_ids).to(self.device)

    def forward(self, transformer, latents, sigma, cond):
        from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

        _, _, h, w = latents.shape
        start = (self.max_sequence_length, self.max_sequence_length)
        image_ids = prepare_pos_ids(modality_id=1, type="image", start=start, height=h // 2, width=w // 2)
        velocity = transformer(
            hidden_states=pack_latents(latents),
            timestep=sigma.to(self.dtype),
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            txt_ids=cond.text_ids[0].to(latents.device),
            img_ids=image_ids.to(latents.device),
            return_dict=False,
        )[0]
        return unpack_latents(velocity, h, w)

    def guide(self, velocity, negative_velocity, guidance_scale):
        h, w = velocity.shape[2:]
        cond, neg = pack_latents(velocity), pack_latents(negative_velocity)
        combined = neg + guidance_scale * (cond - neg)
        if self.enable_cfg_renorm:
            scale = torch.norm(cond, dim=-1, keepdim=True) / (torch.norm(combined, dim=-1, keepdim=True) + 1e-8)
            combined = combined * scale.clamp(min=self.cfg_renorm_min, max=1.0)
        return unpack_latents(combined, h, w)
