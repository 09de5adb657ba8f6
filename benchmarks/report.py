"""docs/benchmarks.json -> docs/benchmarks.md: a table per row-length kind, the floors, the projected reference run.

    python jobs/benchmark.py --table [--json docs/benchmarks.json] [--md docs/benchmarks.md]

A re-run replaces the earlier record of the same variant, GPUs, batch, lengths and knobs. Where several records
compete for a floor (e.g. medray on real rows with different knobs) the fastest is used, and named.

The projection of the reference run (1 epoch of medical-o1 `en`: 17,733 training rows, micro-batch x grad-accum x
GPUs = 16, five evaluations of 1,971 rows) takes, per GPU count, the fastest medray record on real-length rows with
that effective batch: training = 17,733 x 892 tokens at its tokens/s, plus its warm-up steps' extra time;
evaluations = 5 x 1,971 x 892 tokens forward-only, at the rate measured by bare Unsloth (`--eval-rows`) when a
record has it, else estimated at 3x the training rate (a forward pass costs about 1/3 of a training step's
forward + recompute + backward); start-up = the medray record's `fit()` plus `ray.init()` minus its training loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.generate_speed import GENERATION_RECORDS, generation_section
from benchmarks.reference_run import REFERENCE_RUN, reference_line, reference_section
from medray.report import markdown_table

REFERENCE = {"train_rows": 17_733, "mean_tokens": 892, "evaluations": 5, "eval_rows": 1_971, "effective_batch": 16}
EVAL_COST = 1 / 3
"""Forward-only cost per token relative to a training step (estimate, used when no evaluation was measured)."""
FLOOR_MINUTES = {1: 30, 2: 16}
LENGTH_TITLES = {
    "full": "Full rows (every row max-length tokens)",
    "real": "Real-length rows (Normal(892, 177) clipped to [300, 1423]: the real data's mean 892, p90 1119, max 1423)",
}


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON list of records (empty if the file is missing)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else []


def latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (variant, GPUs, batch, grad-accum, lengths, seq len, knobs): the last one written. The
    reference-run records (`benchmarks/reference_run.py`) have their own section and are left out."""
    kept: dict[str, dict] = {}
    for record in records:
        if record["variant"] == REFERENCE_RUN:
            continue
        knobs = {key: value for key, value in record.get("knobs", {}).items() if key != "profile"}
        key = json.dumps(
            [record[k] for k in ("variant", "gpus", "batch", "grad_accum", "lengths", "seq_len")] + [knobs]
        )
        kept.pop(key, None)
        kept[key] = record
    return list(kept.values())


def pick(records, variant: str, lengths: str, *, gpus=None, batch=None, accum=None, effective=None) -> dict | None:
    """The fastest (tokens/s per GPU) record matching; `effective` is batch x grad-accum x GPUs."""
    matches = [
        record
        for record in records
        if record["variant"] == variant
        and record["lengths"] == lengths
        and (gpus is None or record["gpus"] == gpus)
        and (batch is None or record["batch"] == batch)
        and (accum is None or record["grad_accum"] == accum)
        and (effective is None or record["batch"] * record["grad_accum"] * record["gpus"] == effective)
        and record.get("tokens_per_s_per_gpu")
    ]
    return max(matches, key=lambda record: record["tokens_per_s_per_gpu"]) if matches else None


def knob_text(record: dict[str, Any]) -> str:
    """`padded, sorted, pad 64, UNSLOTH_X=1`, or `default`."""
    knobs = record.get("knobs", {})
    parts = [] if knobs.get("padding", "auto") == "auto" else [knobs["padding"]]
    parts += ["sorted"] if knobs.get("sort_lengths") else []
    parts += [f"pad {knobs['pad_multiple']}"] if knobs.get("pad_multiple") else []
    parts += [f"{key}={value}" for key, value in (knobs.get("env") or {}).items()]
    return ", ".join(parts) or "default"


def label(record: dict[str, Any]) -> str:
    """Short name of a record for the floor and projection lines."""
    gpus = f", {record['gpus']} GPUs" if record["gpus"] > 1 else ""
    return (
        f"{record['variant']} {record['lengths']} {record['batch']}x{record['grad_accum']}{gpus} ({knob_text(record)})"
    )


