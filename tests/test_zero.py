"""DeepSpeed ZeRO-2 and ZeRO-3 pretraining with two CPU processes (gloo; launched with torchrun's environment
and a file rendezvous by tests/launch.py, which sends nothing off the machine), against a single-process run with the same global batch (2 accumulated micro-batches), and a ZeRO-3 save/resume in
a new process. The shipped recipes/ovis_image/ds_zero{2,3}.json configs are the ones used."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from launch import REPO, run_processes

from rlhf_image.fm_trainer import FlowMatchingTrainer
from scripts.fm_zero import Squares, make_config, make_policy

pytest.importorskip("deepspeed")
SCRIPT = os.path.join(REPO, "tests", "scripts", "fm_zero.py")
WEIGHTS = os.path.join("final", "transformer", "diffusion_pytorch_model.safetensors")


def launch(*args: str) -> None:
    """Two processes of the script, as `torchrun --nproc_per_node 2` would start them."""
    for done in run_processes(SCRIPT, list(args), env={"PYTHONWARNINGS": "ignore"}):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def result(folder):
    with open(os.path.join(folder, "result.json")) as f:
        out = json.load(f)
    return [out["losses"][str(step)] for step in range(1, 6)], out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 process, 2 accumulated micro-batches of 2: the same data and noise as 2 processes x 1 micro-batch."""
    out = tmp_path_factory.mktemp("reference")
    # The launched ranks run one thread each (tests/launch.py); another thread count reorders float sums, and
    # Adam turns those last-bit differences into visible weight differences on near-zero gradients.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = FlowMatchingTrainer(make_policy(), args=make_config(str(out), gradient_accumulation_steps=2),
                                      train_dataset=Squares(), eval_dataset=Squares())
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
        trainer.save_model(str(out / "final"))
    finally:
        torch.set_num_threads(threads)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, eval_loss, safetensors.torch.load_file(str(out / WEIGHTS))


def close_to_reference(folder, reference):
    losses, out = result(folder)
    ref_losses, ref_eval, ref_weights = reference
    assert out["world_size"] == 2
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(out["eval_loss"], ref_eval, rtol=1e-6)
    weights = safetensors.torch.load_file(os.path.join(folder, WEIGHTS))
    assert weights.keys() == ref_weights.keys()
    for name, value in weights.items():
        np.testing.assert_allclose(value.numpy(), ref_weights[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    return losses, weights


def test_zero2_data_parallel(tmp_path, reference):
    launch("--stage", "2", "--output_dir", str(tmp_path))
    assert result(tmp_path)[1]["zero_stage"] == 2
    close_to_reference(tmp_path, reference)


def test_zero3_save_and_resume(tmp_path, reference):
    """Straight to step 5 (checkpoint at step 4, mid-epoch of epoch 1); then a new launch resumes from
    that checkpoint to step 5: same step-5 loss and same final (EMA) weights, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch("--stage", "3", "--output_dir", str(straight))
    assert result(straight)[1]["zero_stage"] == 3
    losses, weights = close_to_reference(straight, reference)
    checkpoint = straight / "checkpoint-4"
    assert (checkpoint / "ema-rank00000-of-00002.safetensors").is_file()
    assert (checkpoint / "ema-rank00001-of-00002.safetensors").is_file()
    shutil.copytree(checkpoint, resumed / "checkpoint-4")
    launch("--stage", "3", "--output_dir", str(resumed), "--resume")
    resumed_losses, out = result(resumed)
    assert resumed_losses == losses  # steps 1-4 restored from the checkpoint's history, step 5 recomputed
    assert out["eval_loss"] == result(straight)[1]["eval_loss"]
    resumed_weights = safetensors.torch.load_file(str(resumed / WEIGHTS))
    for name, value in weights.items():
        assert (value == resumed_weights[name]).all(), name
