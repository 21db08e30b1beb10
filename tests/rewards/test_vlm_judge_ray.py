"""The VLM judge in Ray reward workers (`rlhf_image.rollout.reward_worker.RewardWorker` actors, as the rollout engine
starts them): shipped pickled from the driver, which never loads the weights, or built in the worker from a reward
recipe; each worker loads the model once and scores like the in-process judge."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from rlhf_image.rewards import VLMJudgeReward  # noqa: E402
from rlhf_image.rollout.reward_worker import RewardWorker  # noqa: E402
from rlhf_image.rollout.worker import RewardInputs  # noqa: E402

pytestmark = pytest.mark.ray

PROMPTS = ["a red cat", "two dogs", "x", 'a sign that says "OPEN"']


class ProbedRewardWorker(RewardWorker):
    """A reward worker that also reports how often each of its rewards loaded its model."""

    def num_loads(self) -> list[int]:
        return [f.lazy_model.num_loads for f in self.reward_set.funcs]


@pytest.fixture(scope="module")
def ray_session():
    from rlhf_image.rollout.cluster import init_ray

    # The workers import this module (for ProbedRewardWorker) from here.
    session = init_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield session
    session.shutdown()


def test_judge_in_reward_workers_scores_like_in_process(ray_session, tiny_judges, varied_images):
    import ray

    path, _ = tiny_judges["qwen2_5_vl"]
    judge = VLMJudgeReward(str(path), dtype="float32")
    inputs = RewardInputs(list(range(len(PROMPTS))), PROMPTS, varied_images)
    actor_cls = ray.remote(ProbedRewardWorker).options(num_cpus=0.5)
    pickled = actor_cls.remote([judge], build=False, num_threads=1)  # the engine's default: rewards pickled
    assert not judge.lazy_model.loaded  # the driver shipped the recipe, not weights
    built = actor_cls.remote([functools.partial(VLMJudgeReward, str(path), dtype="float32")], build=True,
                             num_threads=1)  # reward_recipes: built in the worker
    for actor in (pickled, built):
        first = ray.get(actor.score.remote(inputs, {}), timeout=120)
        second = ray.get(actor.score.remote(inputs, {}), timeout=120)
        assert ray.get(actor.num_loads.remote()) == [1]  # loaded once, at the first batch
        assert ray.get(actor.names.remote()) == ["vlm_judge"]
        assert first.shape == (4, 1) and (first == second).all()
        local = judge(PROMPTS, varied_images)  # in-process
        assert first[:, 0].tolist() == pytest.approx(local, abs=1e-6)
    assert judge.lazy_model.num_loads == 1  # the driver loaded only for the in-process comparison
    for actor in (pickled, built):
        ray.kill(actor)
