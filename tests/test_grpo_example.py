"""examples/grpo_lora_custom_model.py runs as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_example_trains_saves_and_reloads(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "grpo_lora_custom_model.py"),
                             "--output_dir", str(tmp_path), "--max_steps", "2"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded pipeline reward" in result.stdout
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "README.md").is_file()
