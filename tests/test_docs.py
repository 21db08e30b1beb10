"""The guides in docs/ are executable: every fenced code block quotes a file that a test runs or parses, and the
examples they quote run here on the CPU at tiny sizes, with their results checked against formulas or against an
independent path (the stock diffusers pipeline, the reward recomputed from the saved images, DeepSpeed's launcher
and Ray's command-line parsers)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from config_helpers import stage_overrides
from PIL import Image

from rlhf_image.recipes.cli import COMMANDS, parse_command
from rlhf_image.rewards import call_reward
from rlhf_image.policy import FlowPolicy
from rlhf_image.sampling import generate

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DOCS = sorted((REPO / "docs").glob("*.md"))
MARKER = re.compile(r"<!-- from (\S+?)(?:#([\w-]+))? -->")
CLUSTER_SCRIPT = "examples/ovis_7b_cluster.sh"
HOSTFILE = "examples/hostfile"
MEMORY_SCRIPT = "recipes/ovis_image/memory_table.py"
GRPO_STAGE = "recipes/ovis_image/stages/grpo.py"  # run on Ray workers through the command line below
# The example files run by this module (each by the test named after it) and by tests/test_grpo_example.py.
RUN_HERE = ("custom_reward.py", "served_reward.py", "flow_policy_adapter.py", "grpo_ovis_resume.py",
            "dpo_preference_pairs.py", "model_rewards.py")
RUN_ELSEWHERE = {"grpo_lora_custom_model.py": "test_grpo_example.py",
                 "nft_lora_custom_model.py": "test_grpo_example.py"}
# Shell placeholders of the cluster commands and the values they are parsed with.
PLACEHOLDERS = {"$NODE_RANK": "0", "$HEAD_ADDR": "10.0.0.1"}


# --- the quoting rule --------------------------------------------------------------------------------------------

def fenced_blocks(path: Path) -> list[tuple[int, str | None, str | None, str]]:
    """`(line, quoted file, region name, code)` for every fenced block of a markdown file; the marker comment must
    be the last non-blank line before the opening fence (`None` when it is missing)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = MARKER.fullmatch(previous.strip())
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((i + 1, match and match.group(1), match and match.group(2), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def region(path: str, name: str) -> str:
    """The lines between `# [start:name]` and `# [end:name]` in `path`, dedented."""
    lines = (REPO / path).read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"# [start:{name}]"]
    ends = [i for i, line in enumerate(lines) if line.strip() == f"# [end:{name}]"]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], f"{path}: region {name!r} not found once"
    return textwrap.dedent("\n".join(lines[starts[0] + 1:ends[0]])).strip("\n")


def exercised(path: str) -> bool:
    """Whether a test runs or parses `path`: an example run by this module or another test file, a packaged stage
    config (tests/test_cli.py parses each with the command of its first line), or a file checked below."""
    folder, name = os.path.split(path)
    if folder == "examples" and name in RUN_HERE:
        return True
    if folder == "examples" and name in RUN_ELSEWHERE:
        return name in (REPO / "tests" / RUN_ELSEWHERE[name]).read_text()
    if folder == "recipes/ovis_image/configs" and name.endswith(".yaml"):
        return "test_packaged_config_launch_line_and_fields" in (REPO / "tests" / "test_cli.py").read_text()
    return path in (CLUSTER_SCRIPT, HOSTFILE, MEMORY_SCRIPT, GRPO_STAGE)


def test_docs_exist_and_every_code_block_quotes_an_exercised_file():
    assert {p.name for p in DOCS} >= {"train_your_model.md", "custom_rewards.md", "ovis_image_recipe.md"}
    for doc in DOCS:
        fenced, indented, previous = False, [], "x"
        for number, text in enumerate(doc.read_text().splitlines(), start=1):
            fenced = fenced != text.startswith("```")
            if not fenced and text.startswith("    ") and not previous.strip():
                indented.append(number)
            previous = text
        assert not indented, f"{doc.name}: indented code blocks at lines {indented}; use a quoted fenced block"
        blocks = fenced_blocks(doc)
        assert blocks, doc.name
        for line, source, name, code in blocks:
            where = f"{doc.name}:{line}"
            assert source is not None, f"{where}: no `<!-- from FILE -->` marker before the code block"
            assert (REPO / source).is_file(), f"{where}: {source} does not exist"
            assert exercised(source), f"{where}: no test runs {source}"
            if name is not None:
                assert code == region(source, name), f"{where}: the block differs from {source}#{name}"
            else:
                assert code.strip() and code in (REPO / source).read_text(), f"{where}: the block is not in {source}"


