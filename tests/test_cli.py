"""The `rlhf-image` command line: parsing (YAML + flags, unknown keys rejected), the packaged configs, and the
CPU demo end to end in quick mode."""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from config_helpers import stage_overrides

from rlhf_image.recipes.cli import COMMANDS, CONFIG_DIR, main, parse_command, run_command
from rlhf_image.recipes.ovis_image.stages.args import RewardArguments
from rlhf_image.recipes.ovis_image.stages.inputs import build_rewards

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def test_usage_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("fit-vae", "pretrain", "sft", "build-pairs", "dpo", "grpo", "nft", "sample", "eval", "demo"):
        assert f"  {command} " in out
    assert main(["distill"]) == 2
    assert "unknown command 'distill'" in capsys.readouterr().err


def test_stage_help_opens_with_config_and_the_stage_options_and_answers_fast():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rlhf_image.recipes.cli", "grpo", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert seconds < 5, f"rlhf-image grpo --help took {seconds:.1f} s"
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: rlhf-image grpo --config") and lines[2].startswith("  --config CONFIG")
    for flag in ("--model ", "--reward_funcs ", "--lora_rank ", "--num_generations ", "--beta ",
                 "--num_rollout_workers "):
        assert any(line.startswith(f"  {flag}") for line in lines), flag
    assert "--adam_beta1" not in result.stdout and len(lines) < 250  # TrainingArguments' fields: --help-all
    assert "--numeric_fields" not in result.stdout and "--sde_types" not in result.stdout  # class constants
    assert "--help-all" in lines[-1] or "--help-all" in result.stdout.splitlines()[-2]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_its_own_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf-image {command}") and out.count("\n  --") >= 2


def test_help_all_lists_every_trainer_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--help-all"])
    assert exit_info.value.code == 0 and "--adam_beta1" in capsys.readouterr().out


def test_unknown_yaml_key_is_rejected_with_its_name(tmp_path, capsys):
    config = yaml.safe_load(open(os.path.join(CONFIG_DIR, "tiny_pretrain.yaml")))
    config["learning_rat"] = 1e-5
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pretrain", "--config", str(path), "--vae_path", ""]) == 2
    err = capsys.readouterr().err
    assert "rlhf-image pretrain: error" in err and "Unknown arguments from config file" in err
    assert "learning_rat" in err


