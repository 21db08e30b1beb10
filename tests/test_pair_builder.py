"""The preference-pair builder end to end on the tiny Ovis-Image pipeline with the real OCR reward (rapidocr)
and a brightness reward: manifest contents, resume, unreadable pool images, ties, and DPOTrainer on the folder."""

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import ImageDraw, ImageFont

import rlhf_image.pair_builder as pair_builder
from rlhf_image.dpo_config import DPOConfig
from rlhf_image.dpo_trainer import DPOTrainer
from rlhf_image.pair_builder import build_preference_pairs
from rlhf_image.policy import FlowPolicy
from rlhf_image.preference_data import PreferencePairDataset, read_jsonl
from tiny_models import tiny_ovis_pipeline

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
LOG2_FLOAT32 = 0.6931471824645996


def render(text: str, background: str = "white", ink: str = "black", size=(256, 64)) -> PIL.Image.Image:
    if not FONT.exists():
        pytest.skip(f"font {FONT} is not installed (make fonts)")
    face = ImageFont.truetype(str(FONT), 36)
    image = PIL.Image.new("RGB", size, background)
    ImageDraw.Draw(image).text((size[0] / 2, size[1] / 2), text, fill=ink, font=face, anchor="mm")
    return image


def brightness(prompts, images, **columns):
    return [float(np.asarray(image.convert("RGB"), dtype=np.float64).mean() / 255) for image in images]


def make_policy() -> FlowPolicy:
    return FlowPolicy.from_pipeline(tiny_ovis_pipeline(), max_sequence_length=16)


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr")
    from rlhf_image.rewards import OCRReward

    return OCRReward(num_threads=1)


def prompt_rows(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, image in {"hello": render("HELLO"), "open": render("OPEN"),
                        "wrong": render("XYZ", background="black", ink="white")}.items():
        paths[name] = str(folder / f"{name}.png")
        image.save(paths[name])
    paths["broken"] = str(folder / "broken.png")
    Path(paths["broken"]).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return [
        {"id": "hello", "prompt": 'a shop sign that says "HELLO"', "image": paths["hello"]},
        {"id": "open", "prompt": "a poster on a door", "image": paths["open"], "target_text": "OPEN"},
        {"id": "broken", "prompt": 'a label that reads "CAT"', "image": paths["broken"]},
        # The pool image shows the wrong text on black: OCR 0 and dark, so the generated image wins.
        {"id": "wrong", "prompt": 'a card that reads "WORLD"', "image": paths["wrong"]},
        {"id": "pil/1", "prompt": 'a banner with "HELLO"', "image": render("HELLO")},
    ]


def test_builds_pairs_with_ocr_and_brightness_then_resumes_and_trains(tmp_path, ocr, monkeypatch):
    rows = prompt_rows(tmp_path / "pool")
    out = tmp_path / "pairs"
    settings = dict(reward_weights=[1.0, 0.5], id_column="id", height=64, width=256, num_inference_steps=3,
                    guidance_scale=1.0, seed=7, batch_size=3, micro_batch_size=2)
    policy = make_policy()
    summary = build_preference_pairs(policy, rows, [ocr, brightness], out, **settings)

    assert summary["num_pairs"] == 4
    assert summary["num_skipped"] == {"unreadable_pool_image": 1, "unscored": 0, "tie": 0}
    assert summary["num_chosen_pool"] == 3 and summary["num_chosen_generated"] == 1
    assert summary["rewards"] == {"ocr": 1.0, "brightness": 0.5}
    assert json.loads((out / "summary.json").read_text()) == summary
    skipped = read_jsonl(out / "skipped.jsonl")
    assert [s["id"] for s in skipped] == ["broken"] and skipped[0]["reason"] == "unreadable_pool_image"

    manifest = {row["id"]: row for row in read_jsonl(out / "manifest.jsonl")}
    assert sorted(manifest) == ["hello", "open", "pil/1", "wrong"]
    assert manifest["pil/1"]["chosen"].startswith("images/pil_1-")  # ids are made file-name safe
    index = {row["id"]: i for i, row in enumerate(rows)}
    for pair_id, row in manifest.items():
        other = "generated" if row["chosen_source"] == "pool" else "pool"
        for source in ("pool", "generated"):
            scores = row["scores"][source]
            assert set(scores) == {"ocr", "brightness"}
            assert row["totals"][source] == pytest.approx(1.0 * scores["ocr"] + 0.5 * scores["brightness"])
        assert row["totals"][row["chosen_source"]] > row["totals"][other]
        assert row["seed"] == 7 + index[pair_id]
        # The saved PNGs are the scored images (lossless): re-scoring the files gives the recorded values.
        chosen = PIL.Image.open(out / row["chosen"])
        assert chosen.size == (256, 64)
        assert brightness([], [chosen])[0] == pytest.approx(row["scores"][row["chosen_source"]]["brightness"],
                                                           abs=1e-12)
        assert ocr([row["prompt"]], [PIL.Image.open(out / row["rejected"])], **row["columns"])[0] == pytest.approx(
            row["scores"][other]["ocr"])
    assert manifest["hello"]["chosen_source"] == "pool" and manifest["hello"]["scores"]["pool"]["ocr"] == 1.0
    assert manifest["open"]["scores"]["pool"]["ocr"] == 1.0 and manifest["open"]["columns"] == {"target_text": "OPEN"}
    assert manifest["wrong"]["chosen_source"] == "generated"
    assert manifest["wrong"]["scores"]["pool"]["ocr"] == 0.0

    # Resume: a second run finds everything done and generates nothing.
    before = (out / "manifest.jsonl").read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished folder was regenerated")

    monkeypatch.setattr(pair_builder, "generate", no_generation)
    again = build_preference_pairs(policy, rows, [ocr, brightness], out, **settings)
    assert again["last_run"] == {"num_new_pairs": 0, "num_already_done": 5,
                                 "num_new_skipped": {"unreadable_pool_image": 0, "unscored": 0, "tie": 0}}
    assert (out / "manifest.jsonl").read_bytes() == before
    assert again["num_pairs"] == 4

    # DPOTrainer reads the folder directly.
    assert len(PreferencePairDataset(out)) == 4
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), resolution=64, per_device_train_batch_size=2, max_steps=1,
                     report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    trainer = DPOTrainer(make_policy(), args=args, train_dataset=str(out))
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "dpo_loss" in entry]
    assert log["dpo_loss"] == LOG2_FLOAT32
    assert trainer.state.global_step == 1


