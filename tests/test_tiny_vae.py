"""Fitting the tiny Ovis-Image VAE on text renders, and its FLUX-style latent normalisation."""

import pytest
import torch

from rlhf_image.recipes.ovis_image.data import TextRenderingDataset
from rlhf_image.recipes.ovis_image.model import ovis_image_tiny
from rlhf_image.recipes.ovis_image.tiny_vae import (fit_tiny_vae, latent_modes, reconstruct, reconstruction_loss,
                                         set_latent_normalization)
from rlhf_image.policy import FlowPolicy, pil_to_tensor, tensor_to_pil


def renders(num: int, split: str = "train") -> torch.Tensor:
    data = TextRenderingDataset(num, split=split, vocabulary="digits", min_length=4, max_length=4)
    return pil_to_tensor([data[i]["image"] for i in range(num)])


def tiny_vae(seed: int = 0):
    return ovis_image_tiny(vae_mid_block_attention=False, seed=seed).vae


def test_reconstruction_loss_is_l1_plus_l2_plus_weighted_kl():
    vae = tiny_vae()
    pixels = renders(4) * 2 - 1
    loss, l1 = reconstruction_loss(vae, pixels, kl_weight=0.5, generator=torch.Generator().manual_seed(3))
    # Independent: diffusers' posterior KL (summed per sample) and the same posterior sample.
    posterior = vae.encode(pixels).latent_dist
    decoded = vae.decode(posterior.sample(torch.Generator().manual_seed(3))).sample
    kl_per_element = posterior.kl().sum() / posterior.mean.numel()
    expected = (decoded - pixels).abs().mean() + ((decoded - pixels) ** 2).mean() + 0.5 * kl_per_element
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(l1, (decoded - pixels).abs().mean())


def test_fit_lowers_the_loss_freezes_and_normalises_latents():
    pipe = ovis_image_tiny(vae_mid_block_attention=False)
    vae = pipe.vae
    images = renders(16)
    result = fit_tiny_vae(vae, images, num_steps=25, batch_size=8, learning_rate=3e-3)
    assert result.num_steps == 25 and len(result.losses) == 25
    assert sum(result.losses[-5:]) / 5 < 0.5 * sum(result.losses[:5]) / 5
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    # shift = mean and scale = 1 / std of the posterior modes, written into the config.
    modes = latent_modes(vae, images)
    assert vae.config.shift_factor == pytest.approx(modes.mean().item(), rel=1e-5)
    assert vae.config.scaling_factor == pytest.approx(1 / modes.std().item(), rel=1e-5)
    assert (result.shift_factor, result.scaling_factor) == (vae.config.shift_factor, vae.config.scaling_factor)
    # The policy's encode/decode use that normalisation: unit-scale latents, and decoding them is `reconstruct`.
    policy = FlowPolicy.from_pipeline(pipe)
    latents = policy.encode_images(images)
    assert latents.shape == (16, 4, 16, 48)
    assert abs(latents.mean().item()) < 1e-4 and latents.std().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(policy.decode(latents), reconstruct(vae, images), atol=1e-5, rtol=0)
    assert result.recon_l1 == pytest.approx((reconstruct(vae, images) - images).abs().mean().item(), rel=1e-5)


def test_fit_is_deterministic_and_validates_arguments():
    images = renders(8)
    runs = [fit_tiny_vae(tiny_vae(), images, num_steps=3, batch_size=4, seed=1).losses for _ in range(2)]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="num_steps"):
        fit_tiny_vae(tiny_vae(), images, num_steps=0)
    with pytest.raises(ValueError, match="RGB"):
        set_latent_normalization(tiny_vae(), images[:, :1])


@pytest.mark.slow
def test_fitted_vae_reconstructions_read_as_well_as_the_originals():
    from rlhf_image.recipes.ovis_image.evaluate import score_text_images
    from rlhf_image.rewards import OCRReward

    vae = tiny_vae()
    result = fit_tiny_vae(vae, renders(512), num_steps=300, batch_size=32, learning_rate=3e-3)
    assert result.recon_l1 < 0.03
    data = TextRenderingDataset(32, split="eval", vocabulary="digits", min_length=4, max_length=4)
    originals = [data[i]["image"] for i in range(32)]
    targets = [data[i]["target_text"] for i in range(32)]
    ocr = OCRReward(use_det=False, num_threads=2)
    recon = tensor_to_pil(reconstruct(vae, pil_to_tensor(originals)))
    assert score_text_images(originals, targets, ocr).word_accuracy == 1.0
    assert score_text_images(recon, targets, ocr).word_accuracy == 1.0
