"""Serving a reward over HTTP and scoring through it: `rlhf_image.rewards.server` on 127.0.0.1 with a bearer token, and the
`RemoteReward` client with a timeout, retries and a failure policy. Useful when a reward needs another environment
(its own CUDA, packages or GPU) than the trainer.

From the command line, in the reward's environment (the token comes from an environment variable, never a flag,
so it does not show in `ps`; the client reads the same variable):

    # [start:cli]
    export REWARD_SERVER_TOKEN="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python -m rlhf_image.rewards.server --reward examples.custom_reward:ContrastReward --host 127.0.0.1 --port 8000
    # [end:cli]

In this file, the server runs in a background thread on a free port:

    python examples/served_reward.py
"""

from __future__ import annotations

import secrets

from rlhf_image.rewards import RemoteReward, RemoteRewardAuthError, RemoteRewardError, RewardServer

from custom_reward import ContrastReward, colour_match, sample_batch  # examples/custom_reward.py, beside this file


def main(argv: list[str] | None = None) -> dict:
    prompts, images, columns = sample_batch()
    token = secrets.token_urlsafe(32)

    # [start:serve]
    server = RewardServer(ContrastReward(), host="127.0.0.1", port=0, token=token)  # port 0: any free port
    server.start()  # a daemon thread; `with serve_reward(reward, token=...) as server:` does the same
    remote = RemoteReward(server.url, token=token, name="contrast_remote",
                          timeout=30.0,          # seconds for one whole attempt (upload, scoring, answer)
                          max_retries=2,         # after the first attempt: refused/reset/timeout, 429/502/503/504
                          backoff=0.1,           # sleeps 0.1 s, 0.2 s, ... (at most backoff_max) between attempts
                          on_failure="none")     # give up -> [None] * N (unscored), instead of raising
    remote_scores = remote(prompts, images, **columns)  # columns must be JSON values; PNGs go over the wire
    # [end:serve]
    local_scores = ContrastReward()(prompts, images)
    print(f"remote {remote_scores}\nlocal  {local_scores}\nhealth {remote.health()}")

    # [start:failures]
    try:
        RemoteReward(server.url, token="wrong", on_failure="none")(prompts, images)
    except RemoteRewardAuthError as error:  # 401/403 always raise: a wrong token would silently zero every advantage
        print(f"wrong token: {error}")
    server.close()
    unscored = remote(prompts, images)  # connection refused, retried twice, then None for every sample
    strict = RemoteReward(server.url, token=token, max_retries=0, on_failure="raise")
    try:
        strict(prompts, images)
    except RemoteRewardError as error:
        print(f"server gone: {error}")
    # [end:failures]
    print(f"after close, on_failure='none' gives {unscored} after {remote.last_attempts} attempts")

    # [start:mixed]
    from rlhf_image.rewards import RewardSet

    with RewardServer(ContrastReward(), token=token) as server:  # local and remote rewards compose as usual
        mixed = RewardSet([colour_match, RemoteReward(server.url, token=token, name="contrast_remote")],
                          weights=[1.0, 0.5])(prompts, images, **columns)
    # [end:mixed]
    print(f"mixed total: {mixed.total}")
    return {"remote": remote_scores, "local": local_scores, "unscored": unscored, "attempts": remote.last_attempts,
            "mixed": mixed}


if __name__ == "__main__":
    main()
