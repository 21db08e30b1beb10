"""examples/grpo_lora_custom_model.py and examples/nft_lora_custom_model.py run as a user would run them."""

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


def test_nft_example_trains_saves_and_reloads_for_both_losses(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for loss_type in ("nft", "awm"):
        out = tmp_path / loss_type
        result = subprocess.run([sys.executable, str(ROOT / "examples" / "nft_lora_custom_model.py"),
                                 "--output_dir", str(out), "--max_steps", "2", "--loss_type", loss_type],
                                capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "reloaded pipeline reward" in result.stdout
        assert ("(positive, negative) loss parts" in result.stdout) == (loss_type == "nft")
        assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
