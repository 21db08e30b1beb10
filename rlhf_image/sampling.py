"""The in-process sampler: ODE, SDE or CPS generation with recorded log-probs, returning a `Trajectory`.

Determinism: every sample owns a `torch.Generator` seeded with its seed, which draws its initial noise
and then its step noise in order (a seed given as a pair `(initial, steps)` seeds one generator for the initial
noise and another for the steps, so that samples can share a start and differ in their steps); and the
transformer is always called on micro-batches of exactly `micro_batch_size` rows (the last one padded), because matrix kernels give bit-different rows for
different batch sizes. So sample `i` is bit-identical whatever batch or position it is generated in,
and a trainer that recomputes log-probs on micro-batches of the same size gets a ratio of exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import PIL.Image
import torch

from .policy import Conditioning, FlowPolicy, tensor_to_pil
from .sde import STEP_FUNCTIONS, ode_step


@dataclass
class Trajectory:
    """A batch of generations with everything a policy-gradient update needs.

    Args:
        prompts (`list[str]`), seeds (`list[int | tuple[int, int]]`): one per sample (see [`generate`]).
        sigmas (`torch.Tensor` of shape `[T + 1]`): the full schedule, ending at 0.
        step_indices (`torch.Tensor` of shape `[K]`): the stochastic (recorded) steps, contiguous.
        latents (`torch.Tensor` of shape `[B, K + 1, C, h, w]`): states through the recorded window:
            `latents[:, j]` enters step `step_indices[j]`, `latents[:, j + 1]` leaves it.
        log_probs (`torch.Tensor` of shape `[B, K]`): log-probs recorded when sampling (float32).
        means (`torch.Tensor` of shape `[B, K, C, h, w]`): the Gaussian means of the recorded transitions when
            sampling (float32), for losses that compare the policy's transition with the sampler's (GRPO-Guard).
        final_latents (`torch.Tensor` of shape `[B, C, h, w]`).
        images (`torch.Tensor` of shape `[B, 3, H, W]`, *optional*): decoded, in [0, 1].
        cond, negative_cond ([`Conditioning`]): the prompt conditioning (negative only with CFG).
        sde_type (`str`), noise_level (`float`), guidance_scale (`float`), height, width (`int`).
    """

    prompts: list[str]
    seeds: list[int | tuple[int, int]]
    sigmas: torch.Tensor
    step_indices: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    final_latents: torch.Tensor
    images: torch.Tensor | None
    cond: Conditioning
    negative_cond: Conditioning | None
    sde_type: str
    noise_level: float
    guidance_scale: float
    height: int
    width: int
    extra: dict = field(default_factory=dict)

    _batched = ("latents", "log_probs", "means", "final_latents", "images")

    def __len__(self) -> int:
        return len(self.prompts)

    def pil_images(self) -> list[PIL.Image.Image]:
        return tensor_to_pil(self.images)

    def select(self, index: list[int] | torch.Tensor) -> Trajectory:
        """The samples `index`, in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._batched:
            if values[name] is not None:
                values[name] = values[name][index]
        values["prompts"] = [self.prompts[i] for i in index.tolist()]
        values["seeds"] = [self.seeds[i] for i in index.tolist()]
        values["cond"] = self.cond.select(index)
        values["negative_cond"] = None if self.negative_cond is None else self.negative_cond.select(index)
        return Trajectory(**values)

    @staticmethod
    def cat(items: list[Trajectory]) -> Trajectory:
        """Concatenate trajectories sampled with the same schedule and window."""
        first = items[0]
        values = {f.name: getattr(first, f.name) for f in fields(first)}
        for name in Trajectory._batched:
            if values[name] is not None:
                values[name] = torch.cat([getattr(t, name) for t in items])
        values["prompts"] = [p for t in items for p in t.prompts]
        values["seeds"] = [s for t in items for s in t.seeds]
        values["cond"] = Conditioning.cat([t.cond for t in items])
        if first.negative_cond is not None:
            values["negative_cond"] = Conditioning.cat([t.negative_cond for t in items])
        return Trajectory(**values)


def _pad(rows: list, size: int) -> list:
    return rows + [rows[-1]] * (size - len(rows))


def _generators(seeds: list[int | tuple[int, int]]) -> tuple[list[torch.Generator], list[torch.Generator]]:
    """The generators of the initial noise and of the step noise of each sample: one generator for both from an
    integer seed, two from an `(initial, steps)` pair."""
    initial, steps = [], []
    for seed in seeds:
        if isinstance(seed, (tuple, list)):
            initial.append(torch.Generator("cpu").manual_seed(int(seed[0])))
            steps.append(torch.Generator("cpu").manual_seed(int(seed[1])))
        else:
            generator = torch.Generator("cpu").manual_seed(int(seed))
            initial.append(generator)
            steps.append(generator)
    return initial, steps


