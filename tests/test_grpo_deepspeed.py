"""GRPO under DeepSpeed ZeRO-2 with two processes on the CPU (torchrun's environment with a file rendezvous,
tests/launch.py): each process samples its own groups, the on-policy ratio stays exactly 1, gradients are
synchronised (identical adapters on both ranks), the saved LoRA is the diffusers format, and skipping the
micro-batches whose advantages are all 0 gives the same weights as computing them. The first step's loss and
gradient norm are those of one process accumulating both processes' micro-batches without DeepSpeed (each trained
timestep is backpropagated on its own: ZeRO-2 reduces and accumulates every backward)."""

import json

import pytest
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_config
from launch import REPO, run_processes
from peft import LoraConfig

from rlhf_image import GRPOTrainer

def mostly_flat(prompts, images, **columns):  # reward spread for two prompts of eight only
    return [v if p.startswith(("a red house", "the sun")) else 0.5 for p, v in zip(prompts, brightness(prompts, images))]


SCRIPT = r'''
import hashlib, json, sys
sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[2] + "/tests")
from launch import init_process_group_from_env
init_process_group_from_env()
from peft import LoraConfig
from grpo_helpers import LORA_TARGETS, brightness, dataset, logged, ovis_policy, tiny_config
from rlhf_image import GRPOTrainer
out = sys.argv[1]

from test_grpo_deepspeed import mostly_flat

results = {}
for skip in (True, False):
    args = tiny_config(f"{out}/skip_{skip}", max_steps=2, deepspeed=out + "/ds.json", learning_rate=3e-2,
                       debug_ratio_check=True, skip_zero_advantage=skip)
    trainer = GRPOTrainer(ovis_policy(), mostly_flat, args=args, train_dataset=dataset(16),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    trainer.train()
    trainer.save_model(f"{out}/skip_{skip}/final")
    digest = hashlib.sha256()
    for name, p in sorted(trainer.model.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode()); digest.update(p.detach().float().cpu().numpy().tobytes())
    results[str(skip)] = {"weights": digest.hexdigest(), "ratio_max": logged(trainer, "ratio/max"),
                          "ratio_min": logged(trainer, "ratio/min"), "rewards": logged(trainer, "rewards/total/mean"),
                          "skipped": logged(trainer, "frac_skipped_zero_advantage"), "loss": logged(trainer, "loss"),
                          "grad_norm": logged(trainer, "grad_norm")}
with open(f"{out}/rank{trainer.args.process_index}.json", "w") as f:
    json.dump(results, f)
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
    for skip in ("True", "False"):
        assert ranks[0][skip]["weights"] == ranks[1][skip]["weights"]  # ZeRO-2 kept the replicas in sync
        for rank in ranks:
            # every computed micro-batch is on-policy (a fully skipped step logs no ratio)
            assert set(rank[skip]["ratio_max"]) == set(rank[skip]["ratio_min"]) == {1.0}
        assert len(ranks[0]["False"]["ratio_max"]) == 2
        assert ranks[0][skip]["rewards"] == ranks[1][skip]["rewards"]  # logged over both processes' samples
        assert (tmp_path / f"skip_{skip}" / "final" / "pytorch_lora_weights.safetensors").is_file()
    for rank in ranks:  # the same update with and without skipping, and something was skipped
        assert rank["True"]["weights"] == rank["False"]["weights"]
        assert sum(rank["True"]["skipped"]) > 0 and rank["False"]["skipped"] == [0.0, 0.0]

    # One process, no DeepSpeed, accumulating the micro-batches both processes trained (the same seeds and prompts).
    args = tiny_config(tmp_path / "one_process", max_steps=1, learning_rate=3e-2, skip_zero_advantage=False,
                       gradient_accumulation_steps=4)
    single = GRPOTrainer(ovis_policy(), mostly_flat, args=args, train_dataset=dataset(16),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    single.train()
    for key in ("loss", "grad_norm"):
        assert logged(single, key)[0] == pytest.approx(ranks[0]["False"][key][0], rel=1e-4), key
