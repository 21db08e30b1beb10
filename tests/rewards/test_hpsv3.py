"""HPSv3Reward on a tiny random Qwen2-VL written in the official layout (a Qwen2-VL-7B-Instruct-shaped base folder
and `HPSv3.safetensors` with the authors' transformers 4.45 key names), against the authors' computation transcribed
below (hpsv3 1.0.0: `HPSv3RewardInferencer.prepare_batch` + `Qwen2VLRewardModelBT.forward`), one sample at a time.

The reward was also checked against the authors' own package (hpsv3 1.0.0 with transformers 4.45.2, in a separate
environment) on this fixture: `tests/scripts/hpsv3_reference.py` runs both; the largest difference was 9e-8."""

from __future__ import annotations

import math
import pickle

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from tiny_vlms import save_hpsv3_checkpoint, save_qwen2_vl_base  # noqa: E402

from rlhf_image.rewards import HPSv3Reward  # noqa: E402
from rlhf_image.rewards.hpsv3 import HPSV3_INSTRUCTION, HPSV3_SUFFIX  # noqa: E402

PROMPTS = ["a cat on a mat", 'a poster that says "SALE"', "x", "two dogs {in} a park"]
PIXELS = 4 * 28 * 28  # the official 256 * 28 * 28 makes 448 x 448 images: too slow for a unit test
# Long fixed strings get one token each in the tiny byte-level tokenizer (short sequences).
WORDS = (HPSV3_INSTRUCTION.split("{text_prompt}")[0], "You are a helpful assistant.",
         HPSV3_SUFFIX.split("<|Reward|>")[0])


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpsv3")
    base = save_qwen2_vl_base(root / "base", WORDS)
    model, head, state = save_hpsv3_checkpoint(base, root / "checkpoint", seed=3)
    with torch.no_grad():  # spread the random head's outputs so that samples are told apart
        head[-1].weight.mul_(50.0)
    from safetensors.torch import save_file

    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "checkpoint" / "HPSv3.safetensors"))
    return dict(base=base, checkpoint=root / "checkpoint", model=model, head=head)


def official_resize(image, pixels):
    """hpsv3/dataset/utils.py `fetch_image` with min_pixels = max_pixels = `pixels` (factor 28)."""
    width, height = image.size
    h_bar, w_bar = max(28, round(height / 28) * 28), max(28, round(width / 28) * 28)
    if h_bar * w_bar > pixels:
        beta = math.sqrt((height * width) / pixels)
        h_bar, w_bar = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
    elif h_bar * w_bar < pixels:
        beta = math.sqrt(pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return image.convert("RGB").resize((w_bar, h_bar), Image.BICUBIC)


def reference(hps, reward, prompt, image):
    """(mu, sigma) as the authors compute it, for one sample, with the in-memory random model."""
    tokenizer, image_processor = reward.processor.tokenizer, reward.processor.image_processor
    vision = image_processor(images=[official_resize(image, PIXELS)], return_tensors="pt")
    n = int(vision["image_grid_thw"][0].prod()) // 4
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * n + "<|vision_end|>" + HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_SUFFIX
            + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    qwen = hps["model"].model
    with torch.no_grad():
        embeds = qwen.language_model.embed_tokens(ids)
        image_embeds = qwen.visual(vision["pixel_values"], grid_thw=vision["image_grid_thw"]).pooler_output
        embeds[ids == qwen.config.image_token_id] = image_embeds
        positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)  # the authors' forward: 0..L-1
        hidden = qwen.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        at = (ids[0] == tokenizer.convert_tokens_to_ids("<|Reward|>")).nonzero().item()
        return hps["head"](hidden[0, at].float())


def test_scores_match_the_authors_computation(hps, varied_images):
    reward = HPSv3Reward(hps["checkpoint"], hps["base"], min_pixels=PIXELS, max_pixels=PIXELS, dtype="float32",
                         batch_size=3)
    predicted = reward.predict(PROMPTS, varied_images)  # a batch of 3 (right-padded) and a batch of 1
    expected = torch.stack([reference(hps, reward, p, im) for p, im in zip(PROMPTS, varied_images)])
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-5)
    scores = reward(PROMPTS, varied_images, target_text=["ignored"] * 4)
    assert scores == pytest.approx(expected[:, 0].tolist(), abs=1e-5)  # the score is mu, the head's first output
    assert max(scores) - min(scores) > 0.05 and reward.name == "hpsv3"


def test_checkpoint_layout_and_loading(hps, varied_images, tmp_path):
    reward = HPSv3Reward(hps["checkpoint"] / "HPSv3.safetensors", hps["base"], min_pixels=PIXELS,
                         max_pixels=PIXELS, dtype="float32")  # the file itself
    assert not reward.lazy_model.loaded and len(pickle.dumps(reward)) < 200_000
    model = reward.model
    assert model.reward_token_id == len(reward.processor.tokenizer) - 1  # the token added last
    assert model.backbone.language_model.embed_tokens.weight.shape[0] == model.reward_token_id + 1
    assert next(model.head.parameters()).dtype == torch.float32
    bf16 = HPSv3Reward(hps["checkpoint"], hps["base"], min_pixels=PIXELS, max_pixels=PIXELS)  # official dtype
    assert next(bf16.model.backbone.parameters()).dtype == torch.bfloat16
    assert next(bf16.model.head.parameters()).dtype == torch.float32
    torch.save({"model": {k: v for k, v in model.state_dict().items()}}, tmp_path / "not_hpsv3.pt")
    with pytest.raises(ValueError, match="unexpected keys"):
        HPSv3Reward(tmp_path / "not_hpsv3.pt", hps["base"]).model
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        HPSv3Reward(hps["checkpoint"], hps["base"], min_pixels=10, max_pixels=5)
