"""DPOTrainer under DeepSpeed ZeRO-2 with two CPU processes (gloo), launched with torchrun."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dpo_trains_under_zero2_with_two_processes(tmp_path):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions")))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), os.path.join(REPO, "tests", "scripts", "dpo_zero2.py"),
               "--output_dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
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
