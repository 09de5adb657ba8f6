"""Entry point for the throughput benchmark (also for `ray job submit`); the logic is in `benchmarks.bench`.

    python jobs/benchmark.py --build --model-dir /tmp/m7b --tokenizer TOKENIZER.model
    python jobs/benchmark.py --variant medray --gpus 2 --lengths full --batch 4 --json docs/benchmarks.json
    ray job submit --working-dir . -- python jobs/benchmark.py --variant medray --gpus 2 --json /tmp/b.json
    python jobs/benchmark.py --table                       # docs/benchmarks.json -> docs/benchmarks.md

The GPU runs of docs/benchmarks.md: `bash tests/gpu/run.sh BUNDLE` (full rows) and `bash tests/gpu/run_real.sh
BUNDLE` (real-length rows). CPU dry run: `python jobs/benchmark.py --cpu --build` then `--cpu --variant medray`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir: benchmarks/, medray if not installed

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
