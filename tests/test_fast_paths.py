"""The GPU fast paths of the configs, checked on the CPU where an equivalence can be shown: regional compilation
(compiled blocks == eager blocks), fused AdamW (== AdamW), a bfloat16 DPO reference (ln 2 at the first step) and
the on-policy ratio of GRPO under bfloat16 autocast (exactly 1); the GPU-only attention backends fail at
construction on the CPU."""

import copy
import math

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from grpo_helpers import brightness, dataset, logged, ovis_policy, tiny_config
from test_dpo_trainer import bright_dark_rows, config, dpo_logs, lora_config, make_policy

from rlhf_image import GRPOTrainer
from rlhf_image.dpo_config import DPOConfig
from rlhf_image.dpo_trainer import DPOTrainer
from rlhf_image.model_io import compile_repeated_blocks, set_attention_backend
from rlhf_image.seeding import seeded_generator

BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits: a relative rounding of at most 2^-8


def test_compiled_repeated_blocks_give_the_eager_velocity():
    policy = ovis_policy()
    eager = copy.deepcopy(policy.transformer)
    assert compile_repeated_blocks(policy.transformer) == len(policy.transformer.transformer_blocks) + len(
        policy.transformer.single_transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in policy.transformer.transformer_blocks)
    generator = seeded_generator(0, 0)
    cond = policy.encode_prompt(["a cat", "a red house"])
    latents = torch.randn(2, policy.num_latent_channels, *policy.latent_size(32, 32), generator=generator)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        compiled = policy.predict_velocity(latents, sigma, cond)
        reference = policy.predict_velocity(latents, sigma, cond, transformer=eager)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)


def test_fused_adamw_takes_the_adamw_step(tmp_path):
    # optim="adamw_torch_fused" is TrainingArguments' own option: one step equals the unfused AdamW step.
    steps = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        args = tiny_config(tmp_path / optim, max_steps=1, optim=optim, gradient_accumulation_steps=1)
        trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset())
        trainer.train()
        assert bool(trainer.optimizer.optimizer.defaults.get("fused")) is (optim == "adamw_torch_fused")
        steps[optim] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for name, value in steps["adamw_torch"].items():
        torch.testing.assert_close(steps["adamw_torch_fused"][name], value, rtol=1e-5, atol=1e-6)


def test_bfloat16_reference_gives_log2_at_the_first_step(tmp_path):
    trainer = DPOTrainer(make_policy(), args=config(tmp_path, max_steps=1, bf16=True, reference_dtype="bfloat16"),
                         train_dataset=bright_dark_rows(4))
    assert {p.dtype for p in trainer.reference_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # float32 master weights
    trainer.train()
    (first,) = dpo_logs(trainer)
    # Policy and reference see the same bfloat16 operands under autocast; only the rounding of the weights that
    # autocast keeps in float32 (norms) differs: the errors agree to bfloat16 precision, the loss is ln 2 to
    # beta/2 times their difference.
    for side in ("chosen", "rejected"):
        assert first[f"error/policy_{side}"] == pytest.approx(first[f"error/ref_{side}"], rel=BF16_EPS)
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-2)


def test_bfloat16_reference_is_refused_without_bf16_or_with_lora(tmp_path):
    with pytest.raises(ValueError, match=r"DPOConfig\.reference_dtype='bfloat16'.*bf16=True"):
        config(tmp_path, reference_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"DPOConfig\.reference_dtype='float16'"):
        config(tmp_path, reference_dtype="float16")
    with pytest.raises(ValueError, match=r"reference_dtype: with LoRA"):
        DPOTrainer(make_policy(), args=config(tmp_path, bf16=True, reference_dtype="bfloat16"),
                   train_dataset=bright_dark_rows(2), peft_config=lora_config())


def test_on_policy_ratio_is_exactly_one_under_bfloat16_autocast(tmp_path):
    # The sampler and the trainer's on-policy call run the transformer under the same bfloat16 autocast, and the
    # KL reference too: the ratio is exactly 1 (debug_ratio_check raises otherwise) and the KL exactly 0.
    args = tiny_config(tmp_path, max_steps=1, bf16=True, debug_ratio_check=True, beta=0.1)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset())
    trainer.train()
    assert logged(trainer, "ratio/min") == logged(trainer, "ratio/max") == [1.0]
    assert logged(trainer, "kl") == [0.0]
    assert logged(trainer, "ratio/on_policy_mismatch_total") == [0.0]


def test_attention_backend(tmp_path):
    with pytest.raises(ValueError, match=r"attention_backend='flash'.*only on a CUDA GPU"):
        DPOConfig(output_dir=str(tmp_path), use_cpu=True, attention_backend="flash")
    with pytest.raises(ValueError, match=r"attention_backend='flash_hub'.*unknown backend"):
        DPOConfig(output_dir=str(tmp_path), use_cpu=True, attention_backend="flash_hub")
    # "_native_math" runs on the CPU: set on every attention processor, and the velocity is SDPA's.
    policy = ovis_policy()
    generator = seeded_generator(0, 1)
    cond = policy.encode_prompt(["a cat"])
    latents = torch.randn(1, policy.num_latent_channels, *policy.latent_size(32, 32), generator=generator)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        sdpa_velocity = policy.predict_velocity(latents, sigma, cond)
    try:
        set_attention_backend(policy.transformer, "_native_math")
        backends = {module.processor._attention_backend for module in policy.transformer.modules()
                    if hasattr(getattr(module, "processor", None), "_attention_backend")}
        assert backends == {AttentionBackendName("_native_math")}
        with torch.no_grad():
            math_velocity = policy.predict_velocity(latents, sigma, cond)
    finally:  # diffusers also makes the backend the process's active one
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName("native"))
    torch.testing.assert_close(math_velocity, sdpa_velocity, rtol=1e-5, atol=1e-5)
