"""Check `HPSv3Reward` against the authors' own code on a tiny random checkpoint (run by hand; needs two environments).

The `hpsv3` package pins transformers 4.45.2 and needs torchvision, so it cannot be installed beside this project.
Three steps:

    python tests/scripts/hpsv3_reference.py write DIR          # this project's environment: fixture + our scores
    REF/bin/python tests/scripts/hpsv3_reference.py official DIR   # an environment with hpsv3==1.0.0 (--no-deps),
                                                                  # transformers==4.45.2, torch, safetensors, pillow
    python tests/scripts/hpsv3_reference.py compare DIR

Use the same Pillow version in both environments: bicubic resizing changed between Pillow 12 and 13. Modules that the
authors' files import but the scoring path never calls (torchvision, matplotlib, trl, ...) are stubbed in `official`.
Result on 2026-11-22 (hpsv3 1.0.0, transformers 4.45.2 vs 5.25.0, torch 2.13.0 CPU, Pillow 12.3.0, four images of
300x500 to 97x203 px at the official 256*28*28 pixels): largest |difference| of (mu, sigma) 8.9e-8.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

PROMPTS = ["a cat on a mat", 'a poster that says "SALE"', "x", "two dogs {in} a park"]
SIZES = [(300, 500), (512, 512), (640, 360), (97, 203)]  # (height, width)


def write(root: Path) -> None:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_vlms import save_hpsv3_checkpoint, save_qwen2_vl_base

    from rlhf_image.rewards.hpsv3 import HPSV3_INSTRUCTION, HPSV3_SUFFIX, HPSv3Reward

    words = (HPSV3_INSTRUCTION.split("{text_prompt}")[0], "You are a helpful assistant.",
             HPSV3_SUFFIX.split("<|Reward|>")[0])
    base = save_qwen2_vl_base(root / "base", words)
    save_hpsv3_checkpoint(base, root / "checkpoint", seed=3)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        paths.append(str(root / f"image{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    (root / "inputs.json").write_text(json.dumps({"paths": paths, "prompts": PROMPTS}))
    reward = HPSv3Reward(root / "checkpoint", base, dtype="float32", batch_size=2)
    ours = reward.predict(PROMPTS, [Image.open(p) for p in paths])
    (root / "ours.json").write_text(json.dumps(ours.tolist()))


def official(root: Path) -> None:
    import torch  # noqa: F401  (imported before the stubs: transformers probes installed packages at import)
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration  # noqa: F401

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": lambda self, *args, **kwargs: None})

    for name in ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.io",
                 "matplotlib", "matplotlib.pyplot", "matplotlib.patches", "torch.utils.tensorboard", "pandas",
                 "datasets", "peft", "trl", "fire", "omegaconf", "cv2", "einops"]:
        sys.modules[name] = Stub(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].io = sys.modules["torchvision.io"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    from hpsv3.inference import HPSv3RewardInferencer
    from hpsv3.model.qwen2vl_trainer import Qwen2VLRewardModelBT
    from PIL import Image
    from safetensors.torch import load_file

    # create_model_and_processor of hpsv3/train.py, minus downloading base weights (all come from the checkpoint)
    base = str(root / "base")
    processor = AutoProcessor.from_pretrained(base, padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    config = AutoConfig.from_pretrained(base, attn_implementation="sdpa")
    config.use_cache = False
    model = Qwen2VLRewardModelBT(config, output_dim=2, reward_token="special", rm_head_type="ranknet",
                                 special_token_ids=processor.tokenizer.convert_tokens_to_ids(["<|Reward|>"]))
    model.resize_token_embeddings(len(processor.tokenizer))
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    model.load_state_dict(load_file(str(root / "checkpoint" / "HPSv3.safetensors")), strict=True)
    inferencer = HPSv3RewardInferencer.__new__(HPSv3RewardInferencer)
    inferencer.model, inferencer.processor, inferencer.device = model.eval(), processor, "cpu"
    inferencer.use_special_tokens = True
    inputs = json.loads((root / "inputs.json").read_text())
    with torch.no_grad():
        rewards = inferencer.reward([Image.open(p) for p in inputs["paths"]], inputs["prompts"])
    (root / "official.json").write_text(json.dumps(rewards.tolist()))


def compare(root: Path) -> float:
    ours, theirs = (json.loads((root / f"{name}.json").read_text()) for name in ("ours", "official"))
    diff = max(abs(a - b) for row, ref in zip(ours, theirs) for a, b in zip(row, ref))
    print(f"largest |difference| of (mu, sigma) over {len(ours)} samples: {diff:.3g}")
    return diff


if __name__ == "__main__":
    step, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    {"write": write, "official": official, "compare": compare}[step](folder)
