"""Shared fixtures: tiny diffusers pipelines built from configs (no download), offline environment."""

import os

for key, value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "ORT_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import tiny_flux_pipeline, tiny_ovis_pipeline  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ovis_pipe():
    return tiny_ovis_pipeline()


@pytest.fixture(scope="session")
def flux_pipe():
    return tiny_flux_pipeline()
