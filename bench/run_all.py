"""Run the CPU benchmarks of `bench/` one after the other with their default (CPU) arguments, each in its own
process, and print each one's table and time: `make bench`.

`bench_tiny_text_learning.py` trains the demo model for minutes and runs only with `--all`; `gpu_check.py` runs
its `--dry-run` here (on a GPU machine run it directly).

    .venv/bin/python bench/run_all.py [--all]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BENCHMARKS = [
    ["bench_sde_step.py"], ["bench_grpo_step.py"], ["bench_grpo_memory.py"], ["bench_fm_step.py"],
    ["bench_cfg_batching.py"], ["bench_ocr.py"], ["bench_reward_server.py"], ["bench_ray_rollout.py"],
    ["gpu_check.py", "--dry-run"],
]
LONG = [["bench_tiny_text_learning.py"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="also the minutes-long learning benchmark")
    args = parser.parse_args()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", ORT_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1")
    failed = []
    for script, *arguments in BENCHMARKS + (LONG if args.all else []):
        print(f"\n=== {script} {' '.join(arguments)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(BENCH / script), *arguments], env=env)
        print(f"=== {script}: {'ok' if code == 0 else f'exit {code}'} in {time.perf_counter() - start:.0f} s",
              flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
