"""DPOTrainer under DeepSpeed ZeRO-2 with two CPU processes (gloo)."""

import json
import math
import os

import pytest
from launch import REPO, run_processes


def test_dpo_trains_under_zero2_with_two_processes(tmp_path):
    pytest.importorskip("deepspeed")
    script = os.path.join(REPO, "tests", "scripts", "dpo_zero2.py")
    for done in run_processes(script, ["--output_dir", str(tmp_path)]):
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["world_size"] == 2 and result["zero_stage"] == 2
        assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
        assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # starts at the reference
        assert result["weights_after"] != result["weights_before"]  # it trained
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["weights_before"] == ranks[1]["weights_before"]
    assert ranks[0]["weights_after"] == ranks[1]["weights_after"]  # the ranks agree
    assert (tmp_path / "final" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
