"""ImageReward on a tiny random checkpoint in the official layout (`ImageReward.pt` with the authors' key names +
`med_config.json` + a BERT tokenizer folder), against the authors' forward transcribed below from their BLIP code
(`models/BLIP/vit.py` and `med.py`) and computed from the raw state dict with plain torch operations."""

from __future__ import annotations

import json
import math
import pickle

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from tiny_vlms import IMAGEREWARD_MED as MED  # noqa: E402
from tiny_vlms import IMAGEREWARD_VIT as VIT  # noqa: E402
from tiny_vlms import save_image_reward  # noqa: E402

from rlhf_image.rewards import ImageReward  # noqa: E402
from rlhf_image.rewards.image_reward import preprocess  # noqa: E402

PROMPTS = ["a red cat", "two dogs playing in the park at night", "x", "sign 42"]


def reference_score(state, input_ids, attention_mask, pixels):
    """vit.py `VisionTransformer.forward`, med.py `BertModel.forward(mode="multimodal")`, ImageReward.score."""
    vit = {k[len("blip.visual_encoder."):]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    txt = {k[len("blip.text_encoder."):]: v for k, v in state.items() if k.startswith("blip.text_encoder.")}
    mlp = {k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")}

    def lin(d, name, x):
        return F.linear(x, d[f"{name}.weight"], d[f"{name}.bias"])

    def norm(d, name, x, eps):
        return F.layer_norm(x, x.shape[-1:], d[f"{name}.weight"], d[f"{name}.bias"], eps)

    def heads(x, n):  # [B, L, C] -> [B, n, L, C / n]
        return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)

    def merge(x):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    x = F.conv2d(pixels, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=VIT["patch"])
    x = torch.cat([vit["cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    x = x + vit["pos_embed"][:, :x.shape[1]]
    for i in range(VIT["depth"]):
        b, n = f"blocks.{i}", VIT["heads"]
        q, k, v = lin(vit, f"{b}.attn.qkv", norm(vit, f"{b}.norm1", x, 1e-6)).chunk(3, dim=-1)
        scores = heads(q, n) @ heads(k, n).transpose(-1, -2) * (VIT["width"] // n) ** -0.5
        x = x + lin(vit, f"{b}.attn.proj", merge(scores.softmax(-1) @ heads(v, n)))
        x = x + lin(vit, f"{b}.mlp.fc2", F.gelu(lin(vit, f"{b}.mlp.fc1", norm(vit, f"{b}.norm2", x, 1e-6))))
    image_embeds = norm(vit, "norm", x, 1e-6)

    n, eps = MED["num_attention_heads"], MED["layer_norm_eps"]
    h = txt["embeddings.word_embeddings.weight"][input_ids]
    h = norm(txt, "embeddings.LayerNorm", h + txt["embeddings.position_embeddings.weight"][:input_ids.shape[1]], eps)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask

    def attend(prefix, x, context, mask):
        q, k, v = (heads(lin(txt, f"{prefix}.self.{p}", y), n) for p, y in (("query", x), ("key", context),
                                                                             ("value", context)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        return norm(txt, f"{prefix}.output.LayerNorm", lin(txt, f"{prefix}.output.dense",
                                                              merge(scores.softmax(-1) @ v)) + x, eps)

    for i in range(MED["num_hidden_layers"]):
        b = f"encoder.layer.{i}"
        h = attend(f"{b}.attention", h, h, mask)
        h = attend(f"{b}.crossattention", h, image_embeds, 0.0)  # every image token is attended
        h = norm(txt, f"{b}.output.LayerNorm", lin(txt, f"{b}.output.dense",
                                                   F.gelu(lin(txt, f"{b}.intermediate.dense", h))) + h, eps)
    y = h[:, 0]
    for index in (0, 2, 4, 6, 7):  # the MLP has no activations (dropout is off at inference)
        y = lin(mlp, f"layers.{index}", y)
    return ((y - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_image_reward(tmp_path_factory.mktemp("image_reward"))


def test_scores_match_the_authors_forward(checkpoint, varied_images):
    reward = ImageReward(checkpoint["folder"], checkpoint["tokenizer"], batch_size=3)
    tokens = checkpoint["bert"](PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"][:, 0].eq(checkpoint["bert"].cls_token_id).all()  # the score reads [CLS]
    with torch.no_grad():
        expected = reference_score(checkpoint["state"], tokens["input_ids"], tokens["attention_mask"],
                                   preprocess(varied_images, VIT["image"]))
    scores = reward(PROMPTS, varied_images, target_text=["ignored"] * 4)
    assert scores == pytest.approx(expected.tolist(), abs=1e-4)
    assert max(scores) - min(scores) > 0.1 and reward.name == "image_reward"
    assert not pickle.loads(pickle.dumps(reward)).lazy_model.loaded  # weights never travel in a pickle
    by_file = ImageReward(checkpoint["folder"] / "ImageReward.pt", checkpoint["tokenizer"])
    assert by_file(PROMPTS, varied_images) == pytest.approx(scores, abs=1e-6)


def test_preprocessing_matches_clip_where_the_crop_offsets_agree(varied_images):
    """Resize the short side + center crop + CLIP normalisation, compared with transformers' CLIP image processor
    (which rounds the crop offset down where torchvision rounds to nearest: the sizes here give whole offsets)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = [im.resize(size) for im, size in zip(varied_images, [(40, 30), (32, 32), (30, 60), (64, 48)])]
    clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = clip(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess(images, 32), expected, rtol=0, atol=1e-5)


def test_bad_checkpoints_are_refused(checkpoint, tmp_path):
    med = json.loads((checkpoint["folder"] / "med_config.json").read_text())
    (tmp_path / "med_config.json").write_text(json.dumps({**med, "add_cross_attention": False}))
    torch.save(checkpoint["state"], tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="add_cross_attention"):
        ImageReward(tmp_path, checkpoint["tokenizer"]).model
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    torch.save({k: v for k, v in checkpoint["state"].items() if "visual_encoder" not in k}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        ImageReward(tmp_path, checkpoint["tokenizer"]).model
