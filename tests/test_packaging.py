"""The library installs and imports under the one name `rlhf_image`: a user's own `rewards.py`, `rollout.py` and
`recipes.py` neither break the library nor are replaced by it, and the wheel holds nothing but `rlhf_image`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# repository folder -> the package it installs as
INSTALLED_AS = {"rlhf_image": "rlhf_image", "rewards": "rlhf_image/rewards", "rollout": "rlhf_image/rollout",
                "recipes": "rlhf_image/recipes"}

USER_MODULES = {
    "rewards.py": '''
        """The user's own rewards module (a common name in RL code)."""
        OWNER = "user"


        def brightness(prompts, images, **columns):
            return [sum(image.convert("L").getdata()) / (255.0 * image.width * image.height) for image in images]
    ''',
    "rollout.py": 'OWNER = "user"\n',
    "recipes.py": 'OWNER = "user"\n',
}

USER_SCRIPT = '''
    import sys

    import rewards, rollout, recipes  # the project's own modules, first on sys.path
    from rlhf_image import GRPOConfig, GRPOTrainer
    from rlhf_image.recipes.ovis_image.model import ovis_image_tiny, ovis_prefix_tokenizer
    from rlhf_image.policy import FlowPolicy
    import rlhf_image.rewards, rlhf_image.rollout

    policy = FlowPolicy.from_pipeline(ovis_image_tiny(tokenizer=ovis_prefix_tokenizer()), max_sequence_length=24)
    args = GRPOConfig(output_dir=sys.argv[1], use_cpu=True, report_to=[], disable_tqdm=True, num_generations=2,
                      per_device_train_batch_size=2, gradient_accumulation_steps=1, num_inference_steps=2,
                      resolution=32, guidance_scale=1.0, max_steps=1, save_strategy="no", log_samples_steps=0)
    trainer = GRPOTrainer(policy, rewards.brightness, args=args, train_dataset=[{"prompt": "a cat"}])
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "rewards/brightness/mean" in entry]
    assert len(steps) == 1, trainer.state.log_history
    for module in (rewards, rollout, recipes):
        assert module.OWNER == "user" and sys.modules[module.__name__] is module, module
    assert rlhf_image.rewards.__file__.endswith("rewards/__init__.py") and not hasattr(rlhf_image.rewards, "OWNER")
    print("ok", steps[0]["rewards/brightness/mean"])
'''


def test_user_modules_named_like_ours_coexist(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name, source in USER_MODULES.items():
        (project / name).write_text(textwrap.dedent(source))
    (project / "train.py").write_text(textwrap.dedent(USER_SCRIPT))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "train.py", str(tmp_path / "out")], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("ok "), result.stdout


def test_no_source_imports_a_top_level_name():
    """Inside the repository `import rewards` would still resolve (the folder is on sys.path when tests run from the
    root), so a leftover import would pass every other test and fail only when installed."""
    offenders = []
    for folder in ("rlhf_image", "rewards", "rollout", "recipes", "examples", "bench", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                words = line.split()
                if len(words) >= 2 and words[0] in ("from", "import") and \
                        words[1].split(".")[0] in ("rewards", "rollout", "recipes"):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_wheel_holds_only_rlhf_image(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the repository
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info",
                                                                 ".torch_extensions", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = tmp_path.glob("rlhf_image-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["rlhf_image"]
        entry_points = archive.read(top_level.replace("top_level.txt", "entry_points.txt")).decode()
    assert "rlhf-image = rlhf_image.recipes.cli:main" in entry_points
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"rlhf_image"}
    expected = {f"{INSTALLED_AS[folder]}/{path.relative_to(REPO / folder).as_posix()}"
                for folder in INSTALLED_AS for path in (REPO / folder).rglob("*")
                if path.suffix in (".py", ".yaml", ".json") and "__pycache__" not in path.parts}
    assert expected <= set(names), sorted(expected - set(names))
