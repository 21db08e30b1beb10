"""Exponential moving average of trainable weights, shard-aware under DeepSpeed ZeRO-3.

After each optimizer step `shadow = decay * shadow + (1 - decay) * param`, accumulated in float32 from
the parameter as stored (bf16 weights under DeepSpeed bf16). Under ZeRO-3 a parameter is partitioned:
each rank holds a flat slice of it (`param.ds_tensor`) and the EMA keeps the average of that local
slice, so it costs no communication and no full-model copy; copying the shadow back into the slice
makes the next gathered forward (evaluation, saving) use the EMA weights.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

EMA_FILE = "ema.safetensors"  # in a checkpoint; under ZeRO-3 each rank writes its own shard file


def is_zero3_partitioned(param: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed ZeRO-3 manages (partitions) `param`."""
    if "deepspeed" not in sys.modules:  # optional dependency; nothing is partitioned without it
        return False
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    return is_zero_param(param)


def local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of `param` this rank stores: the ZeRO-3 partition (`param.ds_tensor`), else the tensor."""
    return param.ds_tensor if is_zero3_partitioned(param) else param.data


class EMAModel:
    """EMA of named parameters.

    Args:
        named_parameters (`list[tuple[str, torch.nn.Parameter]]`): the parameters to average.
        decay (`float`): weight of the running average per update, in [0, 1).
        warmup (`bool`, defaults to `False`): use `min(decay, (1 + t) / (10 + t))` after optimizer step `t = 1, 2,
            ...` (diffusers' `EMAModel` and Flow-GRPO's schedule), so that early averages are not dominated by the
            initial weights.
        update_every (`int`, defaults to `1`): average after every this many optimizer steps only (Flow-GRPO: 8).

    The state is the shadow weights alone: the decay is a function of the optimizer step, so a resumed run (which
    knows its step) continues exactly.
    """

    def __init__(self, named_parameters: list[tuple[str, torch.nn.Parameter]], decay: float, warmup: bool = False,
                 update_every: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be at least 1, got {update_every}")
        self.decay, self.warmup, self.update_every = decay, warmup, update_every
        self.params = dict(named_parameters)
        self.shadow = {name: local_tensor(p).detach().float().clone() for name, p in self.params.items()}

    def current_decay(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def step(self, step: int) -> bool:
        """Called after optimizer step `step` (1-based): average the current parameters in if `step` is a multiple
        of `update_every`. Returns whether it did."""
        if step % self.update_every:
            return False
        self.update(self.current_decay(step))
        return True

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """`shadow <- decay * shadow + (1 - decay) * param` for every parameter (its local partition)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        for name, param in self.params.items():
            self.shadow[name].mul_(decay).add_(local_tensor(param).float(), alpha=1.0 - decay)

    @contextmanager
    def applied(self):
        """Temporarily replace the parameters (their local partitions) by the EMA weights."""
        backup = {name: local_tensor(p).detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                local_tensor(param).copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    local_tensor(param).copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(f"EMA state does not match the model: missing {sorted(set(self.shadow) - set(state))[:5]}, "
                             f"unexpected {sorted(set(state) - set(self.shadow))[:5]}")
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name} has shape {tuple(tensor.shape)}, the model's "
                                 f"{tuple(self.shadow[name].shape)} (a ZeRO-3 EMA resumes only at the same world size)")
            self.shadow[name].copy_(tensor)
