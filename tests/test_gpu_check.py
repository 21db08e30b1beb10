"""`bench/gpu_check.py --dry-run`: the GPU check's code runs on the CPU with a tiny model and prints its table."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_every_row(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--output-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert [cell.strip() for cell in header] == ["phase", "seconds", "MFU", "peak memory GiB", "note"]
    phases = [cells[0].strip() for cells in body]
    assert phases == [
        "bf16 matmul peak",
        "pretrain 32px, checkpointing off", "pretrain 32px, checkpointing on",
        "GRPO LoRA r=64 rollout 32px", "GRPO LoRA r=64 train 32px", "GRPO full rollout 32px", "GRPO full train 32px",
        "sampler 32px, 2 steps, CFG 5", "OvisImagePipeline 32px, 2 steps, CFG 5",
    ]
    timed = {cells[0].strip(): cells for cells in body[1:]}
    for phase, cells in timed.items():
        assert float(cells[1]) > 0, phase  # seconds
        if phase.startswith(("pretrain", "GRPO")):
            assert cells[2].strip().endswith("%"), phase  # an MFU
    assert "TFLOP/s measured" in body[0][4]
    assert "x the pipeline's time" in timed["sampler 32px, 2 steps, CFG 5"][4]
