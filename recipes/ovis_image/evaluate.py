"""Text-rendering evaluation of a policy on held-out prompts (the CVTG-2K measures, at demo scale).

Each held-out prompt quotes a target string that never occurs in training (the `"eval"` split of
[`TextRenderingDataset`], disjoint from `"train"` by construction). The policy renders one image per
prompt with the ODE sampler (fixed seeds, so two checkpoints are compared on the same noise); OCR reads
each image once, and from that reading come:

- exact match (CVTG-2K's word accuracy for single-word targets): `normalize(ocr) == normalize(target)`,
  with `rlhf_image.rewards.normalize_text` (lowercase, whitespace removed);
- NED: `levenshtein(p, g) / max(len(p), len(g))` on the normalised strings (`rlhf_image.rewards.normalized_edit_distance`);
- the OCR reward of training (`rlhf_image.rewards.ocr_accuracy`: 1 if the target is inside the reading, else
  `1 - min(lev, len(g)) / len(g)`);

and, when reward objects are passed (e.g. `rlhf_image.rewards.AestheticReward`, `rlhf_image.rewards.CLIPScore`), their mean score.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import PIL.Image
import PIL.ImageDraw

from rlhf_image.rewards import OCRReward
from rlhf_image.rewards.base import RewardFunc, call_reward, reward_name
from rlhf_image.rewards.text_match import normalize_text, normalized_edit_distance, ocr_accuracy
from rlhf_image.policy import FlowPolicy
from rlhf_image.sampling import generate

from .data import TextRenderingDataset


@dataclass
class TextRenderingEval:
    """Scores of one evaluation.

    Args:
        prompts, targets, ocr_texts (`list[str]`): per sample.
        exact (`list[bool]`): normalised OCR reading equals the normalised target.
        ned (`list[float]`): normalised edit distance, in [0, 1].
        ocr_reward (`list[float]`): the training OCR reward, in [0, 1].
        reward_scores (`dict[str, list[float | None]]`): per-sample scores of the extra rewards, by name.
        grid (`PIL.Image.Image`): the images with their targets and readings.
        seconds (`float`): wall time of sampling plus scoring.
    """

    prompts: list[str]
    targets: list[str]
    ocr_texts: list[str]
    exact: list[bool]
    ned: list[float]
    ocr_reward: list[float]
    reward_scores: dict[str, list[float | None]] = field(default_factory=dict)
    grid: PIL.Image.Image | None = field(default=None, repr=False)
    seconds: float = 0.0

    @property
    def word_accuracy(self) -> float:
        """Mean exact match."""
        return sum(self.exact) / len(self.exact)

    @property
    def mean_ned(self) -> float:
        return sum(self.ned) / len(self.ned)

    @property
    def mean_ocr_reward(self) -> float:
        return sum(self.ocr_reward) / len(self.ocr_reward)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Means for logging: `word_accuracy`, `ned`, `ocr_reward` and each extra reward (over the samples
        it could score)."""
        out = {f"{prefix}word_accuracy": self.word_accuracy, f"{prefix}ned": self.mean_ned,
               f"{prefix}ocr_reward": self.mean_ocr_reward}
        for name, values in self.reward_scores.items():
            scored = [v for v in values if v is not None]
            if scored:
                out[f"{prefix}{name}"] = sum(scored) / len(scored)
        return out


def score_text_images(
    images: Sequence[PIL.Image.Image],
    targets: Sequence[str],
    ocr: OCRReward,
    *,
    prompts: Sequence[str] | None = None,
    rewards: Sequence[RewardFunc] = (),
    grid_columns: int = 8,
) -> TextRenderingEval:
    """Score rendered images against their target strings (see the module docstring).

    Args:
        images (`list[PIL.Image.Image]` of length N).
        targets (`list[str]` of length N): non-blank target strings.
        ocr ([`rlhf_image.rewards.OCRReward`]): reads each image once (recognition-only mode suits tight
            single-line renders).
        prompts (`list[str]`, *optional*): passed to the extra rewards; defaults to the targets.
        rewards (`list` of reward callables, defaults to `()`): extra scores, called under the reward
            contract with `target_text=targets`.
        grid_columns (`int`, defaults to 8).

    Returns:
        [`TextRenderingEval`].
    """
    if len(images) != len(targets) or not targets:
        raise ValueError(f"need one target per image and at least one image, got {len(images)} images "
                         f"and {len(targets)} targets")
    if any(not normalize_text(t) for t in targets):
        raise ValueError("a target string is blank: every evaluation prompt must name the text to render")
    start = time.perf_counter()
    prompts = list(prompts) if prompts is not None else list(targets)
    texts = ocr.ocr_text(images)
    exact = [normalize_text(p) == normalize_text(t) for p, t in zip(texts, targets)]
    scores = {reward_name(fn): call_reward(fn, prompts, list(images), target_text=list(targets)) for fn in rewards}
    return TextRenderingEval(
        prompts=prompts, targets=list(targets), ocr_texts=texts, exact=exact,
        ned=[normalized_edit_distance(p, t) for p, t in zip(texts, targets)],
        ocr_reward=[ocr_accuracy(p, t) for p, t in zip(texts, targets)], reward_scores=scores,
        grid=annotated_grid(images, targets, texts, exact, grid_columns), seconds=time.perf_counter() - start)


def evaluate_text_rendering(
    policy: FlowPolicy,
    prompts: Sequence[str],
    targets: Sequence[str],
    seeds: Sequence[int],
    *,
    ocr: OCRReward,
    height: int = 32,
    width: int = 96,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    micro_batch_size: int = 16,
    rewards: Sequence[RewardFunc] = (),
    grid_columns: int = 8,
) -> TextRenderingEval:
    """Render `prompts` with `policy` (ODE sampler, one seed per prompt) and score them.

    Args:
        policy ([`FlowPolicy`]).
        prompts, targets (`list[str]` of length N): prompts quoting their target strings.
        seeds (`list[int]` of length N).
        ocr ([`rlhf_image.rewards.OCRReward`]).
        height, width (`int`, default 32 x 96): image size in pixels.
        num_steps (`int`, defaults to 20): Euler steps.
        guidance_scale (`float`, defaults to 1.0): true CFG scale (1 = no CFG).
        micro_batch_size (`int`, defaults to 16): rows per transformer call.
        rewards, grid_columns: see [`score_text_images`].

    Returns:
        [`TextRenderingEval`]; `seconds` includes sampling.
    """
    if not len(prompts) == len(targets) == len(seeds):
        raise ValueError(f"got {len(prompts)} prompts, {len(targets)} targets and {len(seeds)} seeds: "
                         "pass one target and one seed per prompt")
    start = time.perf_counter()
    trajectory = generate(policy, list(prompts), list(seeds), height=height, width=width, num_steps=num_steps,
                          guidance_scale=guidance_scale, micro_batch_size=micro_batch_size)
    result = score_text_images(trajectory.pil_images(), targets, ocr, prompts=prompts, rewards=rewards,
                               grid_columns=grid_columns)
    result.seconds = time.perf_counter() - start
    return result


def held_out_prompts(
    num_prompts: int = 64,
    *,
    vocabulary: str = "digits",
    min_length: int = 4,
    max_length: int = 4,
    mode: str = "simple",
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Distinct held-out `(prompts, targets)`: captions quoting strings of the `"eval"` split of
    [`TextRenderingDataset`] (never in `"train"`), with the training caption style of `mode`.

    Raises:
        `ValueError`: when the eval split has fewer than `num_prompts` distinct strings.
    """
    data = TextRenderingDataset(20 * num_prompts, mode=mode, split="eval", vocabulary=vocabulary,
                                min_length=min_length, max_length=max_length, seed=seed)
    chosen: dict[str, str] = {}
    for record in data.prompt_records():
        chosen.setdefault(record["target_text"], record["prompt"])
        if len(chosen) == num_prompts:
            return list(chosen.values()), list(chosen)
    raise ValueError(f"the eval split has only {len(chosen)} distinct {vocabulary} strings of length "
                     f"{min_length}-{max_length}; ask for fewer prompts or allow longer strings")


def annotated_grid(images: Sequence[PIL.Image.Image], targets: Sequence[str], readings: Sequence[str],
                   exact: Sequence[bool], columns: int = 8, scale: int = 2) -> PIL.Image.Image:
    """Images in a grid, each upscaled `scale` times over a strip with `target -> reading` (green when
    exact, red otherwise)."""
    width, height = images[0].size
    cell_w, cell_h, strip = width * scale, height * scale, 14
    rows = (len(images) + columns - 1) // columns
    grid = PIL.Image.new("RGB", (columns * cell_w, rows * (cell_h + strip)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, (image, target, reading, ok) in enumerate(zip(images, targets, readings, exact)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + strip)
        grid.paste(image.convert("RGB").resize((cell_w, cell_h), PIL.Image.NEAREST), (x, y))
        label = f"{target} -> {reading or '-'}"
        draw.text((x + 2, y + cell_h + 1), label, fill=(0, 140, 0) if ok else (200, 0, 0))
    return grid
