"""GRPO under DeepSpeed ZeRO-2 with two processes on the CPU (torchrun's environment with a file rendezvous,
tests/launch.py): each process samples its own groups, the on-policy ratio stays exactly 1, gradients are
synchronised (identical adapters on both ranks), and the saved LoRA is the diffusers format."""

import json

import pytest
from launch import REPO, run_processes

SCRIPT = r'''
import hashlib, json, sys
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[2] + "/tests")
from launch import init_process_group_from_env
init_process_group_from_env()
from peft import LoraConfig
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_config
from rlhf_image import GRPOTrainer
out = sys.argv[1]
args = tiny_config(out, max_steps=2, deepspeed=out + "/ds.json", learning_rate=3e-2, debug_ratio_check=True)
trainer = GRPOTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(16),
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
trainer.train()
trainer.save_model(out + "/final")
digest = hashlib.sha256()
for name, p in sorted(trainer.model.named_parameters()):
    if p.requires_grad:
        digest.update(name.encode()); digest.update(p.detach().float().cpu().numpy().tobytes())
with open(f"{out}/rank{trainer.args.process_index}.json", "w") as f:
    json.dump({"weights": digest.hexdigest(), "ratio_max": logged(trainer, "ratio/max"),
               "ratio_min": logged(trainer, "ratio/min"), "rewards": logged(trainer, "rewards/total/mean")}, f)
'''

DS_CONFIG = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
             "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
             "zero_allow_untested_optimizer": True, "steps_per_print": 1000000}


@pytest.mark.slow
def test_two_process_zero2(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps(DS_CONFIG))
    (tmp_path / "run.py").write_text(SCRIPT)
    results = run_processes(str(tmp_path / "run.py"), [str(tmp_path), REPO], nprocs=2, timeout=900)
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # ZeRO-2 kept the replicas in sync
    for rank in ranks:
        assert rank["ratio_max"] == rank["ratio_min"] == [1.0, 1.0]
    assert ranks[0]["rewards"] == ranks[1]["rewards"]  # logged over both processes' samples
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
