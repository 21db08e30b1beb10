"""Parsing a packaged stage config on a CPU test machine: flags that stand in for what the config names on a
cluster (input folders that must exist, bf16), so every other key and value is parsed and validated as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def stage_overrides(config: dict[str, Any], tmp_path: Path) -> list[str]:
    """Command-line flags replacing `config`'s input folders (by `tiny` / an empty pair folder) and bf16."""
    overrides = []
    if config.get("model") not in (None, "tiny", "7b"):
        overrides += ["--model", "tiny"]
    if config.get("vae_path") and config.get("model") in ("tiny", None):
        overrides += ["--vae_path", ""]
    if "pairs_path" in config:
        (tmp_path / "manifest.jsonl").write_text("")
        overrides += ["--pairs_path", str(tmp_path)]
    if config.get("bf16"):
        overrides += ["--bf16", "false", "--use_cpu", "true"]
    return overrides
