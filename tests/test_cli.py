"""The command line, run as a user would."""

import subprocess
import sys

from PIL import Image


def test_demo_writes_a_sample_grid(tmp_path):
    result = subprocess.run([sys.executable, "-m", "recipes.cli", "demo", "--output-dir", str(tmp_path),
                             "--size", "32", "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "samples.png")
    assert grid.size == (4 * 32, 2 * 32)
