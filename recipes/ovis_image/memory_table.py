"""GPU memory per device for full-weight training of the 7.37B Ovis-Image MMDiT under DeepSpeed ZeRO-2 and ZeRO-3,
from DeepSpeed's own estimators, next to the hand formulas, plus the frozen parts every GPU holds.

    python -m rlhf_image.recipes.ovis_image.memory_table

Model states only (bf16 parameters and gradients, fp32 master weights and Adam moments, no offload): activations
come on top and depend on resolution, batch size and gradient checkpointing. The transformer is built on the meta
device (no memory). DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs_all_live` cannot take that meta model:
they count parameters once per `data_ptr()`, which is 0 for every meta tensor. So the parameter counts are taken
here and passed to the estimator those functions (and their `_all_cold` forms) call.
"""

from __future__ import annotations

import json
import os

import torch

# The frozen text encoder: Ovis2.5-2B's Qwen3 language model, 2.57B parameters (Ovis-Image report).
TEXT_ENCODER_PARAMS = 2_570_000_000
# FLUX.1-schnell's AutoencoderKL (16 latent channels), the frozen VAE.
FLUX_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                       layers_per_block=2, down_block_types=["DownEncoderBlock2D"] * 4,
                       up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, use_quant_conv=False,
                       use_post_quant_conv=False)
GPU_COUNTS = (8, 16, 32, 64)
GPUS_PER_NODE = 8
GIB = 2**30
CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def transformer_params() -> tuple[int, int]:
    """`(total, largest_layer)` parameters of the 7B MMDiT: all parameters (each counted once), and the most held
    directly by one module (what ZeRO-3 gathers at once for one layer; DeepSpeed's definition)."""
    from rlhf_image.recipes.ovis_image.model import ovis_image_7b_transformer

    model = ovis_image_7b_transformer(device="meta")
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return total, largest


def vae_params() -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
    return sum(p.numel() for p in vae.parameters())


def deepspeed_estimates(total: int, largest: int, num_gpus: int) -> dict[str, int]:
    """GPU bytes of the model states per device from DeepSpeed's estimators (no CPU offload)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = max(1, num_gpus // GPUS_PER_NODE)
    per_node = num_gpus // nodes
    _, zero2 = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=False,
                                                        cpu_offload_params=False)
    return {"zero2": zero2, "zero3": zero3}


def hand_formulas(total: int, num_gpus: int) -> dict[str, float]:
    """ZeRO-2: bf16 parameters replicated, bf16 gradients and fp32 Adam states (master, m, v) sharded:
    `2P + (2P + 12P) / N`. ZeRO-3: everything sharded: `(2P + 2P + 12P) / N`."""
    return {"zero2": 2 * total + (2 * total + 12 * total) / num_gpus, "zero3": (2 + 2 + 12) * total / num_gpus}


def bucket_sizes() -> dict[str, int]:
    """The communication buffers of the recipe's DeepSpeed configs, in elements."""
    with open(os.path.join(CONFIG_DIR, "ds_zero2.json")) as f:
        zero2 = json.load(f)["zero_optimization"]
    with open(os.path.join(CONFIG_DIR, "ds_zero3.json")) as f:
        zero3 = json.load(f)["zero_optimization"]
    return {"zero2_reduce": int(zero2["reduce_bucket_size"]), "zero2_allgather": int(zero2["allgather_bucket_size"]),
            "zero3_max_live": int(zero3["stage3_max_live_parameters"])}


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f}"


def memory_table() -> str:
    """The markdown tables of `main`."""
    total, largest = transformer_params()
    frozen_bf16 = 2 * (TEXT_ENCODER_PARAMS + vae_params())
    lines = [
        f"Transformer: P = {total:,} trainable parameters (largest layer {largest:,}); model states per GPU in GiB.",
        "",
        "| GPUs (nodes x 8) | ZeRO-2, DeepSpeed | ZeRO-2, 2P + 14P/N | ZeRO-3, DeepSpeed | ZeRO-3, 16P/N "
        "| ZeRO-2 + frozen bf16 | ZeRO-3 + frozen bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for num_gpus in GPU_COUNTS:
        estimate, hand = deepspeed_estimates(total, largest, num_gpus), hand_formulas(total, num_gpus)
        lines.append(f"| {num_gpus} ({max(1, num_gpus // GPUS_PER_NODE)} x {min(num_gpus, GPUS_PER_NODE)}) "
                     f"| {gib(estimate['zero2'])} | {gib(hand['zero2'])} | {gib(estimate['zero3'])} "
                     f"| {gib(hand['zero3'])} | {gib(estimate['zero2'] + frozen_bf16)} "
                     f"| {gib(estimate['zero3'] + frozen_bf16)} |")
    vae = vae_params()
    buckets = bucket_sizes()
    lines += [
        "",
        "| replicated on every GPU, not sharded by ZeRO | parameters | GiB in bf16 | GiB in fp32 |",
        "|---|---|---|---|",
        f"| frozen text encoder (Qwen3, Ovis2.5-2B) | {TEXT_ENCODER_PARAMS:,} | {gib(2 * TEXT_ENCODER_PARAMS)} "
        f"| {gib(4 * TEXT_ENCODER_PARAMS)} |",
        f"| frozen VAE (FLUX.1-schnell) | {vae:,} | {gib(2 * vae)} | {gib(4 * vae)} |",
        f"| DPO reference: frozen copy of the transformer (full-weight DPO) | {total:,} | {gib(2 * total)} "
        f"| {gib(4 * total)} |",
        f"| ZeRO-2 reduce / all-gather buckets (ds_zero2.json, elements) | {buckets['zero2_reduce']:,} / "
        f"{buckets['zero2_allgather']:,} | {gib(2 * buckets['zero2_reduce'])} / "
        f"{gib(2 * buckets['zero2_allgather'])} | |",
        f"| ZeRO-3 stage3_max_live_parameters (ds_zero3.json), upper bound | {buckets['zero3_max_live']:,} "
        f"| {gib(2 * buckets['zero3_max_live'])} | |",
    ]
    return "\n".join(lines)


def main() -> None:
    print(memory_table())


if __name__ == "__main__":
    main()
