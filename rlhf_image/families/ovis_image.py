"""Ovis-Image (`OvisImagePipeline`): `OvisImageTransformer2DModel` on 2x2-packed FLUX latents, a `Qwen3Model` text
encoder, true CFG in two calls."""

from __future__ import annotations

import torch

from ..policy import Conditioning, FlowPolicy, latent_image_ids, pack_latents, unpack_latents

OVIS_SYSTEM_PROMPT = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships of "
    "the objects and background: "
)


class OvisImagePolicy(FlowPolicy):
    """Ovis-Image: the `Qwen3Model`'s final hidden states condition the decoder (prompt in the Ovis chat template,
    padded to `28 + max_sequence_length` tokens, masked, the first 28 tokens dropped), FLUX `AutoencoderKL`.

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 256): text tokens after the dropped prefix.
        negative_prompt (`str`, defaults to `""`).
        batched_cfg (`bool`, *optional*): see [`FlowPolicy`].
    """

    system_prompt = OVIS_SYSTEM_PROMPT
    user_prompt_begin_id = 28

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 256,
                 negative_prompt: str = "", batched_cfg: bool | None = None):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

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

    def forward(self, transformer, latents, sigma, cond):
        _, _, h, w = latents.shape
        num_text = cond.prompt_embeds.shape[1]
        text_ids = torch.zeros(num_text, 3)
        text_ids[:, 1] = text_ids[:, 2] = torch.arange(num_text, dtype=torch.float32)
        velocity = transformer(
            hidden_states=pack_latents(latents),
            timestep=sigma.to(self.dtype),
            encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
            txt_ids=text_ids.to(latents.device, self.dtype),
            img_ids=latent_image_ids(h, w, latents.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(velocity, h, w)
