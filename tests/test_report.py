"""The demo report, from stage folders written here with known values: the OCR table, the facts, the curves
read from `log_history`, and a self-contained HTML page whose inline images are the written files."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import PIL.Image

from rlhf_image.recipes.ovis_image.report import curve, write_report

METRICS = {"pretrain": (0.25, 0.5), "sft": (0.5, 0.3125), "dpo": (0.625, 0.25), "grpo": (0.75, 0.125)}


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def demo_folder(root: Path) -> Path:
    write_json(root / "vae" / "rlhf_stage.json", {"stage": "fit-vae", "global_step": 3, "recon_l1": 0.0421,
                                                  "log_history": [{"step": i, "loss": 1.0 / i} for i in (1, 2, 3)]})
    PIL.Image.new("RGB", (64, 32), "gray").save(root / "vae" / "reconstructions.png")
    for stage, steps in (("pretrain", 4), ("sft", 2)):
        write_json(root / stage / "rlhf_stage.json", {
            "stage": stage, "global_step": steps, "skipped_images": 1,
            "log_history": [{"step": i, "loss": 2.0 - 0.25 * i, "data/skipped_images": 1} for i in range(1, steps + 1)]
            + [{"step": steps, "train_runtime": 1.0}]})
    write_json(root / "pairs" / "rlhf_stage.json", {"stage": "build-pairs", "summary": {
        "num_prompts": 8, "num_pairs": 6, "num_chosen_pool": 5, "num_chosen_generated": 1,
        "num_skipped": {"unreadable_pool_image": 1, "unscored": 0, "tie": 1}}})
    write_json(root / "dpo" / "rlhf_stage.json", {"stage": "dpo", "global_step": 2, "skipped_pairs": 1, "log_history": [
        {"step": 1, "loss": 0.6931, "rewards/accuracy": 0.5}, {"step": 2, "loss": 0.6, "rewards/accuracy": 1.0}]})
    write_json(root / "grpo" / "rlhf_stage.json", {"stage": "grpo", "global_step": 3, "log_history": [
        {"step": i, "loss": 0.0, "rewards/ocr/mean": 0.1 * i, "rewards/total/mean": 0.1 * i} for i in (1, 2, 3)]})
    for stage, (exact, ned) in METRICS.items():
        folder = root / "eval" / stage
        write_json(folder / "metrics.json", {"num_prompts": 8, "metrics": {
            "cfg1": {"word_accuracy": exact, "ned": ned, "ocr_reward": 1 - ned},
            "cfg3": {"word_accuracy": exact / 2, "ned": ned * 2, "ocr_reward": 1 - ned}}})
        for scale in ("cfg1", "cfg3"):
            PIL.Image.new("RGB", (32, 16), "white").save(folder / f"grid_{scale}.png")
    return root


def test_curve_reads_the_logged_values():
    history = [{"step": 1, "loss": 0.5}, {"step": 2, "eval_loss": 9.0}, {"step": 3, "loss": 0.25}, {"loss": 7.0}]
    assert curve(history, "loss") == ([1, 3], [0.5, 0.25])
    assert curve(history, "kl") == ([], [])


def test_report_table_facts_plots_and_self_contained_html(tmp_path):
    root = demo_folder(tmp_path / "demo")
    paths = write_report(str(root), timings={"pretrain": 12.4, "grpo": 30.0, "vae": 5.0}, title="T")
    markdown = Path(paths["markdown"]).read_text()
    assert "| stage | steps | time (s) | exact cfg1 | NED cfg1 | exact cfg3 | NED cfg3 |" in markdown
    assert "| pretrain | 4 | 12 | 0.250 | 0.500 | 0.125 | 1.000 |" in markdown
    assert "| sft | 2 | - | 0.500 | 0.312 | 0.250 | 0.625 |" in markdown
    assert "| grpo | 3 | 30 | 0.750 | 0.125 | 0.375 | 0.250 |" in markdown
    assert "- fit-vae: 3 steps, reconstruction L1 0.0421 (5 s)" in markdown
    assert "- pretrain: 4 steps (12 s), loss 1.7500 -> 1.0000, 1 unreadable images skipped" in markdown
    assert "dpo: 2 steps (- s), loss 0.6931 -> 0.6000, 1 unreadable pairs skipped" in markdown
    assert "grpo: 3 steps (30 s), loss 0.0000 -> 0.0000, rollout reward 0.100 -> 0.300" in markdown
    assert "build-pairs: 6 pairs from 8 prompts (pool image chosen 5, SFT sample chosen 1)" in markdown

    plots = Path(paths["plots"])
    expected = {"vae_loss", "pretrain_loss", "sft_loss", "dpo_loss", "dpo_preference", "grpo_reward", "grpo_loss",
                "ocr_by_stage"}
    assert {p.stem for p in plots.glob("*.png")} == expected
    for name in expected:
        assert PIL.Image.open(plots / f"{name}.png").size == (600, 320)
    for link in re.findall(r"\]\(([^)]+)\)", markdown):
        assert (root / "report" / link).is_file(), link

    page = Path(paths["html"]).read_text()
    assert "http" not in page and "<link" not in page and "<script" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(re.findall(r"!\[", markdown))  # every figure of the markdown, inline
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    # The inline images are the files, byte for byte, in the markdown's order.
    links = re.findall(r"\]\(([^)]+)\)", markdown)
    for src, link in zip(sources, links):
        assert base64.b64decode(src.split(",", 1)[1]) == (root / "report" / link).read_bytes()
    assert "<td>0.750</td>" in page and "<h1>T</h1>" in page


def test_report_of_an_unfinished_demo_lists_what_exists(tmp_path):
    root = tmp_path / "demo"
    write_json(root / "pretrain" / "rlhf_stage.json", {"stage": "pretrain", "global_step": 1,
                                                       "log_history": [{"step": 1, "loss": 1.5}]})
    paths = write_report(str(root))
    markdown = Path(paths["markdown"]).read_text()
    assert "- pretrain: 1 steps (- s), loss 1.5000 -> 1.5000" in markdown
    assert [p.name for p in Path(paths["plots"]).glob("*.png")] == ["pretrain_loss.png"]
