"""VLMJudgeReward on tiny random Qwen2.5-VL and Qwen3-VL checkpoints: the score is the two-answer softmax of the
next-token logits computed by hand, a batch equals one-by-one scoring, bad settings are refused at construction,
the model loads once on first use and does not travel in pickles, and the served judge scores like the local one."""

from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")

from rlhf_image.rewards import RemoteReward, RewardSet, VLMJudgeReward, call_reward, serve_reward  # noqa: E402
from rlhf_image.rewards.server import load_reward  # noqa: E402

PROMPTS = ["a red cat", "a much longer prompt about two dogs in a park", "x", "a sign that says \"OPEN\""]
MODEL_TYPES = ["qwen2_5_vl", "qwen3_vl"]


def by_hand(model, tokenizer, image_processor, prompt, image):
    """P(Yes) for one sample: the Qwen chat text written out here, one unpadded forward, softmax of two logits."""
    vision = image_processor(images=[image.convert("RGB")], return_tensors="pt")
    num_image_tokens = int(vision["image_grid_thw"][0].prod()) // image_processor.merge_size ** 2
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * num_image_tokens + '<|vision_end|>Does this figure show "' + prompt
            + '"? Please answer yes or no.<|im_end|>\n<|im_start|>assistant\n')
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       mm_token_type_ids=(input_ids == model.config.image_token_id).int(), **vision).logits[0, -1]
    z_yes, z_no = logits[tokenizer.convert_tokens_to_ids("Yes")], logits[tokenizer.convert_tokens_to_ids("No")]
    return float(torch.exp(z_yes) / (torch.exp(z_yes) + torch.exp(z_no)))


@pytest.fixture(scope="module", params=MODEL_TYPES)
def judge(request, tiny_judges):
    path, model = tiny_judges[request.param]
    return VLMJudgeReward(str(path), dtype="float32", batch_size=4), model


def test_score_is_the_softmax_of_the_two_answer_logits(judge, varied_images):
    reward, model = judge
    scores = reward(PROMPTS, varied_images)
    expected = [by_hand(model, reward.processor.tokenizer, reward.processor.image_processor, p, im)
                for p, im in zip(PROMPTS, varied_images)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in scores) and max(scores) - min(scores) > 0.01  # the samples are told apart


def test_batch_equals_one_by_one(judge, varied_images):
    reward, _ = judge
    one_by_one = [reward([p], [im])[0] for p, im in zip(PROMPTS, varied_images)]
    reward.batch_size = 3  # a batch of 3 (left-padded to its longest row) and a batch of 1
    try:
        assert reward(PROMPTS, varied_images) == pytest.approx(one_by_one, abs=1e-5)
    finally:
        reward.batch_size = 4


def test_template_answers_and_image_size(tiny_judges, varied_images):
    path, model = tiny_judges["qwen2_5_vl"]
    with pytest.raises(ValueError, match=r"no \{prompt\} slot"):
        VLMJudgeReward(str(path), template="Is this a good image?")
    with pytest.raises(ValueError, match="'Yes please' is 8 tokens"):
        VLMJudgeReward(str(path), answers=("Yes please", "No"))
    with pytest.raises(ValueError, match="two different strings"):
        VLMJudgeReward(str(path), answers=("Yes", "Yes"))
    # Swapped answers give 1 - p; a custom question reaches the model; image_size fixes the patch grid.
    reward = VLMJudgeReward(str(path), dtype="float32")
    swapped = VLMJudgeReward(model, reward.processor, answers=("No", "Yes"))
    assert swapped(PROMPTS, varied_images) == pytest.approx([1 - s for s in reward(PROMPTS, varied_images)], abs=1e-6)
    custom = VLMJudgeReward(model, reward.processor, template='Is "{prompt}" drawn here? Yes or no.')
    text = custom.processor.tokenizer.decode(custom.inputs(["a cat"], varied_images[:1])["input_ids"][0])
    assert 'Is "a cat" drawn here? Yes or no.<|im_end|>' in text
    assert custom(PROMPTS, varied_images) != pytest.approx(reward(PROMPTS, varied_images), abs=1e-3)
    sized = VLMJudgeReward(model, reward.processor, image_size=(56, 112))
    assert sized.inputs(PROMPTS, varied_images)["image_grid_thw"].tolist() == [[1, 4, 8]] * 4


def test_loads_once_on_first_use_and_pickles_without_weights(tiny_judges, varied_images):
    path, _ = tiny_judges["qwen3_vl"]
    reward = VLMJudgeReward(str(path), dtype="float32")
    assert not reward.lazy_model.loaded  # constructing (tokenizer and processor only) loads no weights
    first = reward(PROMPTS, varied_images)
    assert reward(PROMPTS, varied_images) == first and reward.lazy_model.num_loads == 1
    payload = pickle.dumps(reward)
    assert len(payload) < 100_000  # the recipe and the processor, not the weights (about 300 KB in float32)
    copy = pickle.loads(payload)
    assert not copy.lazy_model.loaded and copy(PROMPTS, varied_images) == first


def test_in_process_and_served_judge_score_alike(tiny_judges, varied_images):
    path, _ = tiny_judges["qwen2_5_vl"]
    local = VLMJudgeReward(str(path), dtype="float32")
    expected = local(PROMPTS, varied_images)
    result = RewardSet([local], mode="sum_then_normalize")(PROMPTS, varied_images)  # in-process, as trainers call it
    assert result.column("vlm_judge").tolist() == expected == call_reward(local, PROMPTS, varied_images)
    # Behind the server, built the way `python -m rlhf_image.rewards.server --reward ... --kwargs` builds it.
    served = load_reward("rlhf_image.rewards:VLMJudgeReward", {"model": str(path), "dtype": "float32"})
    with serve_reward(served) as server:
        remote = RemoteReward(server.url, token=server.token, name="vlm_judge")
        assert remote(PROMPTS, varied_images) == pytest.approx(expected, abs=1e-6)  # PNG is lossless