def test_interrupted_run_continues_without_redoing_work(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"picture {i}", "image": PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))}
            for i in range(5)]
    calls = {"reward": 0, "generated": []}

    def flaky_brightness(prompts, images, **columns):
        calls["reward"] += 1
        if calls["reward"] == 2:
            raise RuntimeError("simulated crash while scoring the second batch")
        return brightness(prompts, images)

    flaky_brightness.__name__ = "brightness"
    real_generate = pair_builder.generate

    def counting_generate(policy, prompts, seeds, **kwargs):
        calls["generated"] += prompts
        return real_generate(policy, prompts, seeds, **kwargs)

    monkeypatch.setattr(pair_builder, "generate", counting_generate)
    settings = dict(height=16, width=16, num_inference_steps=2, guidance_scale=1.0, batch_size=2)
    policy = make_policy()
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_preference_pairs(policy, rows, flaky_brightness, tmp_path, **settings)
    assert [row["id"] for row in read_jsonl(tmp_path / "manifest.jsonl")] == ["00000000", "00000001"]
    calls["generated"].clear()
    summary = build_preference_pairs(policy, rows, flaky_brightness, tmp_path, **settings)
    assert calls["generated"] == ["picture 2", "picture 3", "picture 4"]  # only the unfinished prompts
    assert summary["num_pairs"] == 5 and summary["last_run"]["num_already_done"] == 2
    ids = [row["id"] for row in read_jsonl(tmp_path / "manifest.jsonl")]
    assert ids == [f"{i:08d}" for i in range(5)]
    # A redone prompt regenerates exactly what a straight run would have: compare with a fresh folder.
    monkeypatch.setattr(pair_builder, "generate", real_generate)
    straight = build_preference_pairs(policy, rows, brightness, tmp_path / "straight", **settings)
    assert straight["num_pairs"] == 5
    for a, b in zip(read_jsonl(tmp_path / "manifest.jsonl"), read_jsonl(tmp_path / "straight" / "manifest.jsonl")):
        assert a["totals"] == b["totals"] and a["chosen"] == b["chosen"]


