"""NFTTrainer (DiffusionNFT) under DeepSpeed ZeRO-2 with two processes on the CPU (tests/launch.py): gradients are
synchronised (identical adapters and old policies on both ranks), a checkpoint holds the old policy, and the first
step's loss and gradient norm are those of one process accumulating both processes' micro-batches without DeepSpeed
(each noise level is backpropagated on its own: ZeRO-2 reduces and accumulates every backward)."""

import json

import pytest
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_nft_config
from launch import REPO, run_processes
from peft import LoraConfig
from test_grpo_deepspeed import DS_CONFIG

from rlhf_image import NFTTrainer

SCRIPT = r'''
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[2] + "/tests")
from launch import init_process_group_from_env
init_process_group_from_env()
from peft import LoraConfig
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_nft_config
from rlhf_image import NFTTrainer
out = sys.argv[1]
args = tiny_nft_config(f"{out}/run", max_steps=2, deepspeed=out + "/ds.json", learning_rate=3e-2, beta=0.05,
                       old_policy_decay_rate=0.25, save_strategy="steps", save_steps=2)
trainer = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(16),
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
trainer.train()
def digest(named):
    h = hashlib.sha256()
    for name, tensor in sorted(named):
        h.update(name.encode()); h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
result = {"weights": digest((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad),
          "old_policy": digest(trainer.old_policy.shadow.items()), "loss": logged(trainer, "loss"),
          "grad_norm": logged(trainer, "grad_norm"), "rewards": logged(trainer, "rewards/total/mean"),
          "old_policy_file": os.path.isfile(f"{out}/run/checkpoint-2/old_policy.safetensors")}
with open(f"{out}/rank{trainer.args.process_index}.json", "w") as f:
    json.dump(result, f)
'''


def test_two_process_zero2(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps(DS_CONFIG))
    (tmp_path / "run.py").write_text(SCRIPT)
    results = run_processes(str(tmp_path / "run.py"), [str(tmp_path), REPO], nprocs=2, timeout=900)
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["old_policy"] == ranks[1]["old_policy"]
    assert ranks[0]["rewards"] == ranks[1]["rewards"]  # logged over both processes' samples
    assert ranks[0]["old_policy_file"]

    # One process, no DeepSpeed, accumulating the micro-batches both processes trained (the same seeds and prompts).
    args = tiny_nft_config(tmp_path / "one_process", max_steps=1, learning_rate=3e-2, beta=0.05,
                           gradient_accumulation_steps=4)
    single = NFTTrainer(ovis_policy(), brightness, args=args, train_dataset=dataset(16),
                        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    single.train()
    for key in ("loss", "grad_norm"):
        assert logged(single, key)[0] == pytest.approx(ranks[0][key][0], rel=1e-4), key