# ---------------------------------------------------------------------------------------------------- floors


def floor_checks(records: list[dict[str, Any]]) -> list[tuple[str, float | None, str, bool | None]]:
    """(check, measured ratio, floor, passed) for every floor of the issue that the records allow."""
    a1 = pick(records, "medray", "full", gpus=1, batch=4, accum=1)
    a2 = pick(records, "medray", "full", gpus=2, batch=4, accum=1)
    b = pick(records, "bare", "full", batch=4, accum=1)
    c = pick(records, "peft", "full", batch=4, accum=1)
    checks = [
        ("(a) 1 GPU / (b), tokens/s per GPU, full rows", _ratio(a1, b, "tokens_per_s_per_gpu"), ">=", 0.98),
        ("(a) 2 GPUs / (b), tokens/s per GPU, full rows", _ratio(a2, b, "tokens_per_s_per_gpu"), ">=", 0.98),
        ("(a) / (c), tokens/s, full rows", _ratio(a1, c, "tokens_per_s_per_gpu"), ">=", 1.7),
        ("(a) / (c), peak reserved memory", _ratio(a1, c, "peak_reserved_gb"), "<=", 0.5),
        ("(a) 2 GPUs / 1 GPU, total tokens/s", _ratio(a2, a1, "tokens_per_s_total"), ">=", 1.94),
    ]
    checks += real_length_checks(records)
    return [(name, value, f"{sign} {bound}", _passes(value, sign, bound)) for name, value, sign, bound in checks]


def real_length_checks(records: list[dict[str, Any]]) -> list[tuple[str, float | None, str, float]]:
    """Issue 13's floors: medray against bare Unsloth at the same shape on real-length rows (tokens/s and peak
    memory), medray's real-length rate against its own full-row rate at micro-batch 4, full rows at 4 x 4."""
    checks = []
    for batch, accum in sorted({(r["batch"], r["grad_accum"]) for r in records if r["variant"] == "medray"}):
        medray = pick(records, "medray", "real", gpus=1, batch=batch, accum=accum)
        bare = pick(records, "bare", "real", batch=batch, accum=accum)
        if medray is None:
            continue
        shape = f"real rows {batch} x {accum}: {label(medray)}"
        checks.append((f"(a) / (b), tokens/s, {shape}", _ratio(medray, bare, "tokens_per_s_per_gpu"), ">=", 1.0))
        checks.append((f"(a) / (b), peak reserved, {shape}", _ratio(medray, bare, "peak_reserved_gb"), "<=", 1.05))
        own_full = pick(records, "medray", "full", gpus=1, batch=4)
        name = f"(a) real rows {batch} x {accum} / (a) full rows micro-batch 4, tokens/s"
        checks.append((name, _ratio(medray, own_full, "tokens_per_s_per_gpu"), ">=", 0.9))
    medray_full = pick(records, "medray", "full", gpus=1, batch=4, accum=4)
    if medray_full is not None:
        bare_full = pick(records, "bare", "full", batch=4, accum=4)
        checks.append(("(a) / (b), tokens/s, full rows 4 x 4", _ratio(medray_full, bare_full, "tokens_per_s_per_gpu"),
                       ">=", 0.98))  # fmt: skip
    return checks


def _ratio(top: dict | None, bottom: dict | None, field: str) -> float | None:
    if not top or not bottom or not top.get(field) or not bottom.get(field):
        return None
    return top[field] / bottom[field]