def test_every_example_is_run_by_a_test_and_its_regions_are_well_formed():
    for path in sorted(EXAMPLES.glob("*.py")):
        assert path.name in RUN_HERE or path.name in RUN_ELSEWHERE, f"no test runs {path.name}"
        text = path.read_text()
        starts = re.findall(r"# \[start:([\w-]+)\]", text)
        assert sorted(starts) == sorted(re.findall(r"# \[end:([\w-]+)\]", text)), path.name
        for name in starts:
            region(f"examples/{path.name}", name)


# --- the examples --------------------------------------------------------------------------------------------------

def load_example(name: str):
    """Import an example file as a module (without running its `__main__` block)."""
    module_name = f"docs_example_{Path(name).stem}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ode_samples(policy: FlowPolicy, size: int = 32) -> torch.Tensor:
    return generate(policy, ["a red square", "a night sky"], [0, 1], height=size, width=size, num_steps=4,
                    micro_batch_size=2, decode=False).final_latents


def test_custom_reward_values_follow_the_contract_and_the_aggregation_formulas(tmp_path):
    example = load_example("custom_reward.py")
    out = example.main(["--output_dir", str(tmp_path)])
    prompts, images, columns = example.sample_batch()
    weights = np.array([1.0, 0.5, 0.2])
    # Independent values: colour distance, grey std, grey mean (NaN for the flat image).
    grey = [np.asarray(image.convert("L"), dtype=np.float64) / 255 for image in images]
    rgb = [np.asarray(image.convert("RGB"), dtype=np.float64) for image in images]
    expected = np.array([
        [np.nan if t is None else 1 - np.abs(x - np.asarray(t, dtype=np.float64)).mean() / 255
         for x, t in zip(rgb, columns["target_rgb"])],
        [g.std() for g in grey],
        [np.nan if g.max() == g.min() else g.mean() for g in grey],
    ]).T
    summed = out["summed"]
    assert summed.names == ["colour_match", "contrast", "judge"]
    np.testing.assert_allclose(summed.per_reward, expected, rtol=1e-5, equal_nan=True)
    unscored = np.isnan(expected).any(axis=1)
    assert unscored.tolist() == [False, False, True, False, True]  # row 2: None (no target); row 4: NaN (flat)
    np.testing.assert_allclose(summed.total[~unscored], expected[~unscored] @ weights, rtol=1e-6)
    assert np.isnan(summed.total[unscored]).all()
    z = np.stack([(c - np.nanmean(c)) / np.nanstd(c) for c in expected.T], axis=1)  # population std, NaN ignored
    np.testing.assert_allclose(out["standardised"].total[~unscored], z[~unscored] @ weights, rtol=1e-5)
    nan_warnings = [str(w.message) for w in out["warnings"] if issubclass(w.category, RuntimeWarning)]
    assert nan_warnings and all("'judge' returned nan at index 4" in m for m in nan_warnings)
    assert out["values"][2] is None and out["values"][0] == pytest.approx(expected[0, 0])
    with pytest.raises(ValueError, match="returned inf at index 0"):
        call_reward(lambda p, i, **c: [math.inf] * len(i), prompts, images)
    # One GRPO step: each reward logged on its own; the prompt without a target is unscored (a group of 2).
    logged = out["logged"]
    assert {f"rewards/{n}/mean" for n in ("colour_match", "contrast", "judge", "total")} <= set(logged)
    assert logged["rewards/unscored"] == 2.0


