"""The demo report: what each stage of the tiny recipe did, read back from the stage folders alone.

`write_report(demo_dir)` reads `demo_dir/<stage>/rlhf_stage.json` (each trainer's `state.log_history`, counts)
and `demo_dir/eval/<stage>/metrics.json` plus its sample grids, and writes `demo_dir/report/`:

    index.html   a self-contained page: every image inline as a `data:image/png;base64` URI, no external asset
    README.md    the same summary in markdown: the OCR table per stage, links to grids and plots
    plots/       loss and reward curves (matplotlib, Agg backend), OCR accuracy per stage
    grids/       the held-out sample grids per stage (and the VAE reconstructions)
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
from typing import Any

# (stage folder, title) in pipeline order; eval folders are demo_dir/eval/<stage folder>.
STAGES = (("vae", "fit-vae"), ("pretrain", "pretrain"), ("sft", "sft"), ("pairs", "build-pairs"), ("dpo", "dpo"),
          ("grpo", "grpo"), ("nft", "nft"))
EVALUATED = ("pretrain", "sft", "dpo", "grpo", "nft")
# Curves per stage: (plot name, [(log key, label)]); a key missing from the log history is left out.
ROLLOUT_REWARD = ("reward", [("rewards/ocr/mean", "OCR reward (rollouts)"), ("rewards/total/mean", "total reward")])
CURVES = {
    "vae": [("loss", [("loss", "reconstruction loss")])],
    "pretrain": [("loss", [("loss", "flow-matching loss")])],
    "sft": [("loss", [("loss", "flow-matching loss")])],
    "dpo": [("loss", [("loss", "DPO loss")]),
            ("preference", [("rewards/accuracy", "implicit reward accuracy"), ("rewards/margin", "reward margin"),
                            ("sdpo/lambda", "SDPO loser scale")])],
    "grpo": [ROLLOUT_REWARD, ("loss", [("loss", "GRPO loss"), ("kl", "KL to the DPO model")])],
    "nft": [ROLLOUT_REWARD,
            ("loss", [("loss/positive", "positive part L(v+)"), ("loss/negative", "negative part L(v-)")])],
}


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def curve(log_history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """`(steps, values)` of a logged metric (entries without `key` skipped)."""
    points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_curves(log_history: list[dict[str, Any]], series: list[tuple[str, str]], title: str, path: str) -> bool:
    """One PNG with a curve per logged key of `series`; `False` (nothing written) when none was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [(label, *curve(log_history, key)) for key, label in series]
    found = [item for item in found if item[1]]
    if not found:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for label, steps, values in found:
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_ocr(rows: list[dict[str, Any]], path: str) -> bool:
    """Bars of exact match and 1 - NED per evaluated stage, for each CFG scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({scale for row in rows for scale in row["metrics"]})
    if not rows or not scales:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    width = 0.8 / (2 * len(scales))
    for k, scale in enumerate(scales):
        for j, (key, label) in enumerate((("word_accuracy", "exact"), ("ned", "1 - NED"))):
            values = [row["metrics"].get(scale, {}).get(key, float("nan")) for row in rows]
            values = [1 - v for v in values] if key == "ned" else values
            offset = (2 * k + j) * width - 0.4 + width / 2
            ax.bar([i + offset for i in range(len(rows))], values, width, label=f"{label} ({scale})")
    ax.set_xticks(range(len(rows)), [row["stage"] for row in rows])
    ax.set_ylim(0, 1)
    ax.set_title("held-out OCR accuracy by stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(demo_dir: str, timings: dict[str, float] | None = None,
                 title: str = "rlhf-image CPU demo") -> dict[str, str]:
    """Write `demo_dir/report/` from the stage folders (see the module docstring).

    Args:
        demo_dir (`str`): the demo's output folder.
        timings (`dict[str, float]`, *optional*): wall seconds per stage folder name, shown in the table.
        title (`str`): page title.

    Returns:
        `dict[str, str]`: paths of `html`, `markdown` and the plots folder, and `table`: the OCR table per stage
        in markdown.
    """
    timings = timings or {}
    out = os.path.join(demo_dir, "report")
    plots, grids = os.path.join(out, "plots"), os.path.join(out, "grids")
    os.makedirs(plots, exist_ok=True)
    os.makedirs(grids, exist_ok=True)
    records = {folder: _read_json(os.path.join(demo_dir, folder, "rlhf_stage.json")) for folder, _ in STAGES}

    figures: list[tuple[str, str, str]] = []  # (section, caption, relative path)
    for folder, name in STAGES:
        for plot, series in CURVES.get(folder, []):
            relative = f"plots/{folder}_{plot}.png"
            history = records[folder].get("log_history", [])
            if plot_curves(history, series, f"{name}: {plot}", os.path.join(out, relative)):
                figures.append((folder, f"{name}: {plot}", relative))
    recon = os.path.join(demo_dir, "vae", "reconstructions.png")
    if os.path.isfile(recon):
        shutil.copyfile(recon, os.path.join(grids, "vae_reconstructions.png"))
        figures.append(("vae", "VAE: renders (top) and reconstructions (bottom)", "grids/vae_reconstructions.png"))

    rows = []
    for folder in EVALUATED:
        summary = _read_json(os.path.join(demo_dir, "eval", folder, "metrics.json"))
        if not summary:
            continue
        rows.append({"stage": folder, "steps": records[folder].get("global_step"), "metrics": summary["metrics"],
                     "num_prompts": summary["num_prompts"]})
        for scale in summary["metrics"]:
            source = os.path.join(demo_dir, "eval", folder, f"grid_{scale}.png")
            if os.path.isfile(source):
                relative = f"grids/{folder}_{scale}.png"
                shutil.copyfile(source, os.path.join(out, relative))
                figures.append((folder, f"{folder}: held-out samples, {scale} (target -> OCR reading)", relative))
    if plot_ocr(rows, os.path.join(plots, "ocr_by_stage.png")):
        figures.insert(0, ("summary", "held-out OCR accuracy by stage", "plots/ocr_by_stage.png"))

    scales = sorted({scale for row in rows for scale in row["metrics"]})
    header = ["stage", "steps", "time (s)"] + [f"{m} {s}" for s in scales for m in ("exact", "NED")]
    table = [[row["stage"], _fmt(row["steps"]), _fmt(timings.get(row["stage"]), 0)]
             + [_fmt(row["metrics"].get(s, {}).get(m)) for s in scales for m in ("word_accuracy", "ned")]
             for row in rows]
    facts = _facts(records, timings)
    num_prompts = rows[0]["num_prompts"] if rows else 0

    intro = ("The tiny Ovis-Image model through the four stages of the recipe on the CPU (pretrain, SFT, DPO on "
             "OCR-scored pairs, GRPO with the OCR reward) and DiffusionNFT with the same reward from the same DPO "
             f"model, each evaluated on {num_prompts} held-out prompts (strings never trained on).")
    table_md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *["| " + " | ".join(r) + " |" for r in table]]
    md = [f"# {title}", "", intro, "", "## OCR accuracy on held-out prompts", "", *table_md, "",
          "## Stages", "", *[f"- {fact}" for fact in facts], "", "## Figures", ""]
    md += [f"### {caption}\n\n![{caption}]({relative})\n" for _, caption, relative in figures]
    markdown = os.path.join(out, "README.md")
    with open(markdown, "w", encoding="utf-8") as f:
        f.write("\n".join(md))

    page = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title><style>",
            "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
            "img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}figure{margin:1em 0}",
            "</style></head><body>", f"<h1>{html.escape(title)}</h1>",
            f"<p>{html.escape(intro)}</p>", "<h2>OCR accuracy on held-out prompts</h2><table>",
            "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>",
            *["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in table],
            "</table><h2>Stages</h2><ul>", *[f"<li>{html.escape(fact)}</li>" for fact in facts],
            "</ul><h2>Figures</h2>"]
    page += [f"<figure><img src=\"{_data_uri(os.path.join(out, relative))}\" alt=\"{html.escape(caption)}\">"
             f"<figcaption>{html.escape(caption)}</figcaption></figure>" for _, caption, relative in figures]
    page.append("</body></html>")
    index = os.path.join(out, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write("\n".join(page))
    return {"html": index, "markdown": markdown, "plots": plots, "table": "\n".join(table_md)}


def _facts(records: dict[str, dict[str, Any]], timings: dict[str, float]) -> list[str]:
    """One line per stage from its record."""
    facts = []
    vae = records["vae"]
    if vae:
        facts.append(f"fit-vae: {vae['global_step']} steps, reconstruction L1 {vae['recon_l1']:.4f} "
                     f"({_fmt(timings.get('vae'), 0)} s)")
    for folder in EVALUATED:
        record = records[folder]
        if not record:
            continue
        losses = curve(record.get("log_history", []), "loss")[1]
        line = f"{folder}: {record['global_step']} steps ({_fmt(timings.get(folder), 0)} s)"
        if losses:
            line += f", loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        if "skipped_images" in record:
            line += f", {record['skipped_images']} unreadable images skipped"
        if "skipped_pairs" in record:
            line += f", {record['skipped_pairs']} unreadable pairs skipped"
        rewards = curve(record.get("log_history", []), "rewards/total/mean")[1]
        if rewards:
            line += f", rollout reward {rewards[0]:.3f} -> {rewards[-1]:.3f}"
        facts.append(line)
    pairs = records["pairs"].get("summary")
    if pairs:
        facts.insert(min(3, len(facts)), f"build-pairs: {pairs['num_pairs']} pairs from {pairs['num_prompts']} prompts "
                     f"(pool image chosen {pairs['num_chosen_pool']}, SFT sample chosen "
                     f"{pairs['num_chosen_generated']}), skipped {pairs['num_skipped']} "
                     f"({_fmt(timings.get('pairs'), 0)} s)")
    return facts
