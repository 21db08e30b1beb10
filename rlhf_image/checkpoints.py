"""Checkpoints that appear only when complete, the newest complete one, and errors that name the damaged file.

Every trainer ([`~rlhf_image.BaseTrainer`]) writes a checkpoint into `output_dir/.checkpoint-staging/checkpoint-N`
and moves it to `output_dir/checkpoint-N` (one rename) once everything is written: weights, optimizer, scheduler,
RNG states, the method's own state and `trainer_state.json`. A process killed while saving leaves only the staging
folder, which the next save of that step replaces; `checkpoint-N` folders are complete. A checkpoint that lacks a
file all the same (copied in part, or written by another tool) is skipped by [`latest_complete_checkpoint`] with a
warning, and a file that cannot be read raises a [`CheckpointError`] naming the file and the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Sequence

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: a file is missing or damaged."""


def staging_path(run_dir: str, name: str) -> str:
    """Where the checkpoint `name` (`checkpoint-N`) of `run_dir` is written before it is published."""
    return os.path.join(run_dir, STAGING_DIR, name)


def publish(staged: str, final: str) -> None:
    """Move the finished checkpoint `staged` to `final` (replacing an older save of the same step)."""
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(staged, final)
    staging = os.path.dirname(staged)
    if os.path.isdir(staging) and not os.listdir(staging):
        os.rmdir(staging)


def missing_files(checkpoint: str, required: Sequence[str]) -> list[str]:
    """The files of `required` (paths relative to `checkpoint`) that `checkpoint` lacks."""
    return [name for name in required if not os.path.isfile(os.path.join(checkpoint, name))]


def latest_complete_checkpoint(output_dir: str, required: Sequence[str] = (TRAINER_STATE,)) -> str | None:
    """The newest `checkpoint-N` of `output_dir` holding every file of `required`; newer incomplete ones are skipped
    with a warning naming what they lack. `None` when there is none."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    for _, name in steps:
        path = os.path.join(output_dir, name)
        missing = missing_files(path, required)
        if not missing:
            return path
        logger.warning("skipping the incomplete checkpoint %s (it lacks %s): resuming from an earlier one",
                       path, ", ".join(missing))
    return None


def check_checkpoint(checkpoint: str, required: Sequence[str] = (TRAINER_STATE,)) -> None:
    """Raise a [`CheckpointError`] naming the file if `checkpoint` lacks a file of `required` or holds a file that
    cannot be read: JSON that does not parse, a safetensors file shorter than its header says, a torch file (a zip
    archive) without its end record. Cheap: headers and directories are read, not the tensors."""
    missing = missing_files(checkpoint, required)
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: it lacks {', '.join(missing)} (a save that did "
                              f"not finish). Resume from an earlier checkpoint, or delete {checkpoint} and resume from "
                              "the newest complete one (resume_from_checkpoint=True, --resume latest).")
    for folder, _, names in os.walk(checkpoint):
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                _check_file(path)
            except Exception as error:  # noqa: BLE001 - each reader has its own error type
                raise CheckpointError(
                    f"{os.path.relpath(path, checkpoint)} in checkpoint {checkpoint} cannot be read "
                    f"({type(error).__name__}: {error}): the file is truncated or damaged. Resume from an earlier "
                    f"checkpoint, or delete {checkpoint} and resume from the newest complete one.") from error


def _check_file(path: str) -> None:
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            json.load(f)
    elif path.endswith(".safetensors"):
        with safe_open(path, framework="pt"):
            pass
    elif path.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):
        raise ValueError("not a complete torch archive (no zip end record)")
