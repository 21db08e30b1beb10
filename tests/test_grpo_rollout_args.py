"""`rlhf-image grpo`'s rollout flags (`RolloutArguments`): parsed next to the stage's other groups without a name
clash, listed by `--help`, in-process by default, and each bad value refused at parse time with the field and the
fix named. The stage on Ray workers runs in
`tests/test_docs.py::test_grpo_stage_on_ray_workers_from_the_command_line_is_on_policy`."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from rlhf_image.recipes.cli import main, parse_command
from rlhf_image.recipes.ovis_image.stages import grpo
from rlhf_image.recipes.ovis_image.stages.args import RolloutArguments

TINY = ["--config", "tiny_grpo.yaml", "--model", "tiny", "--vae_path", ""]
RAY_FLAGS = ["--ray_address", "--num_gpus_per_worker", "--num_reward_workers", "--num_cpus_per_reward_worker",
             "--weight_transport", "--worker_threads"]


def test_rollout_fields_clash_with_no_other_group_of_the_stage():
    assert grpo.ARGUMENTS[-1] is RolloutArguments
    own = {f.name for f in dataclasses.fields(RolloutArguments)}
    others = {f.name for group in grpo.ARGUMENTS[:-1] for f in dataclasses.fields(group)}
    assert own == {"num_rollout_workers", *(flag[2:] for flag in RAY_FLAGS)}
    assert not own & others


def test_grpo_help_lists_the_rollout_flags(capsys):
    assert main(["grpo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for flag in ["--num_rollout_workers", *RAY_FLAGS]:
        assert flag in out
    assert "N >= 1: N Ray rollout workers" in out and "'auto' joins the cluster of `ray start`" in out


def test_default_is_in_process_and_flags_fill_the_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, parsed = parse_command("grpo", TINY)
    assert parsed[-1] == RolloutArguments()
    assert parsed[-1].num_rollout_workers == 0 and grpo.build_rollout_engine(parsed[-1], parsed[0]) is None
    assert grpo.describe_engine(None, parsed[-1]) == "in the training process"
    _, parsed = parse_command("grpo", [*TINY, "--num_rollout_workers", "3", "--ray_address", "auto",
                                       "--num_gpus_per_worker", "0.5", "--num_reward_workers", "2",
                                       "--num_cpus_per_reward_worker", "2", "--weight_transport", "collective",
                                       "--worker_threads", "4"])
    assert parsed[-1] == RolloutArguments(num_rollout_workers=3, ray_address="auto", num_gpus_per_worker=0.5,
                                          num_reward_workers=2, num_cpus_per_reward_worker=2.0,
                                          weight_transport="collective", worker_threads=4)
    _, parsed = parse_command("grpo", [*TINY, "--num_rollout_workers", "1", "--ray_address", ""])
    assert parsed[-1].ray_address is None  # "" unsets it: a private local Ray


@pytest.mark.parametrize("flags, message", [
    (["--num_rollout_workers", "-1"], "num_rollout_workers=-1 must be >= 0"),
    (["--num_rollout_workers", "1", "--num_reward_workers", "-2"], "num_reward_workers=-2 must be >= 0"),
    (["--num_rollout_workers", "1", "--num_gpus_per_worker", "-1"], "num_gpus_per_worker=-1.0 must be >= 0"),
    (["--num_rollout_workers", "1", "--num_cpus_per_reward_worker", "-1"], "num_cpus_per_reward_worker=-1.0"),
    (["--num_rollout_workers", "1", "--worker_threads", "0"], "worker_threads=0 must be >= 1"),
    (["--num_rollout_workers", "1", "--weight_transport", "nccl"],
     "weight_transport='nccl'; use one of ['object_store', 'collective']"),
    # A Ray setting without Ray workers would be ignored: refused, naming both fixes.
    (["--ray_address", "auto"], "ray_address='auto' applies to Ray rollouts only"),
    (["--num_reward_workers", "4"], "set num_rollout_workers >= 1 or drop num_reward_workers"),
    (["--weight_transport", "collective"], "drop weight_transport"),
], ids=["workers", "reward_workers", "gpus", "reward_cpus", "threads", "transport", "address_alone",
        "reward_workers_alone", "transport_alone"])
def test_bad_rollout_values_fail_at_parse_time_naming_the_field(flags, message, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["grpo", *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert "rlhf-image grpo: error" in err and message in err


def test_ray_workers_under_a_multi_process_launcher_are_accepted_except_with_zero3(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # what torchrun and the deepspeed launcher set in each rank
    _, parsed = parse_command("grpo", [*TINY, "--num_rollout_workers", "2"])  # rank 0 drives them for all ranks
    assert parsed[-1].num_rollout_workers == 2
    # ZeRO-3 partitions the weights: refused before any worker starts (tests/test_shared_ray_engine.py runs ZeRO-2).
    zero3 = SimpleNamespace(world_size=8, process_index=0, deepspeed="ds_zero3.json",
                            hf_deepspeed_config=SimpleNamespace(config={"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="num_rollout_workers=2 with DeepSpeed ZeRO-3"):
        grpo.build_rollout_engine(parsed[-1], parsed[0], zero3)
