"""HPSv3 (arXiv 2508.03789): a human-preference score of an image for its prompt, from Qwen2-VL-7B and a reward head.

The official checkpoint (`HPSv3.safetensors` in `MizzenAI/HPSv3`) is the state dict of the authors'
`Qwen2VLRewardModelBT`: Qwen2-VL-7B-Instruct (transformers 4.45 key names: `visual.*`, `model.*`, `lm_head.*`)
with one added token `<|Reward|>` (the embeddings resized to the tokenizer), and `rm_head`, an MLP
`hidden-1024-16-2` whose two outputs are the mean `mu` and the uncertainty `sigma` of the preference score. Its
config and processor are Qwen2-VL-7B-Instruct's. The authors' forward, reproduced here:
- the image resized as `qwen_vl_utils` does to exactly `256 * 28 * 28` pixels (sides multiples of 28, bicubic);
- the user turn = the image + the authors' evaluation instruction with the prompt + `... <|Reward|>\\n\\nEND\\n`,
  through the chat template (with its default system turn), right-padded;
- the language model runs with sequential positions `0..L-1` on all three M-RoPE axes (the authors' forward
  bypasses Qwen2-VL's 3-D rope index), and the head reads the final hidden state at the `<|Reward|>` token, in float32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .clip_utils import resolve_dtype
from .lazy_model import LazyModel
from .qwen_vl import QwenVLProcessor, qwen_vl_utils_resize

# The authors' prompt (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION + prompt_with_special_token), verbatim.
HPSV3_INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and "
    "give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 "
    "being the worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be "
    "considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, "
    "such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
    "visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color "
    "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
    "convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score "
    "should be the lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
    "how well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in "
    "the image logically fit the scenario described in the prompt. The environment should support and "
    "enhance the subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, "
    "clothing, accessories, expressions, actions) are faithfully represented in the image. Minor "
    "deviations may be acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are "
    "captured in the image. The generated content should not introduce elements that conflict with or "
    "distort the original description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
HPSV3_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
REWARD_TOKEN = "<|Reward|>"
HPSV3_PIXELS = 256 * 28 * 28
CHECKPOINT_NAME = "HPSv3.safetensors"


def load_hpsv3_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The official state dict: a `.safetensors` / `.pt` file, a folder holding `HPSv3.safetensors`, or a Hub id."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    elif not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(checkpoint), CHECKPOINT_NAME))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def _reward_head(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The authors' "ranknet" head (`Linear, ReLU, Dropout, Linear, ReLU, Linear`) with the checkpoint's sizes."""
    found = sorted({k.split(".")[1] for k in state if k.startswith("rm_head.")})
    if found != ["0", "3", "5"]:
        raise ValueError(f"unsupported HPSv3 head: layers {found} (expected rm_head.0, rm_head.3, rm_head.5)")
    w0, w3, w5 = (state[f"rm_head.{i}.weight"] for i in (0, 3, 5))
    head = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU(), nn.Dropout(0.05),
                         nn.Linear(w3.shape[1], w3.shape[0]), nn.ReLU(),
                         nn.Linear(w5.shape[1], w5.shape[0], bias="rm_head.5.bias" in state))
    head.load_state_dict({k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")})
    return head.float()


class HPSv3Model(nn.Module):
    """Qwen2-VL backbone + reward head; `forward` gives `(mu, sigma)` per sample, `[B, 2]`, float32."""

    def __init__(self, backbone: nn.Module, head: nn.Module, reward_token_id: int):
        super().__init__()
        self.backbone, self.head, self.reward_token_id = backbone, head, reward_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor, **unused: Any) -> torch.Tensor:
        batch, length = input_ids.shape
        at_token = input_ids == self.reward_token_id
        if not (at_token.sum(-1) == 1).all():
            raise ValueError(f"each sequence must hold exactly one {REWARD_TOKEN} token (is it in a prompt?)")
        positions = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, batch, -1)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                               pixel_values=pixel_values, image_grid_thw=image_grid_thw).last_hidden_state
        return self.head(hidden[at_token].float())


