# `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every pip call goes through the constraints file so that no dependency can pull a CUDA torch.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# Offline, local-only run-time environment (no hub, no telemetry, Ray and DeepSpeed on the CPU).
RUN_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu \
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.torch_extensions RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled \
	ORT_DISABLE_TELEMETRY=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: setup fonts demo test bench clean

setup: $(VENV)/.installed fonts

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	touch $@

# Real fonts for the OCR tests and the text-rendering data (DejaVu for Latin, Noto CJK for Chinese).
fonts:
	@if ! ls /usr/share/fonts/opentype/noto/NotoSansCJK-*.ttc >/dev/null 2>&1 || ! ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1; then \
		apt-get update -q && apt-get install -y -q fonts-noto-cjk fonts-dejavu-core; fi

demo: setup
	$(RUN_ENV) $(VENV)/bin/rlhf-image demo

test: setup
	$(RUN_ENV) $(PY) -m pytest -q

bench: setup
	$(RUN_ENV) $(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .torch_extensions outputs
