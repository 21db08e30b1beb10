"""The diffusers families `FlowPolicy` adapts: Ovis-Image and FLUX.1."""

from __future__ import annotations

import torch

from .policy import Conditioning, FlowPolicy, latent_image_ids

OVIS_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships of "
    "the objects and background: "
)


class OvisImagePolicy(FlowPolicy):
    """Ovis-Image: `OvisImageTransformer2DModel`, a `Qwen3Model` text encoder whose final hidden states
    condition the decoder (prompt in the Ovis chat template, padded to `28 + max_sequence_length`
    tokens, masked, first 28 tokens dropped), FLUX `AutoencoderKL`.

    Args:
        transformer, vae, text_encoder, tokenizer: the pipeline's components.
        scheduler_config (`dict`): the scheduler's config.
        max_sequence_length (`int`, defaults to 256): text tokens after the dropped prefix.
        negative_prompt (`str`, defaults to `""`).
    """

    system_prompt = OVIS_SYSTEM_PROMPT
    user_prompt_begin_id = 28

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler_config: dict,
                 max_sequence_length: int = 256, negative_prompt: str = ""):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        super().__init__(transformer, vae, scheduler_config, negative_prompt)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        messages = [
            self.tokenizer.apply_chat_template([{"role": "user", "content": self.system_prompt + prompt}],
                                               tokenize=False, add_generation_prompt=True, enable_thinking=False)
            for prompt in prompts
        ]
        tokens = self.tokenizer(messages, padding="max_length", truncation=True, return_tensors="pt",
                                max_length=self.max_sequence_length + self.user_prompt_begin_id,
                                add_special_tokens=False)
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
        hidden = hidden * mask[..., None]
        return Conditioning(hidden[:, self.user_prompt_begin_id:].to(self.device))

    def _transformer_forward(self, transformer, tokens, sigma, cond, height, width):
        num_text = cond.prompt_embeds.shape[1]
        text_ids = torch.zeros(num_text, 3)
        text_ids[:, 1] = text_ids[:, 2] = torch.arange(num_text, dtype=torch.float32)
        return transformer(
            hidden_states=tokens,
            timestep=sigma,
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            txt_ids=text_ids.to(tokens.device, self.dtype),
            img_ids=latent_image_ids(height, width, tokens.device, self.dtype),
            return_dict=False,
        )[0]


class FluxPolicy(FlowPolicy):
    """FLUX.1: `FluxTransformer2DModel`, CLIP (pooled) + T5 (per-token) text encoders, FLUX VAE. True CFG
    uses the negative prompt; FLUX.1-dev's distilled guidance embedding gets `distilled_guidance_scale`.

    Args:
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2: the pipeline's components.
        scheduler_config (`dict`): the scheduler's config.
        max_sequence_length (`int`, defaults to 512): T5 tokens.
        distilled_guidance_scale (`float`, defaults to 3.5): value fed to the guidance embedding, if any.
        negative_prompt (`str`, defaults to `""`).
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler_config: dict, max_sequence_length: int = 512, distilled_guidance_scale: float = 3.5,
                 negative_prompt: str = ""):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.distilled_guidance_scale = distilled_guidance_scale
        # Read once here: under DDP the trainer may hold a wrapper that has no `.config`.
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        super().__init__(transformer, vae, scheduler_config, negative_prompt)

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

    def _transformer_forward(self, transformer, tokens, sigma, cond, height, width):
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((tokens.shape[0],), self.distilled_guidance_scale, device=tokens.device,
                                  dtype=torch.float32)
        return transformer(
            hidden_states=tokens,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=cond.pooled_prompt_embeds.to(self.dtype),
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=tokens.device, dtype=self.dtype),
            img_ids=latent_image_ids(height, width, tokens.device, self.dtype),
            return_dict=False,
        )[0]