def test_served_reward_scores_like_the_local_one_and_fails_as_documented(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # served_reward imports custom_reward from beside it
    out = load_example("served_reward.py").main()
    assert out["remote"] == out["local"]  # PNG is lossless: the same pixels, the same floats
    assert out["unscored"] == [None] * len(out["local"]) and out["attempts"] == 3  # 1 + max_retries=2
    from custom_reward import ContrastReward, colour_match, sample_batch

    prompts, images, columns = sample_batch()
    colour = np.array([np.nan if v is None else v for v in colour_match(prompts, images, **columns)])
    expected = colour + 0.5 * np.array(ContrastReward()(prompts, images))
    np.testing.assert_allclose(out["mixed"].total, expected, rtol=1e-12, equal_nan=True)


def test_model_rewards_load_from_the_official_layouts_and_score(tmp_path):
    """The guide's loading lines on tiny random checkpoints in the released layouts (tests/tiny_vlms.py)."""
    from tiny_vlms import save_hpsv3_checkpoint, save_image_reward, save_judge_model, save_qwen2_vl_base

    base = save_qwen2_vl_base(tmp_path / "qwen2_vl")
    save_hpsv3_checkpoint(base, tmp_path / "hpsv3")
    save_judge_model(tmp_path / "judge", "qwen2_5_vl", ("Yes", "No"))
    image_reward = save_image_reward(tmp_path / "image_reward")
    out = load_example("model_rewards.py").main([
        "--hpsv3_checkpoint", str(tmp_path / "hpsv3"), "--hpsv3_base_model", str(base),
        "--judge_model", str(tmp_path / "judge"), "--image_reward_model", str(image_reward["folder"]),
        "--image_reward_tokenizer", str(image_reward["tokenizer"])])
    result, (hps, judge, ir) = out["result"], out["rewards"]
    assert result.names == ["hpsv3", "vlm_judge", "image_reward"] and np.isfinite(result.per_reward).all()
    assert next(hps.model.backbone.parameters()).dtype == torch.bfloat16  # the official dtype by default
    assert judge.image_size == (448, 448) and judge.inputs(out["prompts"][:1], out["images"][:1])[
        "image_grid_thw"].tolist() == [[1, 32, 32]]  # 448 / 14 patches a side: 256 image tokens after merging
    assert ((result.per_reward[:, 1] > 0) & (result.per_reward[:, 1] < 1)).all()
    np.testing.assert_allclose(result.per_reward[:, 2], ir(out["prompts"], out["images"]), rtol=0, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_reward_command_line_as_documented(monkeypatch):
    """The two documented lines, run by bash from the repository root (only the port changed), then scored through."""
    export_line, serve_line = region("examples/served_reward.py", "cli").splitlines()
    port = free_port()
    assert "--port 8000" in serve_line
    serve_line = serve_line.replace("--port 8000", f"--port {port}")
    script = f'{export_line}\necho "token=$REWARD_SERVER_TOKEN"\nexec {serve_line}'
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        token = server.stdout.readline().strip().removeprefix("token=")
        assert len(token) >= 32
        assert server.stdout.readline().startswith(f"serving reward 'contrast' on http://127.0.0.1:{port}")
        from rlhf_image.rewards import RemoteReward

        monkeypatch.syspath_prepend(str(EXAMPLES))
        from custom_reward import ContrastReward, sample_batch

        monkeypatch.setenv("REWARD_SERVER_TOKEN", token)  # the client reads the variable the server read
        prompts, images, _ = sample_batch()
        assert RemoteReward(f"http://127.0.0.1:{port}", timeout=30.0)(prompts, images) == \
            ContrastReward()(prompts, images)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_flow_policy_adapter_matches_the_stock_pipeline_and_its_lora_reloads(tmp_path):
    example = load_example("flow_policy_adapter.py")
    out = example.main(["--output_dir", str(tmp_path), "--max_steps", "2"])
    assert out["difference"] < 1e-5  # the library's sampler through the user's adapter == AuraFlowPipeline
    trainer = out["trainer"]
    assert isinstance(trainer.policy, example.AuraFlowPolicy)  # the trainer wrapped the pipeline itself
    history = [e for e in trainer.state.log_history if "ratio/max" in e]
    assert len(history) == 2 and all(e["ratio/min"] == e["ratio/max"] == 1.0 for e in history)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    # The LoRA loaded by stock diffusers samples what the trained policy samples; the base model does not.
    trained = ode_samples(trainer.policy)
    reloaded = ode_samples(FlowPolicy.from_pipeline(out["pipe"]))
    base = ode_samples(FlowPolicy.from_pipeline(example.tiny_auraflow_pipeline()))
    reload_error, change = (reloaded - trained).abs().max(), (base - trained).abs().max()
    # Two steps move the tiny AuraFlow little (its attention contributes little to the output), but the reloaded
    # LoRA reproduces the trained policy far more closely than the base model does.
    assert reload_error < 1e-6 and change > 10 * reload_error, (reload_error, change)


def test_grpo_ovis_example_resumes_and_its_lora_reloads_in_diffusers(tmp_path):
    example = load_example("grpo_ovis_resume.py")
    out = example.main(["--output_dir", str(tmp_path), "--max_steps", "3"])
    trainer = out["trainer"]
    assert trainer.state.global_step == 3
    expected_files = {"checkpoint-2", "checkpoint-3", "samples", "pytorch_lora_weights.safetensors", "README.md"}
    assert expected_files <= set(out["files"])
    # The resumed run started from the interrupted run's checkpoint-2: one step of its own, three in the history.
    assert len(out["rewards"]) == 3
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and "TrainerCounters" in state["stateful_callbacks"]  # the trainer's counts
    assert sorted(p.name for p in (tmp_path / "samples").iterdir())[:2] == ["step_000000.json", "step_000000.png"]
    trained = ode_samples(trainer.policy)
    reloaded = ode_samples(FlowPolicy.from_pipeline(out["pipe"], max_sequence_length=24))
    base = ode_samples(example.build_policy())
    assert (reloaded - trained).abs().max() < 1e-5
    assert (base - trained).abs().max() > 1e-3


def test_dpo_example_pairs_follow_the_reward_and_the_first_loss_is_log2(tmp_path):
    example = load_example("dpo_preference_pairs.py")
    out = example.main(["--output_dir", str(tmp_path), "--max_steps", "2"])
    manifest, summary = out["manifest"], out["summary"]
    assert len(manifest) == summary["num_pairs"] > 0
    assert summary["num_pairs"] + sum(summary["num_skipped"].values()) == len(example.pool_rows())
    for row in manifest:  # the reward recomputed from the saved images: chosen scores higher
        target = row["columns"]["target_brightness"]
        score = {key: 1 - abs(np.asarray(Image.open(Path(out["pairs_dir"]) / row[key]), dtype=np.float64).mean()
                              / 255 - target) for key in ("chosen", "rejected")}
        assert score["chosen"] > score["rejected"]
        assert score["chosen"] == pytest.approx(row["totals"][row["chosen_source"]], abs=1e-6)  # float32 mean
    for trainer in (out["trainer"], out["in_memory"]):
        losses = [e["dpo_loss"] for e in trainer.state.log_history if "dpo_loss" in e]
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    lambdas = [e["sdpo/lambda"] for e in out["trainer"].state.log_history if "sdpo/lambda" in e]
    assert len(lambdas) == 2 and all(0.0 <= v <= 1.0 for v in lambdas)
    assert (tmp_path / "dpo" / "transformer" / "config.json").is_file() and (tmp_path / "dpo" / "README.md").is_file()


TINY_STAGE = ["--model", "tiny", "--vae_path", "", "--tiny_hidden_size", "32", "--tiny_num_heads", "2",
              "--tiny_axes_dims_rope", "4", "6", "6", "--tiny_num_single_layers", "1"]


@pytest.mark.ray
def test_grpo_stage_on_ray_workers_from_the_command_line_is_on_policy(tmp_path):
    """`rlhf-image grpo --num_rollout_workers 1` (the quoted `engine` region of the stage) through a private local
    Ray, in its own process so that Ray starts and stops with it. The importance ratio of both on-policy steps is
    exactly 1 (`debug_ratio_check` also raises otherwise): the worker samples with the trainer's weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_image.recipes.cli", "grpo", "--config", "tiny_grpo.yaml", *TINY_STAGE,
         "--max_steps", "2", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
         "--num_generations", "2", "--num_inference_steps", "4", "--height", "32", "--width", "32",
         "--synthetic_num_samples", "8", "--save_strategy", "no", "--log_samples_steps", "0",
         "--debug_ratio_check", "true", "--num_rollout_workers", "1", "--worker_threads", "1",
         # the random model's images all read alike: train on them anyway, so that every step shows its ratio
         "--skip_zero_advantage", "false",
         "--output_dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    banner = (r"1 Ray rollout worker\(s\) with [01] GPU each on a private local Ray on 127\.0\.0\.1; rewards scored "
              r"by the trainer; weights sent via object_store")  # 1 GPU where Ray finds one
    assert re.search(rf"^  rollouts +: {banner}$", result.stdout, re.MULTILINE), result.stdout[-4000:]
    assert f"[rlhf-image] grpo: 2 steps (2 in this run); model in {tmp_path}" in result.stdout
    record = json.loads((tmp_path / "rlhf_stage.json").read_text())
    assert record["stage"] == "grpo" and record["global_step"] == 2 and record["rewards"] == ["ocr"]
    ratios = [(e["ratio/min"], e["ratio/max"]) for e in record["log_history"] if "ratio/max" in e]
    assert ratios == [(1.0, 1.0), (1.0, 1.0)]
    assert (tmp_path / "transformer").is_dir() and (tmp_path / "model_index.json").is_file()


# --- the memory table ----------------------------------------------------------------------------------------------

def test_memory_table_matches_the_hand_formulas_and_the_recipe_guide(capsys):
    from rlhf_image.recipes.ovis_image import memory_table
    from rlhf_image.recipes.ovis_image.model import ovis_image_7b_transformer

    memory_table.main()
    printed = capsys.readouterr().out.strip("\n")
    model = ovis_image_7b_transformer(device="meta")
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert params == 7_370_449_728 and round(params / 1e9, 2) == 7.37  # the report's 7.37B
    rows = {line.split(" |")[0].strip("| "): [float(v) for v in line.split("|")[2:-1]]
            for line in printed.splitlines() if re.match(r"\| \d+ \(", line)}
    assert list(rows) == ["8 (1 x 8)", "16 (2 x 8)", "32 (4 x 8)", "64 (8 x 8)"]
    gib = 2**30
    # ZeRO-2 at 8 GPUs: 2P bf16 params + (2P grads + 12P Adam) / N, plus DeepSpeed's fp32 gradient partition 4P/N.
    n = 8
    zero2_hand = 2 * params + (2 * params + 12 * params) / n
    assert rows["8 (1 x 8)"][1] == round(zero2_hand / gib, 2) == 25.74
    assert rows["8 (1 x 8)"][0] == round((zero2_hand + 4 * params / n) / gib, 2)
    # ZeRO-3 at 64 GPUs: (2P + 2P + 12P) / N, plus DeepSpeed's 2P/N and one gathered layer (4 bytes per parameter).
    n = 64
    zero3_hand = (2 * params + 2 * params + 12 * params) / n
    assert rows["64 (8 x 8)"][3] == round(zero3_hand / gib, 2)
    assert rows["64 (8 x 8)"][2] == round((zero3_hand + 2 * params / n + 4 * largest) / gib, 2)
    # Frozen text encoder: 2.57B parameters (shared/reference/ovis_image.md), 2 bytes each in bf16.
    assert f"| {2_570_000_000:,} | {2 * 2.57e9 / gib:.2f} | {4 * 2.57e9 / gib:.2f} |" in printed
    guide = (REPO / "docs" / "ovis_image_recipe.md").read_text()
    assert f"<!-- output of {MEMORY_SCRIPT} -->\n{printed}\n" in guide, "docs/ovis_image_recipe.md: rerun the script"


# --- the cluster commands ------------------------------------------------------------------------------------------

def commands(path: str) -> list[str]:
    """The command lines of a shell file (comments, `exit` and blank lines dropped, continuations joined), with the
    placeholders replaced."""
    text = (REPO / path).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#") and line != "exit 1"]
    for key, value in PLACEHOLDERS.items():
        lines = [line.replace(key, value) for line in lines]
    return lines


def check_stage(argv: list[str], tmp_path: Path) -> tuple[str, tuple]:
    """Parse `<stage> --config <yaml> [flags]` as the CLI would; returns the stage and its parsed argument groups.
    The config's own first line must launch the same stage."""
    stage, rest = argv[0], argv[1:]
    assert stage in COMMANDS, stage
    config = rest[rest.index("--config") + 1]
    first_line = (REPO / config).read_text().splitlines()[0]
    assert f" {stage} --config {config}" in first_line, (config, first_line)
    _, parsed = parse_command(stage, [*rest, *stage_overrides(yaml.safe_load(open(REPO / config)), tmp_path)])
    return stage, parsed


def test_cluster_commands_parse_with_the_real_launchers(tmp_path, monkeypatch):
    from deepspeed.launcher.runner import fetch_hostfile
    from deepspeed.launcher.runner import parse_args as deepspeed_args
    from ray.scripts.scripts import cli as ray_cli
    from torch.distributed.run import get_args_parser

    monkeypatch.chdir(REPO)  # the configs name their DeepSpeed JSON relative to the repository root
    hosts = fetch_hostfile(str(REPO / HOSTFILE))
    assert list(hosts.values()) == [8, 8, 8, 8]
    seen = []
    for line in commands(CLUSTER_SCRIPT):
        words = shlex.split(line)
        while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # environment assignments before the command
            words.pop(0)
        tool, args = words[0], words[1:]
        if tool == "torchrun":
            parsed = get_args_parser().parse_args(args)
            assert parsed.module and parsed.training_script == "rlhf_image.recipes.cli"
            stage, (*_, grpo_config, rollout_args) = check_stage(parsed.training_script_args, tmp_path)
            processes = int(parsed.nnodes.split(":")[-1]) * int(parsed.nproc_per_node)
            if stage == "grpo":  # trainer processes sharing Ray workers: the config's 128 images per step
                assert processes == 4 and rollout_args.num_rollout_workers == 12 and grpo_config.deepspeed
                assert processes * grpo_config.rollout_batch_size == 128  # rollout_batch_size of one process
                seen.append(("torchrun", "grpo on ray"))
            else:
                assert processes == 32
                seen.append(("torchrun", stage))
        elif tool == "deepspeed":
            parsed = deepspeed_args(args)
            assert parsed.module and parsed.no_local_rank and parsed.user_script == "rlhf_image.recipes.cli"
            assert Path(parsed.hostfile) == Path(HOSTFILE)
            seen.append(("deepspeed", check_stage(parsed.user_args, tmp_path)[0]))
        elif tool == "ray":
            command = ray_cli.commands[args[0]]
            context = command.make_context(f"ray {args[0]}", args[1:])
            seen.append(("ray", args[0] + (" --head" if context.params.get("head") else "")))
        elif tool == "rlhf-image":
            import yaml

            stage, (*_, grpo_config, rollout_args) = check_stage(args, tmp_path)
            assert rollout_args.ray_address == "auto" and rollout_args.num_rollout_workers == 15
            # One trainer process samples per step what the config's own torchrun launch (its first line) samples.
            config_path = args[args.index("--config") + 1]
            config = yaml.safe_load(open(REPO / config_path))
            launch = get_args_parser().parse_args(shlex.split((REPO / config_path).read_text().splitlines()[0])[2:])
            processes = int(launch.nnodes.split(":")[-1]) * int(launch.nproc_per_node)  # nnodes "1:1" by default
            assert processes == 8
            per_step = processes * config["per_device_train_batch_size"] * config["gradient_accumulation_steps"]
            assert grpo_config.rollout_batch_size == per_step
            # The config's header gives the same command.
            header = " ".join(text.lstrip("#") for text in (REPO / config_path).read_text().splitlines()
                              if text.startswith("#")).replace("\\", " ")
            assert " ".join(line.split()) in " ".join(header.split()), f"{config_path}: header lacks {line!r}"
            seen.append(("rlhf-image", f"{stage} on ray"))
        else:
            raise AssertionError(f"{CLUSTER_SCRIPT}: no parser for {line!r}")
    assert seen == [("torchrun", "pretrain"), ("deepspeed", "sft"), ("ray", "start --head"), ("ray", "start"),
                    ("rlhf-image", "grpo on ray"), ("torchrun", "grpo on ray"), ("ray", "stop")]
