"""Building the trained model already sharded under DeepSpeed ZeRO-3, and the frozen parts whole.

Under ZeRO-3 every process ends up holding `1 / world_size` of the trained transformer's parameters, but a
diffusers model built the usual way (`Model(**config)`, `from_config`) is first created whole in every
process and only partitioned when DeepSpeed wraps it: a 7B MMDiT in float32 costs about 30 GB of host memory
per process before training starts. [`zero3_init`] creates it under `deepspeed.zero.Init`, which partitions
each submodule's parameters right after that submodule is constructed, so a process never holds more than its
shard plus one submodule. The random initialisation is the same (each parameter is initialised whole, from the
same random stream, before it is partitioned), so training from it gives the same losses.

The opposite problem hits frozen parts: while a ZeRO-3 `TrainingArguments` exists, transformers'
`from_pretrained` (and so diffusers' pipeline loading) partitions every transformers model it loads, such as a
Qwen3 text encoder. Frozen encoders are never handed to DeepSpeed, so nothing would gather their partitions;
[`without_zero3_init`] loads them whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.integrations import deepspeed as hf_deepspeed


def zero3_enabled() -> bool:
    """Whether a ZeRO-3 DeepSpeed config is active in this process (a `TrainingArguments` with one exists)."""
    return hf_deepspeed.is_deepspeed_zero3_enabled()


@contextmanager
def zero3_init() -> Iterator[None]:
    """Modules constructed inside are partitioned across the data-parallel processes as they are built
    (`deepspeed.zero.Init` with the active ZeRO-3 config); a no-op when no ZeRO-3 config is active.

    Build the `TrainingArguments` (or trainer config) with the ZeRO-3 `deepspeed` config first, then the model
    inside this context, then the trainer. Only the trained model belongs here: see [`without_zero3_init`].
    """
    if not zero3_enabled():
        yield
        return
    import deepspeed

    if not deepspeed.comm.is_initialized():
        # zero.Init counts the processes through deepspeed.comm; reuse the torch.distributed group when a
        # launcher (or accelerate) already made one.
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        deepspeed.init_distributed(dist_backend=backend)
    with deepspeed.zero.Init(config_dict_or_path=hf_deepspeed.deepspeed_config()):
        yield


@contextmanager
def without_zero3_init() -> Iterator[None]:
    """Inside, transformers' `from_pretrained` loads models whole even while a ZeRO-3 config is active (for the
    frozen text encoders and VAE, which DeepSpeed never wraps); the config is active again afterwards."""
    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def local_parameter_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """`(held, full)`: bytes of `module`'s parameters this process holds (its ZeRO-3 partitions, or the whole
    tensors of an unpartitioned model) and bytes of the whole model."""
    held = full = 0
    for parameter in module.parameters():
        size = parameter.element_size()
        if hasattr(parameter, "ds_tensor"):  # a ZeRO-3 parameter: `ds_numel` whole, `ds_tensor` the local shard
            held += parameter.ds_tensor.numel() * size
            full += parameter.ds_numel * size
        else:
            held += parameter.numel() * size
            full += parameter.numel() * size
    return held, full
