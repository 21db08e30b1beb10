"""Checkpoints appear only when complete: a training process killed (SIGKILL) while saving leaves no
`checkpoint-N`, and resuming takes the newest complete one and ends where an uninterrupted run ends; an incomplete
checkpoint is skipped with a warning; a truncated file raises an error naming the file and the checkpoint;
rotation still keeps `save_total_limit` checkpoints."""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from grpo_helpers import brightness, dataset, ovis_policy, tiny_config
from launch import REPO

from rlhf_image import GRPOTrainer
from rlhf_image.checkpoints import STAGING_DIR, CheckpointError, latest_complete_checkpoint
from rlhf_image.recipes.ovis_image.stages.common import resolve_resume

# Trains 3 steps, saving every step, and kills itself with SIGKILL in the middle of saving step 2's checkpoint
# (after its weights and optimizer, before its trainer_state.json).
KILLED_RUN = r'''
import os, signal, sys
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[2] + "/tests")
from grpo_helpers import brightness, dataset, ovis_policy, tiny_config
from rlhf_image import GRPOTrainer
args = tiny_config(sys.argv[1], max_steps=3, save_strategy="steps", save_steps=1)
trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset())
def save_extra_state(checkpoint_dir):
    if trainer.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
trainer.save_extra_state = save_extra_state
trainer.train()
'''


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def run_steps(output_dir, max_steps=3, resume=None, **overrides):
    args = tiny_config(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=1, **overrides)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A 2-step run saved at steps 1 and 2 (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("run")
    run_steps(out, max_steps=2)
    return out


def copy_run(source, target):
    subprocess.run(["cp", "-r", f"{source}/.", str(target)], check=True)
    return target


def test_a_save_killed_midway_leaves_no_checkpoint_and_resume_takes_the_one_before(tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "run"), REPO], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": REPO})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "run"))
    assert "checkpoint-1" in names and "checkpoint-2" not in names  # step 2's save never appeared
    assert os.path.isdir(tmp_path / "run" / STAGING_DIR / "checkpoint-2")  # only its staging folder is left
    resumed = run_steps(tmp_path / "run", resume=True)
    assert resumed.resume_checkpoint == str(tmp_path / "run" / "checkpoint-1")
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not os.path.exists(tmp_path / "run" / STAGING_DIR)  # the step-2 save replaced what the kill left
    uninterrupted = run_steps(tmp_path / "plain")
    for (name, a), b in zip(trainable(uninterrupted).items(), trainable(resumed).values()):
        assert torch.equal(a, b), name


def test_an_incomplete_checkpoint_is_skipped_with_a_warning(two_checkpoints, tmp_path, caplog):
    run = copy_run(two_checkpoints, tmp_path)
    os.remove(run / "checkpoint-2" / "trainer_state.json")
    with caplog.at_level(logging.WARNING, logger="rlhf_image.checkpoints"):
        assert latest_complete_checkpoint(str(run)) == str(run / "checkpoint-1")
        assert resolve_resume("latest", str(run)) == str(run / "checkpoint-1")
    assert "checkpoint-2" in caplog.text and "trainer_state.json" in caplog.text
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is incomplete: it lacks trainer_state.json"):
        run_steps(run, resume=str(run / "checkpoint-2"))
    assert run_steps(run, resume=True).resume_checkpoint == str(run / "checkpoint-1")


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.json", "optimizer.pt", "rng_state.pth"])
def test_a_truncated_file_is_named_with_its_checkpoint(two_checkpoints, tmp_path, damaged):
    run = copy_run(two_checkpoints, tmp_path)
    path = run / "checkpoint-2" / damaged
    if damaged == "model.safetensors":  # full fine-tuning writes the transformer's weights
        path = next(p for p in (run / "checkpoint-2").rglob("*.safetensors"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        run_steps(run, resume=True)
    message = str(error.value)
    assert os.path.relpath(path, run / "checkpoint-2") in message and str(run / "checkpoint-2") in message
    assert "truncated or damaged" in message


def test_rotation_keeps_save_total_limit_complete_checkpoints(tmp_path):
    run_steps(tmp_path, max_steps=4, save_total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
