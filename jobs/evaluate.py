"""Entry point for `ray job submit`: score a run's base model and adapter(s) on the held-out split and MedQA.

    ray job submit --working-dir . -- python jobs/evaluate.py ~/medray_results/medray-demo \
        --medqa /data/medqa_usmle_4options_test.jsonl --replicas 2 --use-gpu

Takes the same arguments as `medray evaluate`; the last line printed is `summary: <path to summary.json>`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when medray is not installed

from medray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
