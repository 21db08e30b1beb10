"""What stages read: image-text datasets, the pair builder's pool, GRPO prompts, DPO pairs, and rewards.

Unreadable images are skipped and counted everywhere: the image-text datasets count them themselves
(`rlhf_image.data`; the flow-matching trainer logs `data/skipped_images`), the pair builder counts pool
images it cannot read (`summary.json`), and [`readable_pairs`] drops and counts pairs with an unreadable
image before DPO.
"""

from __future__ import annotations

import csv
import importlib
import logging
from collections.abc import Sequence
from typing import Any

from rlhf_image.recipes.ovis_image.data import TextRenderingDataset
from rlhf_image.data import (UNREADABLE_IMAGE_ERRORS, ImageFolderDataset, ImageTextDataset, ManifestDataset,
                             ParquetImageDataset, TarShardDataset, open_image)
from rlhf_image.preference_data import PreferencePairDataset, read_jsonl

from .args import DataArguments, RewardArguments

logger = logging.getLogger(__name__)


def _ocr(args: RewardArguments):
    from rlhf_image.rewards import OCRReward

    return OCRReward(use_det=args.ocr_detection, num_threads=args.reward_threads)


def _aesthetic(args: RewardArguments):
    from rlhf_image.rewards import AestheticReward

    return AestheticReward(args.aesthetic_mlp, args.clip_model, device=args.reward_device)


def _clip(args: RewardArguments):
    from rlhf_image.rewards import CLIPScore

    return CLIPScore(args.clip_model, device=args.reward_device)


def _pickscore(args: RewardArguments):
    from rlhf_image.rewards import PickScore

    return PickScore(args.pickscore_model, device=args.reward_device)


# The vision-language rewards load their weights on first use, so a stage that scores in Ray reward workers ships
# them unloaded (pickled) and each worker loads its own copy once.
def _hpsv3(args: RewardArguments):
    from rlhf_image.rewards import HPSv3Reward

    return HPSv3Reward(args.hpsv3_checkpoint, args.hpsv3_base_model, device=args.reward_device)


def _vlm_judge(args: RewardArguments):
    from rlhf_image.rewards import VLMJudgeReward

    return VLMJudgeReward(args.vlm_judge_model, template=args.vlm_judge_template,
                          image_size=args.vlm_judge_image_size, device=args.reward_device)


def _image_reward(args: RewardArguments):
    from rlhf_image.rewards import ImageReward

    return ImageReward(args.image_reward_model, args.image_reward_tokenizer, device=args.reward_device)


# The recipe's reward names (trl style: a small dict in the recipe, no registry in the library).
RECIPE_REWARDS = {"ocr": _ocr, "aesthetic": _aesthetic, "clip": _clip, "pickscore": _pickscore, "hpsv3": _hpsv3,
                  "vlm_judge": _vlm_judge, "imagereward": _image_reward}


def build_rewards(args: RewardArguments) -> list[Any]:
    """The reward callables named by `args.reward_funcs`: recipe names, or `module:attr` import paths (a class
    is instantiated with no arguments, anything else is used as it is)."""
    rewards = []
    for name in args.reward_funcs:
        if name in RECIPE_REWARDS:
            rewards.append(RECIPE_REWARDS[name](args))
            continue
        module, sep, attr = name.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"reward {name!r} is neither one of {sorted(RECIPE_REWARDS)} nor a 'module:attr' path")
        value = getattr(importlib.import_module(module), attr)
        rewards.append(value() if isinstance(value, type) else value)
    return rewards


def synthetic_dataset(args: DataArguments, split: str = "train",
                      num_samples: int | None = None) -> TextRenderingDataset:
    return TextRenderingDataset(
        num_samples or args.synthetic_num_samples, mode=args.synthetic_mode, split=split,
        vocabulary=args.synthetic_vocabulary, min_length=args.synthetic_min_length,
        max_length=args.synthetic_max_length, image_size=(args.synthetic_height, args.synthetic_width),
        caption_language=args.synthetic_caption_language, seed=args.synthetic_seed)


