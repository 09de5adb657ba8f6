"""Entry point for `ray job submit`: a Ray Tune search (ASHA) over the LoRA fine-tuning job.

    ray job submit --working-dir . -- python jobs/tune.py --config tune-cpu-demo tune.num_samples=8

Takes the same `--config` and `key.sub=value` overrides as `medray tune`; the last line printed is
`summary: <path to summary.json>`. Submitting it again with the same `run.name` resumes an interrupted search.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when medray is not installed

from medray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
