"""AestheticReward, CLIPScore and PickScore on a tiny random CLIP, against computations written here."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rlhf_image.rewards import AestheticMLP, AestheticReward, CLIPScore, PickScore  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "a red cat", "text 42", "a blue dog"]


def reference_image_embeds(clip, images):
    """Projected pooled vision output, L2-normalised, without `get_image_features`."""
    pixels = clip.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = clip.model.vision_model(pixel_values=pixels).pooler_output
        embeds = pooled @ clip.model.visual_projection.weight.T
    return embeds / embeds.norm(dim=-1, keepdim=True)


def reference_text_embeds(clip, prompts):
    tokens = clip.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        output = clip.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        pooled = output.pooler_output
        embeds = pooled @ clip.model.text_projection.weight.T
    return embeds / embeds.norm(dim=-1, keepdim=True)


def reference_mlp(state, x):
    """The aesthetic head by hand: five affine maps, no activations (dropout is off at inference)."""
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x.squeeze(-1)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    return AestheticMLP(input_dim=16).eval()


def test_aesthetic_matches_reference(tiny_clip, mlp, color_images):
    reward = AestheticReward(mlp, tiny_clip.model, tiny_clip.processor, batch_size=2)
    scores = reward(PROMPTS, color_images, target_text=["ignored"] * 5)
    expected = reference_mlp(mlp.state_dict(), reference_image_embeds(tiny_clip, color_images))
    assert len(scores) == 5 and all(isinstance(s, float) for s in scores)
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-5, atol=1e-5)
    assert reward.name == "aesthetic"


def test_aesthetic_original_layer_names(mlp):
    assert sorted(k for k in mlp.state_dict() if k.endswith("weight")) == [
        "layers.0.weight", "layers.2.weight", "layers.4.weight", "layers.6.weight", "layers.7.weight"]
    assert AestheticMLP().layers[0].in_features == 768


def test_aesthetic_loads_by_path_safetensors_and_pth(tiny_clip, mlp, color_images, tmp_path):
    from safetensors.torch import save_file

    save_file(mlp.state_dict(), tmp_path / "head.safetensors")
    torch.save(mlp.state_dict(), tmp_path / "head.pth")  # the original predictor's format
    torch.save({"state_dict": {f"model.{k}": v for k, v in mlp.state_dict().items()}}, tmp_path / "wrapped.ckpt")
    in_memory = AestheticReward(mlp, tiny_clip.model, tiny_clip.processor)(PROMPTS, color_images)
    for name in ("head.safetensors", "head.pth", "wrapped.ckpt"):
        by_path = AestheticReward(tmp_path / name, str(tiny_clip.path))(PROMPTS, color_images)
        assert by_path == pytest.approx(in_memory, rel=1e-6, abs=1e-6), name


def test_aesthetic_rejects_mismatched_mlp(tiny_clip):
    with pytest.raises(ValueError, match="projection dim is 16"):
        AestheticReward(AestheticMLP(768), tiny_clip.model, tiny_clip.processor)


def test_clip_score_matches_reference(tiny_clip, color_images):
    reward = CLIPScore(tiny_clip.model, tiny_clip.processor, batch_size=2)
    cos = (reference_image_embeds(tiny_clip, color_images) * reference_text_embeds(tiny_clip, PROMPTS)).sum(-1)
    scores = reward(PROMPTS, color_images)
    torch.testing.assert_close(torch.tensor(scores), 100 * cos.clamp(min=0), rtol=1e-5, atol=1e-4)
    paper = CLIPScore(tiny_clip.model, tiny_clip.processor, scale=2.5)(PROMPTS, color_images)
    assert paper == pytest.approx([s * 0.025 for s in scores], abs=1e-6)
    assert all(s >= 0 for s in scores)


def test_pickscore_matches_reference(tiny_clip, color_images):
    reward = PickScore(tiny_clip.model, tiny_clip.processor, batch_size=3)
    cos = (reference_image_embeds(tiny_clip, color_images) * reference_text_embeds(tiny_clip, PROMPTS)).sum(-1)
    expected = tiny_clip.model.logit_scale.detach().exp() * cos
    torch.testing.assert_close(torch.tensor(reward(PROMPTS, color_images)), expected, rtol=1e-5, atol=1e-4)
    assert reward.name == "pickscore"


def test_clip_rewards_load_by_path(tiny_clip, color_images):
    path = str(tiny_clip.path)
    assert CLIPScore(path)(PROMPTS, color_images) == pytest.approx(
        CLIPScore(tiny_clip.model, tiny_clip.processor)(PROMPTS, color_images), abs=1e-4)
    assert PickScore(path, path)(PROMPTS, color_images) == pytest.approx(
        PickScore(tiny_clip.model, tiny_clip.processor)(PROMPTS, color_images), abs=1e-4)


def test_dtype_argument(tiny_clip, color_images):
    reward = CLIPScore(str(tiny_clip.path), dtype="bfloat16")
    assert next(reward.model.parameters()).dtype == torch.bfloat16
    reference = CLIPScore(tiny_clip.model, tiny_clip.processor)(PROMPTS, color_images)
    assert reward(PROMPTS, color_images) == pytest.approx(reference, abs=3.0)  # bf16 rounding, scale 100


def test_clip_score_needs_a_tokenizer(tiny_clip):
    with pytest.raises(ValueError, match="tokenizer"):
        CLIPScore(tiny_clip.model, tiny_clip.image_processor)