def _passes(value: float | None, sign: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value >= bound if sign == ">=" else value <= bound


# ---------------------------------------------------------------------------------------------------- projection


def reference_steps(gpus: int, batch: int, grad_accum: int) -> int:
    """Optimizer steps of one epoch of the reference run, as medray plans them (17,733 rows at 16: 1,108)."""
    from medray.config import load_config
    from medray.driver import planned_steps

    layout = [f"scaling.num_workers={gpus}", f"train.per_device_batch_size={batch}"]
    layout += [f"train.gradient_accumulation_steps={grad_accum}", "train.max_steps=-1", "train.num_epochs=1"]
    return planned_steps(load_config(None, layout), REFERENCE["train_rows"])


def eval_rate(records: list[dict[str, Any]]) -> tuple[float | None, str]:
    """Measured forward-only tokens/s per GPU on real rows (the fastest such record), and where it came from."""
    measured = [record for record in records if record.get("eval", {}).get("tokens_per_s")]
    if not measured:
        return None, "estimate: 3x the training rate (forward only, ~1/3 of a training step per token)"
    best = max(measured, key=lambda record: record["eval"]["tokens_per_s"])
    return best["eval"]["tokens_per_s"], f"measured: {label(best)}, {best['eval']['rows']} rows"


def project(record: dict[str, Any], eval_per_gpu: float | None, extra_startup_s: float = 0.0) -> dict[str, Any]:
    """Seconds of the reference run on `record['gpus']` GPUs, from that record's measured rates and start-up."""
    gpus = record["gpus"]
    rate = record["tokens_per_s_per_gpu"] * gpus
    warmup_extra_s = max(record.get("warmup_extra_s") or 0.0, 0.0)
    train_s = REFERENCE["train_rows"] * REFERENCE["mean_tokens"] / rate + warmup_extra_s
    eval_tokens = REFERENCE["evaluations"] * REFERENCE["eval_rows"] * REFERENCE["mean_tokens"]
    eval_s = eval_tokens / (eval_per_gpu * gpus) if eval_per_gpu else eval_tokens * EVAL_COST / rate
    startup_s = (record.get("startup") or {}).get("startup_s")
    startup_s = (startup_s or 0.0) + extra_startup_s
    total_s = train_s + eval_s + startup_s
    return {
        "gpus": gpus,
        "record": label(record),
        "steps": reference_steps(gpus, record["batch"], record["grad_accum"]),
        "tokens_per_s": rate,
        "train_s": train_s,
        "eval_s": eval_s,
        "startup_s": startup_s,
        "startup_measured": record.get("startup") is not None,
        "total_s": total_s,
        "floor_min": FLOOR_MINUTES.get(gpus),
        "passed": total_s / 60 <= FLOOR_MINUTES[gpus] if gpus in FLOOR_MINUTES else None,
    }


def projections(records, extra_startup_s: float = 0.0) -> tuple[list[dict[str, Any]], str]:
    """The projection for 1 and 2 GPUs (where records exist), and how evaluations were costed."""
    per_gpu, how = eval_rate(records)
    found = []
    for gpus in (1, 2):
        record = pick(records, "medray", "real", gpus=gpus, effective=REFERENCE["effective_batch"])
        if record is not None:
            found.append(project(record, per_gpu, extra_startup_s))
    return found, how


# ---------------------------------------------------------------------------------------------------- markdown


def render(records: list[dict[str, Any]], extra_startup_s: float = 0.0, generation: str | None = None) -> str:
    """The whole of docs/benchmarks.md (`generation`: the generation-speed section, placed before the commands)."""
    measured = reference_section(records)
    records = latest(records)
    if not records:
        empty = "# Benchmarks\n\nNo throughput records yet: run `bash tests/gpu/run.sh BUNDLE` on the GPU machine.\n"
        return empty + (f"\n{measured}\n" if measured else "")
    parts = [_header(records)]
    for lengths in ("full", "real"):
        chosen = [record for record in records if record["lengths"] == lengths]
        if chosen:
            parts.append(f"## {LENGTH_TITLES[lengths]}\n\n{_results_table(chosen)}")
    parts.append("## Floors\n\n" + _floors_table(floor_checks(records)))
    parts += [measured] if measured else []
    parts.append(_projection_section(records, extra_startup_s))
    parts += [generation] if generation else []
    parts.append("## Commands\n\n" + "\n".join(f"    {command}" for command in _commands(records)))
    return "\n\n".join(parts) + "\n"


def write_report(json_path: str | Path, md_path: str | Path, extra_startup_s: float = 0.0) -> Path:
    """Render the records at `json_path` (and the generation-speed records beside it) into `md_path`."""
    md_path = Path(md_path)
    generation = generation_section(Path(json_path).with_name(GENERATION_RECORDS))
    md_path.write_text(render(load_records(json_path), extra_startup_s, generation))
    return md_path


def _header(records: list[dict[str, Any]]) -> str:
    newest = max(records, key=lambda record: record["date"])
    dates = sorted({record["date"] for record in records})
    gpus = sorted({record["gpu"] for record in records if record.get("gpu")})
    peaks = sorted({record["peak_tflops"] for record in records if record.get("peak_tflops")})
    lengths = sorted({record["seq_len"] for record in records})
    version_text = ", ".join(f"{name} {version}" for name, version in newest["versions"].items() if version)
    return "\n".join(
        [
            "# Benchmarks: 4-bit QLoRA SFT at Mistral-7B v0.3 size",
            "",
            "Written by `python jobs/benchmark.py --table` from `docs/benchmarks.json`; do not edit by hand.",
            "",
            f"- Model: random-weight `MistralForCausalLM` with Mistral-7B v0.3's config ({newest['n_params']:,} "
            "parameters) and tokenizer; LoRA r=16 on q,k,v,o,gate,up,down; AdamW 8-bit; bf16; max length "
            f"{', '.join(map(str, lengths))}.",
            f"- GPU: {', '.join(gpus)}; measured bf16 matmul peak (8192^3): {', '.join(map(str, peaks))} TFLOP/s.",
            f"- Date: {', '.join(dates)}. Versions: {version_text}.",
            "- tokens/s: real tokens (never padding) of the steps after the warm-up, over their wall time; every "
            "step end is CUDA-synchronised. MFU = 6 x parameters x tokens/s per GPU / the measured peak. Peak "
            "reserved = `torch.cuda.max_memory_reserved()` over load and training, in GiB (the largest rank).",
        ]
    )


def _results_table(records: list[dict[str, Any]]) -> str:
    headers = [
        "variant",
        "GPUs",
        "micro-batch x accum",
        "tokens/s per GPU",
        "tokens/s total",
        "steady tokens/s",
        "peak reserved GiB",
        "MFU",
        "s/step (min-max)",
        "knobs",
    ]
    order = {"medray": 0, "bare": 1, "peft": 2}
    rows = []
    for record in sorted(records, key=lambda r: (order[r["variant"]], r["gpus"], r["batch"], r["grad_accum"])):
        rows.append(
            [
                record["name"],
                record["gpus"],
                f"{record['batch']} x {record['grad_accum']}",
                _number(record["tokens_per_s_per_gpu"]),
                _number(record["tokens_per_s_total"]),
                _number(record.get("tokens_per_s_steady")),
                _number(record["peak_reserved_gb"], 2),
                _number(record["mfu"], 3),
                f"{record['s_per_step']:.3f} ({record['s_per_step_min']:.3f}-{record['s_per_step_max']:.3f})",
                knob_text(record),
            ]
        )
    return markdown_table(headers, rows)


def _floors_table(checks) -> str:
    rows = [
        [name, "missing" if value is None else f"{value:.3f}", floor, _verdict(passed)]
        for name, value, floor, passed in checks
    ]
    return markdown_table(["check", "measured", "floor", "result"], rows)


def _projection_section(records, extra_startup_s: float) -> str:
    found, how = projections(records, extra_startup_s)
    title = "## Projected reference run: 1 epoch of medical-o1 `en`, effective batch 16, five evaluations"
    if not found:
        return f"{title}\n\nNo medray record on real-length rows with effective batch 16 yet."
    headers = [""] + [f"{item['gpus']} GPU" + ("s" if item["gpus"] > 1 else "") for item in found]
    lines = [
        ("record used", [item["record"] for item in found]),
        ("optimizer steps", [f"{item['steps']:,}" for item in found]),
        ("training tokens/s (all GPUs)", [_number(item["tokens_per_s"]) for item in found]),
        ("training: 17,733 rows x 892 tokens", [_minutes(item["train_s"]) for item in found]),
        ("evaluations: 5 x 1,971 rows x 892 tokens", [_minutes(item["eval_s"]) for item in found]),
        ("start-up (measured: ray.init + fit() - training loop)", [_minutes(item["startup_s"]) for item in found]),
        ("total", [f"**{_minutes(item['total_s'])}**" for item in found]),
        ("floor", [f"<= {item['floor_min']} min" for item in found]),
        ("result", [_verdict(item["passed"]) for item in found]),
    ]
    table = markdown_table(headers, [[name, *values] for name, values in lines])
    notes = [
        f"- Evaluations: {how}.",
        "- Training time includes the warm-up steps' extra time (first-step compiles) measured in the same run.",
        "- Start-up the benchmark does not see (driver-side data preparation, checkpoint saves): "
        f"{extra_startup_s:.0f} s added (`--extra-startup-s`).",
    ]
    return f"{title}\n\n{table}\n\n" + "\n".join(notes)


def summary_text(json_path: str | Path, extra_startup_s: float = 0.0) -> str:
    """A compact stdout summary: one line per record (with its slowest timed step), the floors, the projection."""
    everything = load_records(json_path)
    records = latest(everything)
    lines = [_summary_line(record) for record in records]
    lines += [reference_line(record) for record in everything if record["variant"] == REFERENCE_RUN][-1:]
    lines += [
        f"FLOOR {name}: {'missing' if v is None else f'{v:.3f}'} {floor} {_verdict(ok)}"
        for name, v, floor, ok in floor_checks(records)
    ]
    found, how = projections(records, extra_startup_s)
    for item in found:
        lines.append(
            f"PROJECTION {item['gpus']} GPU(s): {_minutes(item['total_s'])} = train {_minutes(item['train_s'])} + "
            f"eval {_minutes(item['eval_s'])} + start-up {_minutes(item['startup_s'])}; floor {item['floor_min']} min: "
            f"{_verdict(item['passed'])} [{item['record']}]"
        )
    return "\n".join(lines + ([f"(evaluations: {how})"] if found else []))


def _summary_line(record: dict[str, Any]) -> str:
    timed = record["steps"][record["warmup"] :]
    slowest = max(timed, key=lambda step: step[1]) if timed else None
    startup = (record.get("startup") or {}).get("startup_s")
    return (
        f"{label(record):55s} {_number(record['tokens_per_s_per_gpu']):>7} tok/s/GPU "
        f"(steady {_number(record.get('tokens_per_s_steady'))}, total {_number(record['tokens_per_s_total'])}) "
        f"peak {_number(record['peak_reserved_gb'], 2)} GiB MFU {_number(record['mfu'], 3)} "
        f"s/step {record['s_per_step']:.3f} ({record['s_per_step_min']:.3f}-{record['s_per_step_max']:.3f}) "
        f"graphs +{record.get('new_graphs_timed')}"
        + (f" slowest step {slowest[0]}: {slowest[1]:.3f} s, {slowest[2]} tokens" if slowest else "")
        + (f" start-up {startup:.0f} s" if startup is not None else "")
        + (f" eval {record['eval']}" if record.get("eval") else "")
        + _profile_text(record)
    )


def _profile_text(record: dict[str, Any]) -> str:
    """` profiled step: kernels 0.21 s of GPU time (median step 0.47 s)` when a step was profiled."""
    profiled = [step for step in record["steps"] if len(step) > 4 and step[4].get("profiled")]
    if not profiled or profiled[0][4].get("kernel_s") is None:
        return ""
    kernel_s = profiled[0][4]["kernel_s"]
    timed = [step[1] for step in record["steps"][record["warmup"] :] if len(step) == 4]
    median = sorted(timed)[len(timed) // 2] if timed else float("nan")
    return f" profiled step: kernels {kernel_s:.3f} s of GPU time (median step {median:.3f} s)"


def _commands(records: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for record in records:
        if record["command"] not in seen:
            seen.append(record["command"])
    return seen


def _number(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:,.0f} s)"


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "n/a"}[passed]