def test_ties_and_unscored_pairs_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": f"picture {i}", "image": PIL.Image.new("RGB", (16, 16), (i * 40, 0, 0))} for i in range(3)]
    settings = dict(height=16, width=16, num_inference_steps=2, guidance_scale=1.0)

    def constant(prompts, images, **columns):
        return [0.5] * len(images)

    def cannot_score(prompts, images, **columns):
        return [None] * len(images)

    policy = make_policy()
    ties = build_preference_pairs(policy, rows, constant, tmp_path / "ties", **settings)
    assert ties["num_pairs"] == 0 and ties["num_skipped"]["tie"] == 3
    unscored = build_preference_pairs(policy, rows, [brightness, cannot_score], tmp_path / "unscored",
                                      reward_weights=[1.0, 1.0], **settings)
    assert unscored["num_pairs"] == 0 and unscored["num_skipped"]["unscored"] == 3
    # A zero-weight reward that cannot score does not block the pair (it is recorded as None).
    weighted = build_preference_pairs(policy, rows, [brightness, cannot_score], tmp_path / "weighted",
                                      reward_weights=[1.0, 0.0], **settings)
    assert weighted["num_pairs"] == 3
    row = read_jsonl(tmp_path / "weighted" / "manifest.jsonl")[0]
    assert row["scores"]["pool"]["cannot_score"] is None and math.isfinite(row["totals"]["pool"])
    with pytest.raises(ValueError, match="empty"):
        DPOTrainer(policy, args=DPOConfig(output_dir=str(tmp_path / "dpo"), resolution=16, report_to="none",
                                          use_cpu=True), train_dataset=str(tmp_path / "ties"))


# Hand-made scores for voting: (pool, generated) per prompt for three rewards; a pool image is a flat colour.
VOTE_TABLE = {  # prompt: {reward: (pool score, generated score)}
    "majority pool": {"hps": (5.0, 4.0), "clip": (0.3, 0.2), "pick": (20.0, 30.0)},  # 2-1 for the pool image
    "all generated": {"hps": (4.0, 6.0), "clip": (0.2, 0.4), "pick": (20.0, 21.0)},  # 0-3
    "split": {"hps": (5.0, 4.0), "clip": (0.2, 0.4), "pick": (21.0, 21.0)},  # 1-1, pick abstains (equal)
    "pick fails": {"hps": (5.0, 4.0), "clip": (0.3, 0.2), "pick": (None, None)},  # unscored
}


def table_reward(name):
    def reward(prompts, images, **columns):
        pixels = [np.asarray(image.convert("RGB")) for image in images]
        flat = [(x == x[0, 0]).all() for x in pixels]  # the pool images are one colour
        return [VOTE_TABLE[p][name][0 if is_pool else 1] for p, is_pool in zip(prompts, flat)]

    reward.__name__ = name
    return reward


