"""One rank of `rlhf-image <stage> ...` launched by tests/launch.py: joins the process group through the file
rendezvous (no TCP store, so no name lookup), then runs the command line as torchrun would."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests"))

from launch import init_process_group_from_env  # noqa: E402

from rlhf_image.recipes.cli import main  # noqa: E402

if __name__ == "__main__":
    init_process_group_from_env()
    sys.exit(main(sys.argv[1:]))
