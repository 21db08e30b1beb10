"""Two trainer processes (gloo, DeepSpeed ZeRO-2) sharing one `RayRolloutEngine` through `SharedRolloutEngine`:
rank 0 drives two Ray rollout workers for both ranks' prompts and scatters the samples back. The run is the
2-process in-process run bit for bit: same rollouts and rewards, the on-policy ratio exactly 1, identical
weights after the steps (the second step samples with the weights synced after the first)."""

import json

import pytest
from launch import REPO, run_processes

pytestmark = pytest.mark.ray

SCRIPT = r'''
import functools, hashlib, json, sys
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[2] + "/tests")
from launch import init_process_group_from_env
init_process_group_from_env()
import torch
torch.set_num_threads(1)
from pathlib import Path
from grpo_helpers import brightness, dataset, logged, ovis_policy, tiny_config
from rlhf_image import GRPOTrainer, SharedRolloutEngine
out = sys.argv[1]


def run(name, engine):
    args = tiny_config(f"{out}/{name}", max_steps=2, deepspeed=out + "/ds.json", learning_rate=1e-2,
                       debug_ratio_check=True)
    trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(16), rollout_engine=engine)
    samples = []
    original = trainer._rollout
    def recording(rows):
        buffer = original(rows)
        samples.append(hashlib.sha256(b"".join(
            t.numpy().tobytes() for item in buffer for key, t in sorted(item.items())
            if isinstance(t, torch.Tensor))).hexdigest())
        return buffer
    trainer._rollout = recording
    trainer.train()
    digest = hashlib.sha256()
    for key, p in sorted(trainer.model.named_parameters()):
        digest.update(key.encode()); digest.update(p.detach().float().cpu().numpy().tobytes())
    return {"weights": digest.hexdigest(), "samples": samples, "ratio_min": logged(trainer, "ratio/min"),
            "ratio_max": logged(trainer, "ratio/max"), "rewards": logged(trainer, "rewards/total/mean"),
            "loss": logged(trainer, "loss"),
            "mismatch": logged(trainer, "ratio/on_policy_mismatch_total")}


result = {"local": run("local", None)}
rank = torch.distributed.get_rank()
inner, session = None, None
if rank == 0:
    from rlhf_image.rollout import RayRolloutEngine
    from rlhf_image.rollout.cluster import init_ray
    session = init_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": sys.argv[2] + "/tests"}})
    inner = RayRolloutEngine(functools.partial(ovis_policy, 0), num_workers=2, num_cpus_per_worker=0.25,
                             worker_threads=1)
engine = SharedRolloutEngine(inner)
try:
    result["ray"] = run("ray", engine)
finally:
    engine.close()
    if session is not None:
        session.shutdown()
Path(f"{out}/rank{rank}.json").write_text(json.dumps(result))
'''

DS_CONFIG = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
             "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
             "zero_allow_untested_optimizer": True, "steps_per_print": 1000000}


def test_two_zero2_processes_share_ray_workers_and_match_the_in_process_run(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps(DS_CONFIG))
    (tmp_path / "run.py").write_text(SCRIPT)
    results = run_processes(str(tmp_path / "run.py"), [str(tmp_path), REPO], nprocs=2, timeout=1200,
                            env={"RAY_USAGE_STATS_ENABLED": "0"})
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        local, ray = rank["local"], rank["ray"]
        assert ray["samples"] == local["samples"]  # the rollouts (latents, log-probs, advantages), bit for bit
        assert ray["ratio_min"] == ray["ratio_max"] == [1.0, 1.0]
        assert ray["mismatch"][-1] == 0
        assert ray["rewards"] == local["rewards"] and ray["loss"] == local["loss"]
        assert ray["weights"] == local["weights"]
    assert ranks[0]["ray"]["weights"] == ranks[1]["ray"]["weights"]
    assert ranks[0]["ray"]["samples"] != ranks[1]["ray"]["samples"]  # each rank trained on its own share
