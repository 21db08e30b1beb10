"""Z-Image (`ZImagePipeline`): `ZImageTransformer2DModel`, a single-stream DiT taking lists of per-sample latents and
caption states, a `Qwen3Model` text encoder, FLUX `AutoencoderKL`, CFG in one batched call."""

from __future__ import annotations

import torch

from ..policy import Conditioning, FlowPolicy, pad_to_length
from ..schedule import calculate_shift, scheduler_sigmas


class ZImagePolicy(FlowPolicy):
    """Z-Image. Text is encoded by the pipeline's own prompt encoding (the prompt in the Qwen3 chat template, the
    second-to-last hidden states of its real tokens), padded here to `max_sequence_length` with a mask and cut back to
    each prompt's own length for the transformer, as the pipeline passes it. The transformer takes `1 - sigma` and
    predicts `x0 - eps`, so `forward` flips the sign.

    Guidance: `guidance_scale` is the usual CFG scale `g` (`v_neg + g (v - v_neg)`); the pipeline counts it from 0
    (`v + g' (v - v_neg)`), so its `guidance_scale=g'` is `g = g' + 1` here (Z-Image's default 5 is 6).

    Args:
        transformer, vae, text_encoder, tokenizer, scheduler: the pipeline's components.
        max_sequence_length (`int`, defaults to 512).
        negative_prompt (`str`, defaults to `""`), batched_cfg (`bool`, *optional*).
    """

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, max_sequence_length: int = 512,
                 negative_prompt: str = "", batched_cfg: bool | None = None):
        from diffusers import ZImagePipeline

        self.text_pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                        transformer=transformer)
        self.text_encoder = text_encoder
        self.max_sequence_length = max_sequence_length
        super().__init__(transformer, vae, scheduler, negative_prompt, batched_cfg=batched_cfg)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.vae, self.text_encoder]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        states = self.text_pipe._encode_prompt(list(prompts), device=self.text_encoder.device,
                                               max_sequence_length=self.max_sequence_length)
        width = states[0].shape[-1]
        embeds = torch.zeros(len(states), self.max_sequence_length, width, dtype=states[0].dtype,
                             device=states[0].device)
        mask = torch.zeros(len(states), self.max_sequence_length, dtype=torch.long, device=states[0].device)
        for i, state in enumerate(states):
            embeds[i, :len(state)], mask[i, :len(state)] = state, 1
        return pad_to_length(Conditioning(embeds, attention_mask=mask), self.max_sequence_length).to(self.device)

    def forward(self, transformer, latents, sigma, cond):
        lengths = cond.attention_mask.sum(dim=1).tolist()
        captions = [state[:n].to(self.dtype) for state, n in zip(cond.prompt_embeds, lengths)]
        timestep = (1000 - sigma * 1000) / 1000  # the pipeline's (1000 - t) / 1000
        out = transformer(list(latents.unsqueeze(2).unbind(dim=0)), timestep, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def guide(self, velocity, negative_velocity, guidance_scale):
        return velocity + (guidance_scale - 1) * (velocity - negative_velocity)  # the pipeline's form, g' = g - 1

    def inference_sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """`torch.linspace(1, 1/N, N)` and `mu = calculate_shift(image_seq_len)`, as the pipeline passes them."""
        config = self.scheduler_config
        mu = calculate_shift(self.image_seq_len(height, width), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
        return scheduler_sigmas(config, num_steps, sigmas=sigmas, mu=mu)