def test_unknown_flag_is_rejected_with_its_name(capsys):
    assert main(["grpo", "--config", "tiny_grpo.yaml", "--model", "tiny", "--betta", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "rlhf-image grpo: error" in err and "--betta" in err


def test_invalid_value_names_the_field(capsys):
    assert main(["pretrain", "--config", "tiny_pretrain.yaml", "--vae_path", "", "--dataset_format", "csvx"]) == 2
    err = capsys.readouterr().err
    assert "dataset_format='csvx'" in err and "synthetic" in err
    assert main(["sft", "--config", "tiny_sft.yaml", "--model", "outputs/no/such/stage"]) == 2
    assert "run the previous stage first" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fit-vae fits the tiny VAE on synthetic renders"):  # before any work
        run_command("fit-vae", ["--config", "tiny_fit_vae.yaml", "--dataset_format", "folder", "--dataset_path", "."])


def test_flags_override_the_yaml_and_packaged_names_resolve():
    _, (model, data, recipe, config) = parse_command(
        "pretrain", ["--config", "tiny_pretrain.yaml", "--vae_path", "", "--learning_rate", "1e-5",
                     "--tiny_axes_dims_rope", "4", "6", "6", "--tiny_hidden_size", "32", "--tiny_num_heads", "2"])
    assert config.learning_rate == 1e-5  # the flag
    assert config.max_steps == yaml.safe_load(open(os.path.join(CONFIG_DIR, "tiny_pretrain.yaml")))["max_steps"]
    assert model.tiny_axes_dims_rope == [4, 6, 6] and data.synthetic_height == 32 and recipe.resume is None
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        parse_command("pretrain", ["--config", "no_such.yaml"])


def test_lora_needs_a_base_the_next_stage_can_reload(tmp_path):
    with pytest.raises(ValueError, match="needs a base model that the next stage can reload"):
        run_command("pretrain", ["--config", "tiny_pretrain.yaml", "--vae_path", "", "--lora_rank", "4",
                                 "--synthetic_num_samples", "4", "--output_dir", str(tmp_path)])


def test_bad_rope_split_fails_at_parse_time(capsys):
    assert main(["pretrain", "--config", "tiny_pretrain.yaml", "--vae_path", "", "--tiny_hidden_size", "64"]) == 2
    assert "tiny_axes_dims_rope" in capsys.readouterr().err


def constant_reward(prompts, images, **columns):
    return [0.5] * len(prompts)


class CountingReward:
    name = "counting"

    def __call__(self, prompts, images, **columns):
        return [float(len(p)) for p in prompts]


def test_rewards_by_recipe_name_or_import_path():
    funcs = build_rewards(RewardArguments(reward_funcs=["test_cli:constant_reward", "test_cli:CountingReward"]))
    assert funcs[0] is constant_reward  # a function as it is
    assert isinstance(funcs[1], CountingReward) and funcs[1](["ab", "abc"], [None, None]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="neither one of"):
        build_rewards(RewardArguments(reward_funcs=["hps_v9"]))
    with pytest.raises(ValueError, match="aesthetic_mlp"):
        RewardArguments(reward_funcs=["aesthetic"])


def test_vision_language_rewards_by_recipe_name(tmp_path):
    """'hpsv3', 'vlm_judge' and 'imagereward' build from their arguments (tokenizers and processors only: the
    weights load on the first call, so the files named here need not hold weights)."""
    from tiny_vlms import save_judge_model, save_qwen2_vl_base
    from transformers import BertTokenizer

    base = save_qwen2_vl_base(tmp_path / "qwen2_vl")
    save_judge_model(tmp_path / "judge", "qwen2_5_vl", ("Yes", "No"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    BertTokenizer(vocab_file=str(tmp_path / "bert" / "vocab.txt")).save_pretrained(tmp_path / "bert")
    args = RewardArguments(reward_funcs=["hpsv3", "vlm_judge", "imagereward"], hpsv3_checkpoint=str(tmp_path / "x"),
                           hpsv3_base_model=str(base), vlm_judge_model=str(tmp_path / "judge"),
                           vlm_judge_template="Is this {prompt}? Answer yes or no.", vlm_judge_image_size=56,
                           image_reward_model=str(tmp_path / "y"), image_reward_tokenizer=str(tmp_path / "bert"))
    hps, judge, image_reward = build_rewards(args)
    assert [r.name for r in (hps, judge, image_reward)] == ["hpsv3", "vlm_judge", "image_reward"]
    assert judge.question("a cat") == "Is this a cat? Answer yes or no." and judge.image_size == (56, 56)
    assert not any(r.lazy_model.loaded for r in (hps, judge, image_reward))
    with pytest.raises(ValueError, match="no {prompt} slot"):
        RewardArguments(reward_funcs=["vlm_judge"], vlm_judge_template="Is this good?")


def _command_of(path: str) -> str:
    """The command named by a config's first line: `# rlhf-image <cmd> ...` or `# torchrun ... rlhf_image.recipes.cli <cmd>`."""
    first = open(path).readline()
    words = first.split()
    assert first.startswith("# ") and ("rlhf-image" in words or "rlhf_image.recipes.cli" in words), first
    command = words[words.index("rlhf-image" if "rlhf-image" in words else "rlhf_image.recipes.cli") + 1]
    assert f"recipes/ovis_image/configs/{os.path.basename(path)}" in first, "the launch command names its own file"
    return command


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_packaged_config_launch_line_and_fields(path, tmp_path):
    command = _command_of(path)
    assert command in COMMANDS
    config = yaml.safe_load(open(path))
    # Parse it as the command would, with only the paths that must exist on disk (and bf16, a GPU setting)
    # replaced: every key is a known field and every value passes validation.
    overrides = stage_overrides(config, tmp_path)
    if config.get("deepspeed"):
        assert os.path.isfile(REPO / config["deepspeed"])
        overrides += ["--deepspeed", str(REPO / config["deepspeed"])]
    _, parsed = parse_command(command, ["--config", path, *overrides])
    for key, value in config.items():
        if key not in ("model", "vae_path", "pairs_path", "bf16", "deepspeed", "use_cpu"):
            held = [vars(p)[key] for p in parsed if key in vars(p)]
            assert held, f"{key} is not a field of {command}"


def test_demo_overrides_from_the_command_line():
    from rlhf_image.recipes.ovis_image.demo import override_tokens

    _, (demo,) = parse_command("demo", ["--pretrain_overrides", "max_steps=600", "learning_rate=5e-4"])
    assert override_tokens(demo.pretrain_overrides) == ["--max_steps", "600", "--learning_rate", "5e-4"]
    assert override_tokens(["--tiny_axes_dims_rope", "4", "6", "6", "seed=1"]) == \
        ["--tiny_axes_dims_rope", "4", "6", "6", "--seed", "1"]


def test_demo_seed_shifts_each_stage_config_seeds():
    from rlhf_image.recipes.ovis_image.demo import seed_tokens

    configs = Path(REPO) / "recipes" / "ovis_image" / "configs"
    assert seed_tokens(str(configs / "tiny_pretrain.yaml"), 0) == []
    assert seed_tokens(str(configs / "tiny_pretrain.yaml"), 3) == ["--seed", "3", "--model_seed", "3"]
    assert seed_tokens(str(configs / "tiny_sft.yaml"), 3) == ["--seed", "4"]


def test_demo_quick_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "rlhf_image.recipes.cli", "demo", "--config", "demo_quick.yaml",
                             "--output_dir", str(out), "--seed", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    # --seed shifts every stage's own seed (the YAMLs' seeds are 0 or 1) and the model's initialisation seed
    for stage, seed in (("pretrain", 2), ("sft", 3), ("dpo", 2), ("grpo", 2), ("nft", 2)):
        assert f"- seed: {seed}\n" in (out / stage / "README.md").read_text(), stage
    # the end of the output: the stage table with times, the run's time and the report's path
    tail = result.stdout[result.stdout.rindex("[rlhf-image demo] held-out OCR accuracy"):]
    assert "| stage | steps | time (s) | exact cfg1 |" in tail and re.search(r"^\| grpo \| 2 \| \d+ \|", tail, re.M)
    assert re.search(r"this run: \d+ min \d+ s", tail) and f"report: {out / 'report' / 'index.html'}" in tail
    for stage in ("fit-vae", "pretrain", "sft", "build-pairs", "dpo", "grpo", "nft", "eval"):
        assert f"=== rlhf-image {stage} " in result.stdout
    nft_record = json.loads((out / "nft" / "rlhf_stage.json").read_text())
    assert nft_record["model"] == str(out / "dpo")  # NFT starts from the DPO model, as GRPO does
    for folder in ("vae", "pretrain", "sft", "pairs", "dpo", "grpo", "nft", "eval/pretrain", "eval/sft", "eval/dpo",
                   "eval/grpo", "eval/nft"):
        assert (out / folder / "rlhf_stage.json").is_file(), folder
    report = out / "report"
    page = (report / "index.html").read_text()
    assert "data:image/png;base64," in page and 'src="http' not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == (report / "plots" / "ocr_by_stage.png").read_bytes()
    markdown = (report / "README.md").read_text()
    assert "| stage | steps | time (s) | exact cfg1 | NED cfg1 | exact cfg3 | NED cfg3 |" in markdown
    for stage in ("pretrain", "sft", "dpo", "grpo", "nft"):
        assert re.search(rf"^\| {stage} \| 2 \|", markdown, re.MULTILINE), stage
    for plot in ("vae_loss", "pretrain_loss", "sft_loss", "dpo_loss", "grpo_reward", "nft_reward", "nft_loss",
                 "ocr_by_stage"):
        assert (report / "plots" / f"{plot}.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def sd35_folder(tmp_path_factory) -> Path:
    """A tiny SD3.5 pipeline saved as a diffusers folder (model_index.json names StableDiffusion3Pipeline)."""
    from tiny_models import tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("families") / "sd35"
    tiny_sd3_pipeline(version="3.5").save_pretrained(folder)
    return folder


def test_model_takes_a_folder_of_any_built_in_family(sd35_folder, tmp_path):
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
    from PIL import Image

    from rlhf_image.policy import FlowPolicy
    from rlhf_image.sampling import generate

    model = ["--model", str(sd35_folder), "--max_sequence_length", "16"]
    prompts = ["a red cube", "a blue ball"]
    run_command("sample", [*model, "--prompts", *prompts, "--height", "32", "--width", "32", "--num_inference_steps",
                           "3", "--guidance_scale", "3", "--output_dir", str(tmp_path / "samples")])
    policy = FlowPolicy.from_pipeline(DiffusionPipeline.from_pretrained(sd35_folder), max_sequence_length=16)
    expected = generate(policy, prompts, [0, 1], height=32, width=32, num_steps=3, guidance_scale=3.0).pil_images()
    for i, image in enumerate(expected):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / f"sample_{i:03d}.png")), np.asarray(image))

    common = [*model, "--max_steps", "1", "--save_steps", "1", "--report_to", "none"]
    run_command("grpo", ["--config", "tiny_grpo.yaml", *common, "--height", "32", "--width", "32",
                         "--num_generations", "2", "--per_device_train_batch_size", "2",
                         "--gradient_accumulation_steps", "1", "--num_inference_steps", "2", "--sde_window_range",
                         "0", "2", "--lora_rank", "4", "--log_samples_steps", "0", "--output_dir", str(tmp_path / "g")])
    assert (tmp_path / "g" / "pytorch_lora_weights.safetensors").is_file()
    run_command("sft", ["--config", "tiny_sft.yaml", *common, "--synthetic_height", "32", "--synthetic_width", "32",
                        "--buckets", "32x32", "--per_device_train_batch_size", "2", "--use_ema", "false",
                        "--lr_scheduler_type", "constant",
                        "--output_dir", str(tmp_path / "s")])
    trained = DiffusionPipeline.from_pretrained(tmp_path / "s")  # a complete folder of the same family
    assert isinstance(trained, StableDiffusion3Pipeline)
    before = dict(policy.transformer.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in trained.transformer.named_parameters())

    pairs = tmp_path / "pairs"  # a pair folder as build-pairs writes it, from the two samples above
    pairs.mkdir()
    rows = [{"id": i, "prompt": prompts[i % 2], "chosen": str(tmp_path / "samples" / f"sample_{i % 2:03d}.png"),
             "rejected": str(tmp_path / "samples" / f"sample_{1 - i % 2:03d}.png")} for i in range(4)]
    (pairs / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_command("dpo", ["--config", "tiny_dpo.yaml", *common, "--pairs_path", str(pairs), "--height", "32",
                        "--width", "32", "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "d")])
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path / "d"), StableDiffusion3Pipeline)
    run_command("eval", ["--config", "tiny_eval.yaml", *model, "--num_prompts", "2", "--num_inference_steps", "2",
                         "--synthetic_width", "32", "--output_dir", str(tmp_path / "e")])
    summary = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert summary["num_prompts"] == 2 and set(summary["metrics"]) == {"cfg1"}
    assert 0.0 <= summary["metrics"]["cfg1"]["word_accuracy"] <= 1.0 and summary["metrics"]["cfg1"]["ned"] >= 0.0
    assert len((tmp_path / "e" / "samples.jsonl").read_text().splitlines()) == 2


def test_model_refuses_a_folder_of_a_family_that_is_not_built_in(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(ValueError, match="DDPMPipeline, which is not a built-in family; .*StableDiffusion3Pipeline"):
        run_command("sample", ["--model", str(tmp_path / "ddpm"), "--prompts", "x", "--output_dir", str(tmp_path)])
