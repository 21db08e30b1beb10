"""GRPOConfig: defaults, derived fields, and rejection of inconsistent settings with the field named."""

import dataclasses

import pytest
from transformers import HfArgumentParser

from rlhf_image import BaseConfig, GRPOConfig, OnlineConfig


def make(tmp_path, **overrides):
    return GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)


def test_defaults_construct_on_cpu_and_derive(tmp_path):
    args = make(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert args.micro_batch_size == 4  # follows per_device_train_batch_size
    assert args.rollout_batch_size == 8
    assert not args.remove_unused_columns
    args = make(tmp_path, per_device_train_batch_size=2, num_generations=2, num_inference_steps=8, sde_window_size=2)
    assert args.sde_window_range == [0, 8]  # defaults to the whole schedule


def test_every_field_documented():
    own = [f for f in dataclasses.fields(GRPOConfig) if f.name in GRPOConfig.__dataclass_fields__]
    for f in own:
        assert f.metadata.get("help"), f.name
    # Each field is documented in the docstring of the class that declares it.
    for cls, names in ((GRPOConfig, ("timestep_fraction", "epsilon", "beta", "train_with_cfg", "debug_ratio_check")),
                       (OnlineConfig, ("num_generations", "sde_window_range", "scale_rewards", "reward_aggregation",
                                       "max_consecutive_unscored", "peak_flops", "num_iterations"))):
        for name in names:
            assert f"{name} (`" in cls.__doc__, name
    own_fields = {f.name for f in dataclasses.fields(OnlineConfig)} - {f.name for f in dataclasses.fields(BaseConfig)}
    for name in own_fields - {"logging_steps"}:
        assert f"{name} (`" in OnlineConfig.__doc__, name


def test_parses_from_command_line(tmp_path):
    (args,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2",
         "--num_generations", "2", "--sde_type", "cps", "--sde_window_size", "2", "--sde_window_range", "1", "4",
         "--reward_weights", "1.0", "0.5", "--num_inference_steps", "6"])
    assert (args.sde_type, args.sde_window_range, args.reward_weights) == ("cps", [1, 4], [1.0, 0.5])


BAD = [
    ({"num_generations": 1}, "num_generations"),
    ({"num_generations": 3, "per_device_train_batch_size": 4}, "num_generations"),
    ({"micro_batch_size": 2, "per_device_train_batch_size": 4}, "micro_batch_size"),
    ({"sde_type": "ode"}, "sde_type"),
    ({"noise_level": 0.0}, "noise_level"),
    ({"sde_type": "cps", "noise_level": 1.5}, "noise_level"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"sde_window_size": 11, "num_inference_steps": 10}, "sde_window_size"),
    ({"sde_window_size": 2, "sde_window_range": [5, 12], "num_inference_steps": 10}, "sde_window_range"),
    ({"sde_window_size": 4, "sde_window_range": [0, 3]}, "sde_window_range"),
    ({"sde_window_range": [0, 3]}, "sde_window_range"),
    ({"timestep_fraction": 0.0}, "timestep_fraction"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"beta": -0.1}, "beta"),
    ({"num_iterations": 0}, "num_iterations"),
    ({"advantage_clip": -1.0}, "advantage_clip"),
    ({"scale_rewards": "prompt"}, "scale_rewards"),
    ({"reward_aggregation": "mean"}, "reward_aggregation"),
    ({"reward_weights": [1.0, float("nan")]}, "reward_weights"),
    ({"guidance_scale": 0.5}, "guidance_scale"),
    ({"max_consecutive_nonfinite": 0}, "max_consecutive_nonfinite"),
    ({"debug_ratio_check": True, "guidance_scale": 4.0, "train_with_cfg": False}, "debug_ratio_check"),
    ({"num_iterations": 2, "save_steps": 3}, "save_steps"),
    ({"peak_flops": -1.0}, "peak_flops"),
    ({"log_samples_steps": -1}, "log_samples_steps"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_settings_fail_at_construction_naming_the_field(tmp_path, overrides, field):
    values = {"per_device_train_batch_size": 4, **overrides}
    with pytest.raises(ValueError, match=rf"GRPOConfig\.{field}=.*Fix: "):
        make(tmp_path, **values)
