"""Every stage of the Ovis-Image recipe through the real command line (`python -m rlhf_image.recipes.cli <stage>`) on a tiny
model for a few steps: banner, stage record, resume with `--resume latest`, and unreadable images skipped and
counted by every stage that reads images. One pretrain checkpoint is shared by the other stage tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import OvisImagePipeline
from PIL import Image

from rlhf_image.recipes.cli import main
from rlhf_image.recipes.ovis_image.data import TextRenderingDataset, split_of
from rlhf_image.recipes.ovis_image.stages.common import load_stage_output
from rlhf_image.policy import FlowPolicy
from rlhf_image.preference_data import read_jsonl
from rlhf_image.sampling import generate

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
# A smaller model than the tiny configs' (seconds per stage), and the random tiny VAE (no fit-vae run).
TINY = ["--tiny_hidden_size", "32", "--tiny_num_heads", "2", "--tiny_axes_dims_rope", "4", "6", "6",
        "--tiny_num_single_layers", "1", "--tiny_text_hidden_size", "32", "--vae_path", ""]
STEPS = ["--max_steps", "2", "--save_steps", "1", "--logging_steps", "1"]


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rlhf_image.recipes.cli", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def record(folder: Path) -> dict:
    return json.loads((folder / "rlhf_stage.json").read_text())


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def manifest(root) -> Path:
    """8 rendered numbers, one of them unreadable: a JSONL manifest (image, prompt, target_text), and the same
    images with same-stem .txt captions (the folder format)."""
    path = TextRenderingDataset(8, image_size=(SIZE, SIZE)).write(str(root / "data"))
    for row in read_jsonl(path):
        (root / "data" / row["image"]).with_suffix(".txt").write_text(row["prompt"])
    corrupt(root / "data" / "images" / "000003.png")
    return Path(path)


def image_data(manifest: Path, dataset_format: str = "manifest") -> list[str]:
    path = manifest if dataset_format == "manifest" else manifest.parent / "images"
    return ["--dataset_format", dataset_format, "--dataset_path", str(path), "--buckets", f"{SIZE}x{SIZE}",
            "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def pretrain(root, manifest):
    """2 steps of pretraining on the 8 images (one epoch: the unreadable one is met), a checkpoint per step."""
    out = root / "pretrain"
    result = cli("pretrain", "--config", "tiny_pretrain.yaml", *TINY, *image_data(manifest), *STEPS,
                 "--output_dir", str(out))
    return out, result


def test_pretrain_prints_banner_records_and_counts_the_unreadable_image(pretrain):
    out, result = pretrain
    for line in ("=== rlhf-image pretrain", "model", "tiny Ovis-Image (MMDiT width 32", "data", "manifest",
                 "hyper-parameters", "learning_rate=0.001", "output_dir", str(out), "world size", "resume from"):
        assert line in result.stdout
    assert "2/2" in result.stderr  # the Trainer's progress bar
    rec = record(out)
    assert rec["stage"] == "pretrain" and rec["global_step"] == 2 and rec["steps_this_run"] == 2
    assert rec["skipped_images"] == 1
    logged = [entry["data/skipped_images"] for entry in rec["log_history"] if "data/skipped_images" in entry]
    assert logged[-1] == 1  # the trainer's own metric
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    # a complete diffusers pipeline folder that stock diffusers loads
    pipe = OvisImagePipeline.from_pretrained(out)
    assert sum(p.numel() for p in pipe.transformer.parameters()) > 0


def test_pretrain_resume_latest_continues_from_the_newest_checkpoint(root, pretrain, manifest):
    out = root / "pretrain_resumed"
    shutil.copytree(pretrain[0], out)
    first = record(out)
    assert main(["pretrain", "--config", "tiny_pretrain.yaml", *TINY, *image_data(manifest), "--max_steps", "3",
                 "--save_steps", "1", "--logging_steps", "1", "--output_dir", str(out), "--resume", "latest"]) == 0
    rec = record(out)
    assert rec["resumed_from"].endswith("checkpoint-2")
    assert rec["global_step"] == 3 and rec["steps_this_run"] == 1  # continued, not restarted
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    losses = [entry for entry in rec["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in losses] == [1, 2, 3]
    assert losses[:2] == [entry for entry in first["log_history"] if "loss" in entry]


def test_sft_from_pretrain_counts_unreadable_and_resumes(root, pretrain, manifest):
    out = root / "sft"
    result = cli("sft", "--config", "tiny_sft.yaml", "--model", str(pretrain[0]), *image_data(manifest, "folder"),
                 *STEPS, "--output_dir", str(out), "--resume", "latest")
    assert "no checkpoint-* in" in result.stdout and "starting fresh" in result.stdout
    assert "=== rlhf-image sft" in result.stdout and "folder" in result.stdout
    rec = record(out)
    assert rec["model"] == str(pretrain[0]) and rec["global_step"] == 2 and rec["skipped_images"] == 1
    assert main(["sft", "--config", "tiny_sft.yaml", "--model", str(pretrain[0]), *image_data(manifest, "folder"),
                 "--max_steps", "3", "--save_steps", "1", "--output_dir", str(out), "--resume", "latest"]) == 0
    rec = record(out)
    assert rec["global_step"] == 3 and rec["steps_this_run"] == 1 and rec["resumed_from"].endswith("checkpoint-2")


@pytest.fixture(scope="module")
def pairs(root, pretrain, manifest):
    """build-pairs with the real OCR reward over the 8-image pool (one unreadable)."""
    out = root / "pairs"
    result = cli("build-pairs", "--config", "tiny_build_pairs.yaml", "--model", str(pretrain[0]),
                 "--dataset_format", "manifest", "--dataset_path", str(manifest), "--height", str(SIZE),
                 "--width", str(SIZE), "--num_inference_steps", "2", "--batch_size", "8", "--micro_batch_size", "4",
                 "--output_dir", str(out))
    return out, result


def test_build_pairs_scores_with_ocr_and_counts_the_unreadable_pool_image(pairs):
    out, result = pairs
    assert "=== rlhf-image build-pairs" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 8 and summary["num_skipped"]["unreadable_pool_image"] == 1
    assert record(out)["skipped_images"] == 1
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) + sum(summary["num_skipped"].values()) == 8 and rows
    for row in rows:  # the OCR reward reads the clean pool render exactly: 1.0; the pool image wins
        assert row["scores"]["pool"]["ocr"] == 1.0
        assert row["chosen_source"] == "pool" and row["columns"]["target_text"]


def test_dpo_skips_unreadable_pairs_and_resumes(root, pretrain, pairs):
    folder = root / "pairs_corrupt"
    shutil.copytree(pairs[0], folder)
    rows = read_jsonl(folder / "manifest.jsonl")
    corrupt(folder / rows[0]["chosen"])
    out = root / "dpo"
    args = ["--config", "tiny_dpo.yaml", "--model", str(pretrain[0]), "--pairs_path", str(folder),
            "--height", str(SIZE), "--width", str(SIZE), "--per_device_train_batch_size", "2", "--output_dir", str(out)]
    result = cli("dpo", *args, *STEPS)
    assert "=== rlhf-image dpo" in result.stdout and f"{len(rows) - 1} pairs from" in result.stdout
    rec = record(out)
    assert rec["skipped_pairs"] == 1 and rec["global_step"] == 2
    assert any("dpo_loss" in entry for entry in rec["log_history"])
    assert main(["dpo", *args, "--max_steps", "3", "--save_steps", "1", "--resume", "latest"]) == 0
    rec = record(out)
    assert rec["global_step"] == 3 and rec["steps_this_run"] == 1 and rec["resumed_from"].endswith("checkpoint-2")


def test_a_lora_stage_hands_the_next_stage_its_fused_model(root, pretrain, pairs):
    out = root / "dpo_lora"
    assert main(["dpo", "--config", "tiny_dpo.yaml", "--model", str(pretrain[0]), "--pairs_path", str(pairs[0]),
                 "--height", str(SIZE), "--width", str(SIZE), "--per_device_train_batch_size", "2", "--max_steps", "1",
                 "--learning_rate", "1e-2", "--lora_rank", "4", "--lora_alpha", "8", "--output_dir", str(out)]) == 0
    rec = record(out)
    assert rec["lora"] and rec["base_model"] == str(pretrain[0])
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "model_index.json").exists()
    # Independent: W + (alpha / r) B A from the saved adapter over the base weights.
    from safetensors.torch import load_file

    adapter = load_file(out / "pytorch_lora_weights.safetensors")
    base = OvisImagePipeline.from_pretrained(pretrain[0]).transformer
    fused = load_stage_output(str(out)).transformer
    key = "transformer.transformer_blocks.0.attn.to_q"
    delta = 2.0 * adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"]
    assert delta.abs().max() > 0
    torch.testing.assert_close(fused.transformer_blocks[0].attn.to_q.weight,
                               base.transformer_blocks[0].attn.to_q.weight + delta)


def test_grpo_with_ocr_reward_resumes(root, pretrain):
    out = root / "grpo"
    args = ["--config", "tiny_grpo.yaml", "--model", str(pretrain[0]), "--height", str(SIZE), "--width", str(SIZE),
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--num_inference_steps", "4", "--synthetic_num_samples", "4", "--log_samples_steps", "0",
            "--output_dir", str(out)]
    result = cli("grpo", *args, *STEPS)
    assert "=== rlhf-image grpo" in result.stdout and "rewards" in result.stdout
    rec = record(out)
    assert rec["global_step"] == 2 and rec["rewards"] == ["ocr"]
    assert all("rewards/ocr/mean" in entry for entry in rec["log_history"] if "loss" in entry)
    assert main(["grpo", *args, "--max_steps", "3", "--save_steps", "1", "--resume", "latest"]) == 0
    rec = record(out)
    assert rec["global_step"] == 3 and rec["steps_this_run"] == 1 and rec["resumed_from"].endswith("checkpoint-2")


def test_nft_with_ocr_reward_resumes_and_its_old_policy_is_checkpointed(root, pretrain):
    out = root / "nft"
    args = ["--config", "tiny_nft.yaml", "--model", str(pretrain[0]), "--height", str(SIZE), "--width", str(SIZE),
            "--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--num_inference_steps", "4", "--synthetic_num_samples", "4", "--log_samples_steps", "0",
            "--output_dir", str(out)]
    result = cli("nft", *args, *STEPS)
    assert "=== rlhf-image nft" in result.stdout and "loss_type" in result.stdout
    rec = record(out)
    assert rec["global_step"] == 2 and rec["rewards"] == ["ocr"]
    assert all("rewards/ocr/mean" in e and "loss/positive" in e for e in rec["log_history"] if "loss" in e)
    assert (out / "checkpoint-2" / "old_policy.safetensors").is_file()
    assert main(["nft", *args, "--max_steps", "3", "--save_steps", "1", "--resume", "latest"]) == 0
    rec = record(out)
    assert rec["global_step"] == 3 and rec["steps_this_run"] == 1 and rec["resumed_from"].endswith("checkpoint-2")
    # strata in [1, 3); the untrained model's OCR rewards may have no spread: compute the zero-advantage batches too
    awm = ["--loss_type", "awm", "--timestep_fraction", "0.9", "--awm_num_timesteps", "2", "--skip_zero_advantage",
           "false"]
    assert main(["nft", *args, *awm, "--output_dir", str(root / "awm"), *STEPS]) == 0
    assert all("loss/error" in e for e in record(root / "awm")["log_history"] if "loss" in e)


def test_eval_scores_held_out_prompts(root, pretrain):
    out = root / "eval"
    cli("eval", "--config", "tiny_eval.yaml", "--model", str(pretrain[0]), "--synthetic_height", str(SIZE),
        "--synthetic_width", str(SIZE), "--num_prompts", "4", "--num_inference_steps", "2", "--micro_batch_size", "4",
        "--guidance_scales", "1.0", "3.0", "--output_dir", str(out))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["model_stage"] == "pretrain" and summary["model_global_step"] == 2
    samples = read_jsonl(out / "samples.jsonl")
    for scale in ("cfg1", "cfg3"):
        rows = [row for row in samples if row["guidance"] == scale]
        assert len(rows) == 4
        # held out: every target is a string of the generator's eval split, which training never draws
        assert all(split_of(row["target"], 0.1) == "eval" for row in rows)
        metrics = summary["metrics"][scale]
        assert metrics["word_accuracy"] == sum(row["exact"] for row in rows) / 4
        assert metrics["ned"] == pytest.approx(sum(row["ned"] for row in rows) / 4)
        assert Image.open(out / f"grid_{scale}.png").size[0] == 8 * 2 * SIZE


def test_sample_matches_the_library_sampler(root, pretrain):
    out = root / "samples"
    prompts = ['A sign that says "2048"', 'A sign that says "1234"']
    cli("sample", "--model", str(pretrain[0]), "--max_sequence_length", "32", "--prompts", *prompts,
        "--height", str(SIZE), "--width", str(SIZE), "--num_inference_steps", "2", "--guidance_scale", "1.0",
        "--seed", "7", "--output_dir", str(out))
    policy = FlowPolicy.from_pipeline(OvisImagePipeline.from_pretrained(pretrain[0]), max_sequence_length=32)
    expected = generate(policy, prompts, [7, 8], height=SIZE, width=SIZE, num_steps=2, micro_batch_size=4)
    for i, image in enumerate(expected.pil_images()):
        saved = Image.open(out / f"sample_{i:03d}.png").convert("RGB")
        assert torch.equal(torch.tensor(list(saved.getdata())), torch.tensor(list(image.getdata())))
    assert [row["seed"] for row in read_jsonl(out / "samples.jsonl")] == [7, 8]
    assert Image.open(out / "grid.png").size == (2 * SIZE, SIZE)
    assert os.path.isfile(out / "sample_001.png")


def test_frozen_dtype_keeps_the_transformer_in_torch_dtype():
    """`frozen_dtype: bfloat16` with fp32 master weights: the text encoder and VAE in bf16, the trained transformer in
    fp32, and the velocity within bf16 rounding of the all-fp32 model's (same random weights)."""
    from rlhf_image.recipes.ovis_image.stages.args import ModelArguments
    from rlhf_image.recipes.ovis_image.stages.common import build_policy, load_pipeline

    sizes = dict(model="tiny", tiny_hidden_size=32, tiny_num_heads=2, tiny_axes_dims_rope=[4, 6, 6],
                 tiny_num_single_layers=1, max_sequence_length=16)
    with pytest.raises(ValueError, match="frozen_dtype='bf16'"):
        ModelArguments(**sizes, frozen_dtype="bf16")
    policies = {}
    for frozen in (None, "bfloat16"):
        args = ModelArguments(**sizes, frozen_dtype=frozen)
        pipe = load_pipeline(args)
        policies[frozen] = build_policy(pipe, args)
    mixed = policies["bfloat16"]
    assert {p.dtype for p in mixed.transformer.parameters()} == {torch.float32}
    assert {p.dtype for p in mixed.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in mixed.vae.parameters()} == {torch.bfloat16}
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for frozen, policy in policies.items():
        latents = policy.encode_images(image)
        cond = policy.encode_prompt(['A sign that says "2048"'])
        outputs[frozen] = policy.predict_velocity(latents.float(), torch.tensor([0.5]), cond)
    assert outputs["bfloat16"].dtype == torch.float32
    error = (outputs["bfloat16"] - outputs[None]).norm() / outputs[None].norm()
    assert 0 < error < 2e-2
