"""Entry point for `ray job submit`: answer questions with a finished run's model (see `medray generate`).

    ray job submit --working-dir . -- python jobs/generate.py RUN_DIR --questions q.jsonl --output answers.jsonl

Takes the same arguments as `medray generate`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when medray is not installed

from medray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
