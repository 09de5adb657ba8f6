"""Entry point for `ray job submit`: fine-tune with LoRA under Ray Train.

    ray job submit --working-dir . -- python jobs/train.py --config mistral7b-medical-o1 scaling.num_workers=2

Takes the same `--config` and `key.sub=value` overrides as `medray train`; the last line printed is
`summary: <path to summary.json>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when medray is not installed

from medray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