@torch.no_grad()
def generate(
    policy: FlowPolicy,
    prompts: list[str],
    seeds: list[int | tuple[int, int]],
    *,
    height: int,
    width: int,
    num_steps: int,
    sde_type: str = "ode",
    noise_level: float = 0.7,
    window: tuple[int, int] | None = None,
    guidance_scale: float = 1.0,
    micro_batch_size: int = 4,
    decode: bool = True,
    cond: Conditioning | None = None,
    negative_cond: Conditioning | None = None,
) -> Trajectory:
    """Generate one image per prompt and record the stochastic transitions.

    Args:
        policy ([`FlowPolicy`]).
        prompts (`list[str]`), seeds (`list[int | tuple[int, int]]`): one seed per sample: an integer seeds the
            sample's one generator (initial noise, then step noise); a pair `(initial, steps)` seeds the initial
            noise and the step noise apart (samples with the same `initial` start from the same noise).
        height, width (`int`): image size in pixels.
        num_steps (`int`): denoising steps `T`.
        sde_type (`str`, defaults to `"ode"`): `"ode"` (deterministic Euler), `"sde"` (Flow-GRPO) or `"cps"`.
        noise_level (`float`, defaults to 0.7): SDE/CPS noise scale `a`.
        window (`tuple[int, int]`, *optional*): steps `[start, end)` that are stochastic and recorded
            (Flow-GRPO-Fast, MixGRPO); the others are ODE steps. Defaults to all steps for SDE/CPS.
        guidance_scale (`float`, defaults to 1.0): true CFG scale against `policy.negative_prompt`.
        micro_batch_size (`int`, defaults to 4): rows per transformer call (see the module docstring).
        decode (`bool`, defaults to `True`): decode final latents into `images`.
        cond, negative_cond ([`Conditioning`], *optional*): precomputed conditioning for `prompts`.

    Returns:
        [`Trajectory`].
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt")
    if sde_type != "ode" and sde_type not in STEP_FUNCTIONS:
        raise ValueError(f"unknown sde_type {sde_type!r}; use 'ode', 'sde' or 'cps'")
    if window is None:
        window = (0, 0) if sde_type == "ode" else (0, num_steps)
    start, end = window
    if sde_type == "ode" and end > start:
        raise ValueError("an SDE window needs sde_type 'sde' or 'cps', not 'ode'")
    if not 0 <= start <= end <= num_steps:
        raise ValueError(f"window {window} is outside the schedule of {num_steps} steps: need 0 <= start <= end <= {num_steps}")

    use_cfg = guidance_scale > 1
    if cond is None:
        cond = policy.encode_prompt(prompts)
    if use_cfg and negative_cond is None:
        negative_cond = policy.encode_negative_prompt(len(prompts))
    sigmas = policy.inference_sigmas(num_steps, height, width)
    step_fn = STEP_FUNCTIONS.get(sde_type)

    chunks = []
    for first in range(0, len(prompts), micro_batch_size):
        rows = list(range(first, min(first + micro_batch_size, len(prompts))))
        padded = _pad(rows, micro_batch_size)
        initial_generators, generators = _generators([seeds[i] for i in padded])
        chunk_cond = cond.select(padded)
        chunk_neg = negative_cond.select(padded) if use_cfg else None
        latents = policy.initial_noise(height, width, initial_generators)
        states, log_probs, means = [], [], []
        for step in range(num_steps):
            sigma, sigma_next = sigmas[step], sigmas[step + 1]
            velocity = policy.predict_velocity(latents, sigma, chunk_cond, chunk_neg, guidance_scale)
            if start <= step < end:
                states.append(latents)
                latents, log_prob, mean, _ = step_fn(velocity, latents, sigma, sigma_next, noise_level, generators)
                log_probs.append(log_prob)
                means.append(mean)
                if step == end - 1:  # the state leaving the window, not the final latents
                    states.append(latents)
            else:
                latents = ode_step(velocity, latents, sigma, sigma_next)
        n = len(rows)
        chunks.append({
            "latents": torch.stack(states, dim=1)[:n] if states else latents.new_zeros(n, 0, *latents.shape[1:]),
            "log_probs": torch.stack(log_probs, dim=1)[:n] if log_probs else latents.new_zeros(n, 0),
            "means": torch.stack(means, dim=1)[:n] if means else latents.new_zeros(n, 0, *latents.shape[1:]),
            "final_latents": latents[:n],
            "images": policy.decode(latents)[:n] if decode else None,
        })

    def gather(name):
        return None if chunks[0][name] is None else torch.cat([c[name] for c in chunks])

    return Trajectory(
        prompts=list(prompts), seeds=list(seeds), sigmas=sigmas,
        step_indices=torch.arange(start, end), latents=gather("latents"), log_probs=gather("log_probs"),
        means=gather("means"),
        final_latents=gather("final_latents"), images=gather("images"), cond=cond,
        negative_cond=negative_cond if use_cfg else None, sde_type=sde_type, noise_level=noise_level,
        guidance_scale=guidance_scale, height=height, width=width,
    )


def transition_log_prob(
    policy: FlowPolicy, trajectory: Trajectory, j: int, guidance_scale: float | None = None, *,
    transformer: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of the recorded transition `j` (step `trajectory.step_indices[j]`) under `policy`'s
    current weights; differentiable. Call it on micro-batches of the size used for sampling to get a
    bit-exact ratio on-policy.

    Args:
        guidance_scale (`float`, *optional*): CFG used in training; defaults to the rollout's scale.
        transformer (`torch.nn.Module`, *optional*): the module to call (a trainer's DDP / DeepSpeed wrapper, or a
            reference); see `FlowPolicy.predict_velocity`.

    Returns:
        `(log_prob [B], mean [B, C, h, w], std)`, float32.
    """
    step = int(trajectory.step_indices[j])
    sigma, sigma_next = trajectory.sigmas[step], trajectory.sigmas[step + 1]
    scale = trajectory.guidance_scale if guidance_scale is None else guidance_scale
    velocity = policy.predict_velocity(trajectory.latents[:, j], sigma, trajectory.cond,
                                       trajectory.negative_cond if scale > 1 else None, scale, transformer=transformer)
    _, log_prob, mean, std = STEP_FUNCTIONS[trajectory.sde_type](
        velocity, trajectory.latents[:, j], sigma, sigma_next, trajectory.noise_level,
        prev_sample=trajectory.latents[:, j + 1])
    return log_prob, mean, std