def build_hpsv3_model(checkpoint: str | os.PathLike, base_model: str | os.PathLike, reward_token_id: int,
                      device: str | torch.device = "cpu", dtype: torch.dtype | str | None = "bfloat16") -> HPSv3Model:
    """Build the model from the official state dict and the base model's config, without a random init."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Qwen2VLModel

    state = load_hpsv3_state_dict(checkpoint)
    backbone_state, unknown = {}, []
    for key, value in state.items():
        if key.startswith("visual."):
            backbone_state[key] = value
        elif key.startswith("model."):
            backbone_state["language_model." + key[len("model."):]] = value
        elif not key.startswith(("rm_head.", "lm_head.")):  # the LM head is not used for scoring
            unknown.append(key)
    if unknown or "model.embed_tokens.weight" not in state:
        raise ValueError(f"not an HPSv3 checkpoint: unexpected keys {unknown[:5]}, or no model.embed_tokens.weight")
    config = AutoConfig.from_pretrained(base_model, attn_implementation="sdpa")
    config.text_config.vocab_size = state["model.embed_tokens.weight"].shape[0]  # resized to the tokenizer
    if reward_token_id >= config.text_config.vocab_size:
        raise ValueError(f"{REWARD_TOKEN} has id {reward_token_id} but the checkpoint embeds "
                         f"{config.text_config.vocab_size} tokens: is `base_model` the checkpoint's base?")
    with init_empty_weights(include_buffers=False):  # parameters come from the checkpoint (assign=True)
        backbone = Qwen2VLModel(config)
    backbone.load_state_dict(backbone_state, strict=True, assign=True)
    model = HPSv3Model(backbone.to(device=device, dtype=resolve_dtype(dtype)), _reward_head(state), reward_token_id)
    model.head.to(device)
    return model.eval()


class HPSv3Reward:
    """HPSv3 preference score of each image for its prompt: the mean `mu` of the head's Gaussian.

    The head predicts `(mu, sigma)` (trained with an uncertainty-aware ranking loss); the official inference
    returns both and uses `mu` as the score, as this reward does: it is not uncertainty-adjusted. `predict` gives
    both. Scores are unbounded real numbers.

    Args:
        checkpoint (`str`, defaults to `"MizzenAI/HPSv3"`): folder or Hub id holding `HPSv3.safetensors`, or the file.
        base_model (`str`, defaults to `"Qwen/Qwen2-VL-7B-Instruct"`): folder or Hub id of the config, tokenizer
            (with its chat template) and image processor.
        min_pixels, max_pixels (`int`, default `256 * 28 * 28`): the image area (the official values).
        device (`str`, defaults to `"cpu"`), dtype (defaults to `"bfloat16"`, the official): of the backbone; the
            head runs in float32.
        batch_size (`int`, defaults to 8), name (`str`, defaults to `"hpsv3"`).

    The model loads on the first call (a pickled reward carries no weights: each Ray reward worker loads it once).
    """

    def __init__(self, checkpoint: str | os.PathLike = "MizzenAI/HPSv3",
                 base_model: str | os.PathLike = "Qwen/Qwen2-VL-7B-Instruct", *, min_pixels: int = HPSV3_PIXELS,
                 max_pixels: int = HPSV3_PIXELS, device: str | torch.device = "cpu",
                 dtype: torch.dtype | str | None = "bfloat16", batch_size: int = 8, name: str = "hpsv3"):
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.name, self.batch_size = name, batch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.processor = QwenVLProcessor.from_pretrained(base_model)
        self.processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        token_id = self.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.lazy_model = LazyModel(functools.partial(build_hpsv3_model, checkpoint, base_model, token_id,
                                                      device, dtype))

    @property
    def model(self) -> HPSv3Model:
        return self.lazy_model.get()

    def inputs(self, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The authors' batch for these prompts and images (right-padded)."""
        conversations = [[{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=p) + HPSV3_SUFFIX}]}]
            for p in prompts]
        texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True)
        resized = [qwen_vl_utils_resize(im, self.min_pixels, self.max_pixels) for im in images]
        return self.processor(text=texts, images=resized, padding_side="right")

    @torch.no_grad()
    def predict(self, prompts: Sequence[str], images: Sequence[Any]) -> torch.Tensor:
        """`(mu, sigma)` of each sample, `torch.Tensor` of shape `[N, 2]`, float32, on the CPU."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images")
        model = self.model
        device = next(model.head.parameters()).device
        out = [torch.zeros(0, 2)]
        for start in range(0, len(prompts), self.batch_size):
            batch = self.inputs(prompts[start:start + self.batch_size], images[start:start + self.batch_size])
            out.append(model(**{k: v.to(device) for k, v in batch.items()}).cpu())
        return torch.cat(out)

    def __call__(self, prompts: list[str], images: list[Any], **columns: Any) -> list[float | None]:
        """`mu` of each sample: `list[float]` of length N (extra `columns` are ignored)."""
        return self.predict(prompts, images)[:, 0].tolist()
