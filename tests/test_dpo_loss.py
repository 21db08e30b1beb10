"""Flow-DPO loss against hand computations, the velocity/epsilon error relation behind the default beta, and
`DPOConfig` validation."""

import math

import pytest
import torch

from rlhf_image.dpo_config import DPOConfig
from rlhf_image.losses import dpo_loss, interpolate


def test_dpo_loss_equals_hand_computation():
    policy_w = torch.tensor([0.50, 0.20])
    policy_l = torch.tensor([0.40, 0.30])
    ref_w = torch.tensor([0.52, 0.25])
    ref_l = torch.tensor([0.38, 0.28])
    beta = 100.0
    loss, margin = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta)
    # pair 0: -50 * ((0.50 - 0.52) - (0.40 - 0.38)) = -50 * (-0.04) = 2.0
    # pair 1: -50 * ((0.20 - 0.25) - (0.30 - 0.28)) = -50 * (-0.07) = 3.5
    expected_margin = [2.0, 3.5]
    expected_loss = sum(math.log(1 + math.exp(-m)) for m in expected_margin) / 2
    assert margin.tolist() == pytest.approx(expected_margin, abs=1e-5)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    # A wrongly ranked pair has a negative margin and a loss above log 2.
    bad_loss, bad_margin = dpo_loss(torch.tensor([0.5]), torch.tensor([0.4]), torch.tensor([0.4]),
                                    torch.tensor([0.5]), beta=10.0)
    assert bad_margin.item() == pytest.approx(-1.0)
    assert bad_loss.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    errors_w = torch.rand(6) * 3
    errors_l = torch.rand(6) * 3
    loss, margin = dpo_loss(errors_w, errors_l, errors_w.clone(), errors_l.clone(), beta=100.0)
    assert torch.all(margin == 0)
    assert loss.item() == torch.log(torch.tensor(2.0)).item()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_loss_gradient_signs():
    # Lowering the winner's error and raising the loser's both lower the loss.
    errors_w = torch.tensor([1.0], requires_grad=True)
    errors_l = torch.tensor([1.0], requires_grad=True)
    loss, _ = dpo_loss(errors_w, errors_l, torch.tensor([1.0]), torch.tensor([1.0]), beta=100.0)
    loss.backward()
    # d/de_w of -log sigmoid(-beta/2 (e_w - e_l)) at margin 0 = beta/2 * sigmoid(0) = beta/4.
    assert errors_w.grad.item() == pytest.approx(25.0)
    assert errors_l.grad.item() == pytest.approx(-25.0)


def test_velocity_error_is_epsilon_error_over_one_minus_sigma_squared():
    # The relation the default beta is argued from (DPOConfig docstring): eps_hat = x_t + (1 - s) v_hat.
    generator = torch.Generator().manual_seed(0)
    x0, noise, v_hat = (torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t, target = interpolate(x0, noise, sigma)
    s = sigma[:, None, None, None]
    eps_hat = x_t + (1 - s) * v_hat
    eps_err = ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))
    vel_err = ((v_hat - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(vel_err, eps_err / (1 - sigma) ** 2)
    # Mean amplification (1 + e^z)^2 under logit-normal sigmas, unshifted and with mu = 1.15.
    z = torch.randn(400_000, generator=generator, dtype=torch.float64)
    assert ((1 + z.exp()) ** 2).mean().item() == pytest.approx(1 + 2 * math.exp(0.5) + math.exp(2), rel=0.03)
    mu = 1.15
    assert ((1 + (z + mu).exp()) ** 2).mean().item() == pytest.approx(
        1 + 2 * math.exp(mu + 0.5) + math.exp(2 * mu + 2), rel=0.05)


@pytest.mark.parametrize("kwargs, field", [
    ({"beta": 0.0}, "beta"),
    ({"timestep_sampling": "cosine"}, "timestep_sampling"),
    ({"logit_std": 0.0}, "logit_std"),
    ({"timestep_shift": "linear"}, "timestep_shift"),
    ({"sdpo_space": "weights"}, "sdpo_space"),
    ({"sdpo_mu": 1.5}, "sdpo_mu"),
    ({"sdpo_lambda_min": 2.0, "sdpo_lambda_max": 1.0}, "sdpo_lambda_min"),
    ({"sdpo_eps": 0.0}, "sdpo_eps"),
    ({"resolution": 0}, "resolution"),
    ({"cfg_dropout_prob": 1.0}, "cfg_dropout_prob"),
    ({"encode_batch_size": 0}, "encode_batch_size"),
    ({"cache_dir": "/tmp/x"}, "cache_dir"),
    ({"remove_unused_columns": True}, "remove_unused_columns"),
])
def test_config_rejects_bad_fields_naming_them(kwargs, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        DPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_config_defaults_and_help():
    from dataclasses import fields

    config = DPOConfig(output_dir="unused", report_to="none")
    assert config.beta == 100.0 and config.sdpo is False and config.remove_unused_columns is False
    own = [f for f in fields(DPOConfig) if f.name in {
        "beta", "timestep_sampling", "logit_mean", "logit_std", "timestep_shift", "sdpo", "sdpo_space", "sdpo_mu",
        "sdpo_lambda_min", "sdpo_lambda_max", "sdpo_eps", "resolution", "cfg_dropout_prob", "cache_latents",
        "cache_text_embeddings", "cache_dir", "encode_batch_size"}]
    assert len(own) == 17
    assert all(f.metadata.get("help") for f in own)
