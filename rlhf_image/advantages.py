"""Group-relative advantages (GRPO) with the failure policy for unscored samples."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale_by_std: bool = True,
    batch_std: bool = False,
    clip: float | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """`A = clip((R - mean_group) / (std_group + eps), -clip, clip)`, one value per sample.

    A sample whose reward is NaN (not scored) gets advantage 0 and is left out of its group's mean and
    std, so it never poisons the other samples. A group with fewer than two scored samples gives 0.

    Args:
        rewards (`torch.Tensor` of shape `[N]`): total reward per sample, NaN where unscored.
        group_ids (`torch.Tensor` of shape `[N]`): integer group (prompt) id per sample.
        scale_by_std (`bool`, defaults to `True`): divide by the std (Dr. GRPO sets this off).
        batch_std (`bool`, defaults to `False`): use the std of the whole batch instead of the group's
            (the group mean is still subtracted).
        clip (`float`, *optional*): `A_max`.
        eps (`float`, defaults to `1e-4`).

    Returns:
        `torch.Tensor` of shape `[N]`, float32.
    """
    rewards = rewards.float()
    valid = torch.isfinite(rewards)
    advantages = torch.zeros_like(rewards)
    valid_rewards = rewards[valid]
    global_std = valid_rewards.std(unbiased=False) if valid_rewards.numel() > 1 else rewards.new_tensor(0.0)
    for group in torch.unique(group_ids):
        members = (group_ids == group) & valid
        if members.sum() < 2:
            continue
        values = rewards[members]
        centred = values - values.mean()
        if scale_by_std:
            std = global_std if batch_std else values.std(unbiased=False)
            centred = centred / (std + eps)
        advantages[members] = centred
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages
