"""A policy for a diffusers flow-matching pipeline that no family adapter covers: record the stock pipeline's own
denoising loop, replay it for training.

Sampling runs the unmodified pipeline with two stand-ins: its scheduler is a `FlowMatchEulerDiscreteScheduler`
whose `step` takes the library's stochastic step (SDE or CPS, per-sample generators, log-prob recorded), and its
transformer is wrapped so that every call's inputs and outputs are recorded. What the pipeline does between the
transformer calls of a step and `scheduler.step` (CFG, a batch split, a sign flip, stacking a list) is identified
from the recorded tensors as a linear map `velocity = W @ outputs` (rows = samples, least squares, checked to float
rounding); the step then uses `W @ outputs` itself, so that training, which replays the recorded calls through the
trainable transformer and applies the same `W`, recomputes the recorded log-probs bit for bit (ratio exactly 1).
A combination that is not linear (a norm-rescaled CFG) is refused with a message saying so.

Limits: the pipeline's transformer output must have the layout of the latents it steps (true of the text-to-image
pipelines in diffusers); only GRPO-style training is served (no `encode_images` for DPO/SFT); a trainer must train on
whole recorded batches (the batch a pipeline call sampled), since that is the batch the replay reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .policy import flow_matching_scheduler_config
from .sde import STEP_FUNCTIONS, ode_step

_SNAP_DECIMALS = 4  # CFG weights (1 - g, g, -1, 0) are short decimals: snap the least-squares solution to them


@dataclass
class RecordedStep:
    """One stochastic step of a recorded pipeline run.

    Args:
        calls (`list[tuple[tuple, dict]]`): the transformer calls of the step (positional and keyword inputs).
        weights (`torch.Tensor` of shape `[B, R]`): `velocity rows = weights @ output rows` (all calls' rows).
        sample, prev_sample (`torch.Tensor`): the latents entering and leaving the step (the pipeline's layout).
        sigma, sigma_next (`float`): the step's noise levels.
        log_prob (`torch.Tensor` of shape `[B]`): recorded while sampling.
    """

    calls: list[tuple[tuple, dict]]
    weights: torch.Tensor
    sample: torch.Tensor
    prev_sample: torch.Tensor
    sigma: float
    sigma_next: float
    log_prob: torch.Tensor


@dataclass
class GenericTrajectory:
    """The recorded run: `steps[j]` is the stochastic step `step_indices[j]`; `output` is the pipeline's output."""

    prompts: list[str]
    seeds: list[int]
    sde_type: str
    noise_level: float
    sigmas: torch.Tensor
    step_indices: list[int]
    steps: list[RecordedStep]
    output: Any = None


def _output_rows(output: Any) -> torch.Tensor:
    """A transformer's output as rows `[R, D]`: a tensor's batch rows, or one row per tensor of a list."""
    out = output.sample if hasattr(output, "sample") else output[0]
    if isinstance(out, (list, tuple)):
        return torch.stack([o.reshape(-1) for o in out])
    return out.reshape(out.shape[0], -1)


def combine(weights: torch.Tensor, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`weights @ rows` in float32, shaped like `like` (the latents)."""
    return (weights.to(rows.device, torch.float32) @ rows.float()).reshape(like.shape)


def identify_combination(rows: torch.Tensor, velocity: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """The `[B, R]` weights with `velocity rows = weights @ rows`, snapped to short decimals when they still fit.

    Raises:
        ValueError: when no linear map reproduces `velocity` to float rounding, or the rows do not determine one.
    """
    target = velocity.reshape(velocity.shape[0], -1).double()
    source = rows.double()
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"the transformer's output rows have {source.shape[1]} values and the velocity rows "
                         f"{target.shape[1]}: the pipeline reshapes the output before stepping, which the generic "
                         "policy does not follow; write a family adapter")
    if torch.linalg.matrix_rank(source.T) < source.shape[0]:
        raise ValueError("the transformer's output rows are linearly dependent, so the velocity's combination of "
                         "them is ambiguous; write a family adapter")
    weights = torch.linalg.lstsq(source.T, target.T).solution.T
    scale = target.abs().max().item() + 1e-12
    snapped = torch.round(weights, decimals=_SNAP_DECIMALS)
    for candidate in (snapped, weights):
        if (candidate @ source - target).abs().max().item() <= rtol * scale:
            return candidate.float()
    raise ValueError("the pipeline combines the transformer's outputs into the velocity it passes to "
                     "scheduler.step in a way that is not linear (a norm-rescaled CFG, for example), so it cannot be "
                     "replayed exactly; disable that option of the pipeline, run without CFG, or write a family "
                     "adapter (rlhf_image.register_family)")


class _RecordingTransformer(torch.nn.Module):
    """Wraps a transformer: records each call's inputs and output; every other attribute is the transformer's."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[tuple, dict, Any]] = []

    def forward(self, *args, **kwargs):
        output = self.inner(*args, **kwargs)
        self.calls.append((args, kwargs, output))
        return output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _recording_scheduler(config: dict, recorder: _RecordingTransformer, generators,
                         trajectory: GenericTrajectory, window: tuple[int, int]):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

    class RecordingScheduler(FlowMatchEulerDiscreteScheduler):
        """The library's step in place of Euler's: `W @ outputs` as the velocity, stochastic inside `window`."""

        def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
            if self.step_index is None:
                self._init_step_index(timestep)
            index = self.step_index
            sigma, sigma_next = self.sigmas[index].item(), self.sigmas[index + 1].item()
            calls, recorder.calls[:] = list(recorder.calls), []
            rows = torch.cat([_output_rows(output) for _, _, output in calls])
            weights = identify_combination(rows, model_output)
            velocity = combine(weights, rows, sample)
            if window[0] <= index < window[1]:
                prev, log_prob, _, _ = STEP_FUNCTIONS[trajectory.sde_type](
                    velocity, sample, sigma, sigma_next, trajectory.noise_level, generators)
                trajectory.step_indices.append(index)
                trajectory.steps.append(RecordedStep([(a, k) for a, k, _ in calls], weights, sample.detach(),
                                                     prev.detach(), sigma, sigma_next, log_prob.detach()))
            else:
                prev = ode_step(velocity, sample, sigma, sigma_next)
            prev = prev.to(sample.dtype)
            self._step_index += 1
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    return RecordingScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


class GenericFlowPolicy:
    """Drives any diffusers text-to-image pipeline whose denoising loop calls `self.scheduler.step` on a
    `FlowMatchEulerDiscreteScheduler`, without a family adapter (see the module docstring).

    Args:
        pipe (`diffusers.DiffusionPipeline`): the stock pipeline; its `transformer` is what trains.
    """

    def __init__(self, pipe: Any):
        self.scheduler_config = flow_matching_scheduler_config(pipe.scheduler)
        self.pipe = pipe
        self.transformer = pipe.transformer

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], *, num_steps: int, sde_type: str = "sde",
               noise_level: float = 0.7, window: tuple[int, int] | None = None, **pipe_kwargs: Any
               ) -> GenericTrajectory:
        """One pipeline call over `prompts` (sample `i` from a generator seeded `seeds[i]`, which draws its initial
        noise and then its step noise), recording the steps `window` (default: all when `sde_type` is not `"ode"`).
        `pipe_kwargs` go to the pipeline (`guidance_scale`, `height`, `width`, ...)."""
        if sde_type != "ode" and sde_type not in STEP_FUNCTIONS:
            raise ValueError(f"unknown sde_type {sde_type!r}; use 'ode', 'sde' or 'cps'")
        window = window if window is not None else ((0, 0) if sde_type == "ode" else (0, num_steps))
        trajectory = GenericTrajectory(list(prompts), list(seeds), sde_type, noise_level, torch.empty(0), [], [])
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        recorder = _RecordingTransformer(self.transformer)
        scheduler = _recording_scheduler(self.scheduler_config, recorder, generators, trajectory, window)
        original = self.pipe.transformer, self.pipe.scheduler
        # Bypass DiffusionPipeline.__setattr__, which would rewrite the pipeline's config for the stand-ins.
        object.__setattr__(self.pipe, "transformer", recorder)
        object.__setattr__(self.pipe, "scheduler", scheduler)
        try:
            trajectory.output = self.pipe(prompt=list(prompts), generator=generators, num_inference_steps=num_steps,
                                          **pipe_kwargs)
        finally:
            object.__setattr__(self.pipe, "transformer", original[0])
            object.__setattr__(self.pipe, "scheduler", original[1])
        trajectory.sigmas = scheduler.sigmas.detach().cpu()
        return trajectory

    def log_prob(self, trajectory: GenericTrajectory, j: int, transformer: torch.nn.Module | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-prob `[B]` of the recorded step `j` under `transformer` (default: the pipeline's, or a peft / DDP
        wrapper of it), replaying the recorded calls; differentiable. Returns `(log_prob, mean, std)`."""
        step = trajectory.steps[j]
        transformer = self.transformer if transformer is None else transformer
        rows = torch.cat([_output_rows(transformer(*args, **kwargs)) for args, kwargs in step.calls])
        velocity = combine(step.weights, rows, step.sample)
        _, log_prob, mean, std = STEP_FUNCTIONS[trajectory.sde_type](
            velocity, step.sample, step.sigma, step.sigma_next, trajectory.noise_level, prev_sample=step.prev_sample)
        return log_prob, mean, std