def image_text_dataset(args: DataArguments) -> ImageTextDataset:
    """The image-text dataset of pretraining and SFT (items `{"image", "prompt", "key", ...}`)."""
    if args.dataset_format == "synthetic":
        return synthetic_dataset(args)
    if args.dataset_format == "folder":
        return ImageFolderDataset(args.dataset_path)
    if args.dataset_format == "manifest":
        return ManifestDataset(args.dataset_path, image_column=args.image_column, prompt_column=args.prompt_column)
    if args.dataset_format == "parquet":
        return ParquetImageDataset(args.dataset_path, image_column=args.image_column,
                                   prompt_column=args.prompt_column)
    return TarShardDataset(args.dataset_path, caption_field=args.prompt_column)


def describe_data(args: DataArguments, size: int | None = None) -> str:
    count = f"{size} items" if size is not None else ""
    if args.dataset_format == "synthetic":
        return (f"synthetic {args.synthetic_mode} text renders, {args.synthetic_vocabulary} of length "
                f"{args.synthetic_min_length}-{args.synthetic_max_length}, {args.synthetic_height}x"
                f"{args.synthetic_width}px, seed {args.synthetic_seed}; {count}")
    return f"{args.dataset_format} {args.dataset_path}; {count}"


class PoolRows(Sequence):
    """The pair builder's pool as rows `{"prompt", "image", **columns}` where `image` is the undecoded source
    (path or bytes) of a file dataset, so the builder itself reads it and counts an unreadable one, or the
    rendered image of the synthetic dataset."""

    def __init__(self, dataset: ImageTextDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(self.dataset, TextRenderingDataset):
            item = dict(self.dataset[index])
        else:
            item = {**self.dataset._text(index), "image": self.dataset._image_source(index)}
        item.pop("key", None)
        return item


def prompt_rows(args: DataArguments) -> list[dict[str, Any]]:
    """GRPO prompts `{"prompt", **columns}` (columns such as `target_text` go to the rewards): the synthetic
    generator's captions and targets (nothing rendered), or the rows of a JSONL / CSV manifest."""
    if args.dataset_format == "synthetic":
        return synthetic_dataset(args).prompt_records()
    if args.dataset_format != "manifest":
        raise ValueError(f"GRPO reads prompts from dataset_format 'synthetic' or 'manifest', got "
                         f"{args.dataset_format!r}")
    if args.dataset_path.endswith(".csv"):
        with open(args.dataset_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = read_jsonl(args.dataset_path)
    if not rows or args.prompt_column not in rows[0]:
        raise ValueError(f"{args.dataset_path} has no {args.prompt_column!r} column (its first row has "
                         f"{sorted(rows[0]) if rows else 'no columns'}); set prompt_column")
    return [{**{k: v for k, v in row.items() if k != args.prompt_column}, "prompt": row[args.prompt_column]}
            for row in rows]


def readable_pairs(pairs_path: str) -> tuple[list[dict[str, Any]], int]:
    """The rows of a pair folder whose chosen and rejected images both decode, and how many were dropped."""
    rows, skipped = [], 0
    pairs = PreferencePairDataset(pairs_path)
    for index in range(len(pairs)):
        row = pairs[index]
        try:
            for key in ("chosen", "rejected"):
                open_image(row[key])
        except UNREADABLE_IMAGE_ERRORS as error:
            logger.warning("skipping pair %s: unreadable %s image (%s)", row["id"], key, error)
            skipped += 1
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"no readable pair in {pairs_path} ({skipped} skipped)")
    return rows, skipped


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """Prompts from the command line and/or a text file (one per line) or JSONL with a `prompt` column."""
    out = list(prompts)
    if prompts_file:
        if prompts_file.endswith(".jsonl"):
            out += [row["prompt"] for row in read_jsonl(prompts_file)]
        else:
            with open(prompts_file, encoding="utf-8") as f:
                out += [line.strip() for line in f if line.strip()]
    if not out:
        raise ValueError("no prompt given: pass --prompts or --prompts_file")
    return out