def test_rewards_vote_on_each_pair(tmp_path):
    rows = [{"id": p.replace(" ", "_"), "prompt": p, "image": PIL.Image.new("RGB", (16, 16), (200, 30, 30))}
            for p in VOTE_TABLE]
    rewards = [table_reward(name) for name in ("hps", "clip", "pick")]
    settings = dict(id_column="id", height=16, width=16, num_inference_steps=2, guidance_scale=1.0,
                    pair_rule="vote")
    policy = make_policy()

    summary = build_preference_pairs(policy, rows, rewards, tmp_path / "equal", **settings)
    assert summary["num_pairs"] == 2 and summary["num_skipped"] == {"unreadable_pool_image": 0, "unscored": 1,
                                                                    "tie": 1}
    assert summary["pair_rule"] == "vote" and summary["vote_margins"] == {"hps": 0.0, "clip": 0.0, "pick": 0.0}
    pairs = {row["id"]: row for row in read_jsonl(tmp_path / "equal" / "manifest.jsonl")}
    majority = pairs["majority_pool"]
    assert majority["chosen_source"] == "pool"  # by votes, though PickScore's +10 makes the summed total prefer
    assert majority["totals"]["generated"] > majority["totals"]["pool"]  # the generated image
    assert majority["votes"] == {"hps": "pool", "clip": "pool", "pick": "generated"}
    assert majority["vote_totals"] == {"pool": 2.0, "generated": 1.0}
    assert majority["scores"] == {"pool": {"hps": 5.0, "clip": 0.3, "pick": 20.0},
                                  "generated": {"hps": 4.0, "clip": 0.2, "pick": 30.0}}
    assert pairs["all_generated"]["chosen_source"] == "generated"
    assert pairs["all_generated"]["vote_totals"] == {"pool": 0.0, "generated": 3.0}
    skipped = {row["id"]: row for row in read_jsonl(tmp_path / "equal" / "skipped.jsonl")}
    assert skipped["split"]["reason"] == "tie"
    assert skipped["split"]["votes"] == {"hps": "pool", "clip": "generated", "pick": "abstain"}
    assert skipped["pick_fails"]["reason"] == "unscored" and skipped["pick_fails"]["votes"]["pick"] is None
    assert skipped["pick_fails"]["scores"]["pool"] == {"hps": 5.0, "clip": 0.3, "pick": None}

    # HPSv3 weighted 2: it breaks the 1-1 split (2 against 1).
    weighted = build_preference_pairs(policy, rows, rewards, tmp_path / "weighted", reward_weights=[2.0, 1.0, 1.0],
                                      **settings)
    pairs = {row["id"]: row for row in read_jsonl(tmp_path / "weighted" / "manifest.jsonl")}
    assert weighted["num_pairs"] == 3 and pairs["split"]["chosen_source"] == "pool"
    assert pairs["split"]["vote_totals"] == {"pool": 2.0, "generated": 1.0}
    # A margin of 1.5 makes HPSv3 abstain on its differences of 1: the 2-1 majority becomes a 1-1 tie, and the
    # 1-1 split becomes 0-1 for the generated image ...
    margins = build_preference_pairs(policy, rows, rewards, tmp_path / "margins", vote_margins=[1.5, 0.0, 0.0],
                                     **settings)
    pairs = {row["id"]: row for row in read_jsonl(tmp_path / "margins" / "manifest.jsonl")}
    assert margins["num_pairs"] == 2 and margins["num_skipped"]["tie"] == 1
    assert pairs["split"]["chosen_source"] == "generated" and pairs["split"]["votes"]["hps"] == "abstain"
    # ... and a tolerance of 1 vote turns every 2-1 into "too small a margin": only the 0-3 pair is kept.
    tolerant = build_preference_pairs(policy, rows, rewards, tmp_path / "tolerant", tie_tolerance=1.0, **settings)
    assert tolerant["num_pairs"] == 1 and tolerant["num_skipped"]["tie"] == 2
    # The summed-total rule on the same scores: PickScore's scale decides the first pair.
    total = build_preference_pairs(policy, rows, rewards, tmp_path / "total",
                                   **{**settings, "pair_rule": "total"})
    pairs = {row["id"]: row for row in read_jsonl(tmp_path / "total" / "manifest.jsonl")}
    assert total["pair_rule"] == "total" and pairs["majority_pool"]["chosen_source"] == "generated"
    assert "votes" not in pairs["majority_pool"]

    with pytest.raises(ValueError, match="pair_rule must be one of"):
        build_preference_pairs(policy, rows, rewards, tmp_path / "bad", **{**settings, "pair_rule": "majority"})
    with pytest.raises(ValueError, match="one value >= 0 per reward"):
        build_preference_pairs(policy, rows, rewards, tmp_path / "bad", vote_margins=[0.0], **settings)
    with pytest.raises(ValueError, match="used by pair_rule='vote' only"):
        build_preference_pairs(policy, rows, rewards, tmp_path / "bad", vote_margins=[0.0] * 3,
                               **{**settings, "pair_rule": "total"})
