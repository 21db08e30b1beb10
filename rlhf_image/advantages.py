"""Group-relative advantages (GRPO) with the failure policy for unscored samples, and a per-prompt statistics
tracker that keeps each prompt's rewards across the rollouts of an epoch (Flow-GRPO's `PerPromptStatTracker`)."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale_by_std: bool = True,
    batch_std: bool = False,
    batch_rewards: torch.Tensor | None = None,
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
        batch_rewards (`torch.Tensor` of shape `[M]`, *optional*): with `batch_std`, the rewards whose std is
            used; defaults to `rewards`. Pass the rewards gathered from every process to divide by the std of the
            global batch, the same on every process (Flow-GRPO's `global_std`), while `rewards` holds this
            process's whole groups.
        clip (`float`, *optional*): `A_max`.
        eps (`float`, defaults to `1e-4`).

    Returns:
        `torch.Tensor` of shape `[N]`, float32.
    """
    if batch_rewards is not None and not batch_std:
        raise ValueError("group_advantages: batch_rewards is only used with batch_std=True")
    rewards = rewards.float()
    valid = torch.isfinite(rewards)
    advantages = torch.zeros_like(rewards)
    global_std = scored_std(rewards if batch_rewards is None else batch_rewards.float())
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


def scored_std(rewards: torch.Tensor) -> torch.Tensor:
    """Population std of the finite (scored) entries of `rewards` (`[N]`); 0 with fewer than two."""
    scored = rewards[torch.isfinite(rewards)]
    return scored.std(unbiased=False) if scored.numel() > 1 else rewards.new_tensor(0.0)


class PerPromptStatTracker:
    """Each prompt's rewards kept across the rollouts of an epoch, as the baseline of its advantages.

    [`update`] records a rollout's scored rewards under their prompts and returns their advantages against every
    reward recorded for the same prompt since the last [`clear`] (which the trainer calls at an epoch boundary):
    `A = (R - mean_prompt) / (std + eps)`, with `std` the prompt's (or, with `batch_std`, the std of this
    update's scored rewards, Flow-GRPO's `global_std`). Flow-GRPO's `flow_grpo/stat_tracking.py` is the model;
    like [`group_advantages`], an unscored (NaN) reward is not recorded and gets 0, and so does a prompt with fewer
    than two recorded rewards. The state is plain lists of floats ([`state_dict`]): saved in a checkpoint, it
    resumes the statistics exactly.

    Args:
        scale_by_std (`bool`, defaults to `True`), batch_std (`bool`, defaults to `False`),
        clip (`float`, *optional*), eps (`float`, defaults to `1e-4`): as in [`group_advantages`].
    """

    def __init__(self, scale_by_std: bool = True, batch_std: bool = False, clip: float | None = None,
                 eps: float = 1e-4):
        self.options = {"scale_by_std": scale_by_std, "batch_std": batch_std, "clip": clip, "eps": eps}
        self.history: dict[str, list[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Record `rewards` (`[N]`, NaN where unscored) of `prompts` (`N` strings) and return their advantages
        (`[N]`, float32). Pass every process's samples (gathered), so that all processes keep the same state."""
        rewards = rewards.detach().double().cpu()
        if len(prompts) != rewards.numel():
            raise ValueError(f"PerPromptStatTracker.update: {len(prompts)} prompts for {rewards.numel()} rewards")
        ids = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        past = [(ids[p], r) for p in ids for r in self.history.get(p, [])]
        for prompt, reward in zip(prompts, rewards.tolist()):
            if reward == reward:  # NaN (unscored) is not a statistic
                self.history.setdefault(prompt, []).append(reward)
        # The current rewards after the history of their prompts: one group per prompt, the batch std over `rewards`.
        all_rewards = torch.tensor([r for _, r in past] + rewards.tolist(), dtype=torch.float64)
        group_ids = torch.tensor([i for i, _ in past] + [ids[p] for p in prompts])
        batch_rewards = rewards if self.options["batch_std"] else None
        advantages = group_advantages(all_rewards, group_ids, batch_rewards=batch_rewards, **self.options)
        return advantages[len(past):]

    def clear(self) -> None:
        """Forget every prompt's rewards (at an epoch boundary)."""
        self.history = {}

    def stats(self) -> dict[str, float]:
        """`{"prompts": distinct prompts recorded, "mean_rewards_per_prompt": ...}` for logging."""
        counts = [len(v) for v in self.history.values()]
        return {"prompts": float(len(counts)), "mean_rewards_per_prompt": sum(counts) / max(1, len(counts))}

    def state_dict(self) -> dict:
        """JSON-serialisable state (Python floats round-trip exactly through JSON)."""
        return {"options": dict(self.options), "history": {p: list(v) for p, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["options"] != self.options:
            raise ValueError(f"PerPromptStatTracker state was saved with {state['options']}, this tracker has "
                             f"{self.options}: build the tracker with the options of the run being resumed")
        self.history = {p: [float(r) for r in v] for p, v in state["history"].items()}
