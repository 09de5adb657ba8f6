"""The throughput benchmark, outside the product package: it drives medray through its public API only.

    bench.py      the three variants (medray on Ray Train, bare Unsloth, plain peft)
    cli.py        the command line of jobs/benchmark.py
    workload.py   the model shape, the rows, the random-weight model folder, the matmul peak
    steptimer.py  per-step wall time and real tokens; attaches to medray's workers as an extension
    records.py    one run's JSON record
    report.py     docs/benchmarks.json -> docs/benchmarks.md
    generate_speed.py  generation speed of a trained run (medray.generate)

Run it with `python jobs/benchmark.py ...` (see its docstring) or `ray job submit --working-dir . -- python
jobs/benchmark.py ...`.
"""
