"""Text-rendering evaluation: real OCR on real renders, through the real sampler."""

import string

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from rlhf_image.recipes.ovis_image.data import TextRenderingDataset, split_of
from rlhf_image.recipes.ovis_image.evaluate import evaluate_text_rendering, held_out_prompts, score_text_images
from rlhf_image.rewards import AestheticMLP, AestheticReward, CLIPScore, OCRReward
from rlhf_image.rewards.text_match import extract_target
from rlhf_image.policy import Conditioning, FlowPolicy, pack_latents, pil_to_tensor, unpack_latents

SIZE = (32, 96)


@pytest.fixture(scope="module")
def ocr():
    return OCRReward(use_det=False, num_threads=1)


@pytest.fixture(scope="module")
def renderer():
    return TextRenderingDataset(1, vocabulary="digits", min_length=4, max_length=4)


def blank() -> Image.Image:
    return Image.new("RGB", SIZE[::-1], "white")


def test_scores_of_perfect_wrong_and_blank_images(ocr, renderer):
    targets = ["1234", "5678", "9012", "3456"]
    # Two exact renders, one with two digits swapped ("9021" for "9012"), one blank.
    images = [renderer.render("1234"), renderer.render("5678"), renderer.render("9021"), blank()]
    result = score_text_images(images, targets, ocr)
    assert result.ocr_texts[:3] == ["1234", "5678", "9021"] and result.ocr_texts[3] == ""
    assert result.exact == [True, True, False, False]
    # NED = levenshtein / max length: swap = 2 edits of 4; blank = 4 of 4.
    assert result.ned == [0.0, 0.0, 0.5, 1.0]
    assert result.ocr_reward == [1.0, 1.0, 0.5, 0.0]
    assert result.word_accuracy == 0.5 and result.mean_ned == 0.375 and result.mean_ocr_reward == 0.625
    assert result.metrics() == {"eval/word_accuracy": 0.5, "eval/ned": 0.375, "eval/ocr_reward": 0.625}
    grid = result.grid
    assert grid.size == (8 * 2 * SIZE[1], 2 * SIZE[0] + 14)
    # The first cell is the first image, upscaled 2x.
    cell = pil_to_tensor([grid.crop((0, 0, 2 * SIZE[1], 2 * SIZE[0]))])
    expected = pil_to_tensor([images[0].resize((2 * SIZE[1], 2 * SIZE[0]), Image.NEAREST)])
    assert torch.equal(cell, expected)


def test_score_rejects_misaligned_or_blank_targets(ocr):
    with pytest.raises(ValueError, match="one target per image"):
        score_text_images([blank()], ["12", "34"], ocr)
    with pytest.raises(ValueError, match="blank"):
        score_text_images([blank()], ["  "], ocr)


class PixelTargetPolicy(FlowPolicy):
    """A pixel-space policy (the "latents" are the image in [-1, 1]) whose velocity field carries every
    sample to the render of its prompt's quoted target: `v = (x - x0) / sigma`, the exact rectified-flow
    velocity of a one-point data distribution, so Euler sampling ends exactly at `x0`. A prompt with no
    quoted target is carried to a blank image."""

    latent_patch = 2

    def __init__(self, renderer):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(4,),
                            norm_num_groups=1, down_block_types=["DownEncoderBlock2D"],
                            up_block_types=["UpDecoderBlock2D"])  # scale factor 1; only its config is used
        super().__init__(torch.nn.Linear(1, 1), vae, {"use_dynamic_shifting": False, "shift": 1.0})
        self.renderer = renderer
        self.calls = 0

    def encode_prompt(self, prompts):
        targets = [extract_target(p) for p in prompts]
        images = [self.renderer.render(t) if t else blank() for t in targets]
        return Conditioning(pack_latents(pil_to_tensor(images) * 2 - 1))

    def forward(self, transformer, latents, sigma, cond):
        self.calls += 1
        target = unpack_latents(cond.prompt_embeds, *latents.shape[2:])
        return (latents - target) / sigma[:, None, None, None]

    def decode(self, latents):
        return (latents / 2 + 0.5).clamp(0, 1)


def test_evaluate_a_policy_that_renders_perfectly_and_one_that_renders_nothing(ocr, renderer):
    prompts, targets = held_out_prompts(6)
    policy = PixelTargetPolicy(renderer)
    result = evaluate_text_rendering(policy, prompts, targets, seeds=list(range(6)), ocr=ocr, num_steps=4,
                                     micro_batch_size=4)
    assert policy.calls == 2 * 4  # two micro-batches of 4 (the last padded) per Euler step
    assert result.exact == [True] * 6 and result.word_accuracy == 1.0 and result.mean_ned == 0.0
    assert result.ocr_texts == targets
    nothing = evaluate_text_rendering(policy, ["a blank sign"] * 3, ["1234", "5678", "0000"], seeds=[0, 1, 2],
                                      ocr=ocr, num_steps=4)
    assert nothing.word_accuracy == 0.0 and nothing.mean_ned == 1.0 and nothing.mean_ocr_reward == 0.0
    with pytest.raises(ValueError, match="one target and one seed per prompt"):
        evaluate_text_rendering(policy, prompts, targets, seeds=[0], ocr=ocr)


def test_held_out_prompts_quote_distinct_strings_never_used_in_training():
    prompts, targets = held_out_prompts(32)
    assert len(set(targets)) == 32 and all(len(t) == 4 and t.isdigit() for t in targets)
    assert [extract_target(p) for p in prompts] == targets
    assert all(split_of(t, 0.1) == "eval" for t in targets)
    train = {r["target_text"] for r in TextRenderingDataset(4000, vocabulary="digits", min_length=4,
                                                           max_length=4).prompt_records()}
    assert not train & set(targets)
    with pytest.raises(ValueError, match="distinct"):
        held_out_prompts(5, min_length=1, max_length=1)


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "\"'":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    processor = CLIPProcessor(tokenizer=tokenizer, image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, projection_dim=16)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **layers),
                        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(config).eval(), processor


def test_extra_rewards_are_scored_per_sample_and_averaged(ocr, renderer):
    model, processor = tiny_clip()
    torch.manual_seed(1)
    aesthetic = AestheticReward(AestheticMLP(16), model, processor)
    clip = CLIPScore(model, processor)
    prompts = ['a sign that says "1234"', 'a sign that says "5678"']
    images = [renderer.render("1234"), blank()]
    result = score_text_images(images, ["1234", "5678"], ocr, prompts=prompts, rewards=[aesthetic, clip])
    expected_aesthetic, expected_clip = aesthetic(prompts, images), clip(prompts, images)
    assert result.reward_scores == {"aesthetic": expected_aesthetic, "clip_score": expected_clip}
    metrics = result.metrics("val/")
    assert metrics["val/aesthetic"] == pytest.approx(sum(expected_aesthetic) / 2)
    assert metrics["val/clip_score"] == pytest.approx(sum(expected_clip) / 2)
    assert metrics["val/word_accuracy"] == 0.5
