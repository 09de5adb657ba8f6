"""The benchmark's workload: the model shape, the rows, a random-weight model folder and the matmul peak.

The model is a random-weight `MistralForCausalLM` with Mistral-7B v0.3's exact config (7,248,023,552 parameters)
and the real v0.3 tokenizer (or a 2-layer model of the same vocabulary for CPU dry runs). Rows are `full` (exactly
max-length random ids, BOS first) or `real` (lengths drawn like the real data: Normal(892, 177) clipped to
[300, 1423], seed 0).

MFU in the benchmark divides by the measured bf16 matmul peak (`measure_peak_tflops`), not by the data-sheet figure
`medray.metrics.gpu_peak_flops` that training runs log with: the benchmark compares stacks on one machine, and a
measured peak takes the machine's clocks and power limit into account.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MISTRAL_7B_V03 = dict(
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    sliding_window=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
)
"""Mistral-7B v0.3's config.json, the numbers that matter."""
TINY_MISTRAL = dict(
    MISTRAL_7B_V03,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
)
"""The CPU dry run's 2-layer model; the test suite's tiny Mistral (tests/conftest.py) is built from it."""

FULL_LENGTH = 2048
REAL_LENGTHS = {"mean": 892, "sd": 177, "low": 300, "high": 1423}
"""Token lengths of medical-o1 `en` rows under the v0.3 tokenizer (mean 892, p90 1119, max 1423), at max length 2048."""


# ---------------------------------------------------------------------------------------------------- rows


def row_lengths(n_rows: int, lengths: str, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """`full`: every row `seq_len` tokens; `real`: the real data's shape, scaled by `seq_len / 2048`."""
    if lengths == "full":
        return np.full(n_rows, seq_len, dtype=np.int64)
    scale = seq_len / FULL_LENGTH
    drawn = rng.normal(REAL_LENGTHS["mean"] * scale, REAL_LENGTHS["sd"] * scale, size=n_rows)
    low, high = round(REAL_LENGTHS["low"] * scale), round(REAL_LENGTHS["high"] * scale)
    return np.clip(np.rint(drawn), low, high).astype(np.int64)


def make_rows(n_rows: int, lengths: str, seq_len: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pre-tokenized rows `{"input_ids", "length"}` of random ids 1000-31999 after BOS (1); never the pad id 0.

    The draws follow shared/gpu/bench_7b_batch.py (one generator: lengths first, then each row's ids), so `real`
    rows are the ones behind the 6,911 / 9,316 tokens/s of bare Unsloth.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for length in row_lengths(n_rows, lengths, seq_len, rng):
        ids = rng.integers(1000, 32000, size=int(length), dtype=np.int64)
        ids[0] = 1
        rows.append({"input_ids": ids.tolist(), "length": int(length)})
    return rows


def length_stats(lengths) -> dict[str, float]:
    """n, mean, median, p90, min and max of a list of row lengths."""
    values = np.asarray(list(lengths), dtype=np.float64)
    return {
        "n": int(values.size),
        "mean": round(float(values.mean()), 1),
        "median": round(float(np.median(values)), 1),
        "p90": round(float(np.percentile(values, 90)), 1),
        "min": int(values.min()),
        "max": int(values.max()),
    }


def group_by_length(rows: list[dict], step_rows: int) -> list[dict]:
    """Sort each run of `step_rows` rows (one optimizer step's) by length, longest first; steps keep their rows."""
    grouped = []
    for start in range(0, len(rows), step_rows):
        grouped.extend(sorted(rows[start : start + step_rows], key=lambda row: -row["length"]))
    return grouped


# ---------------------------------------------------------------------------------------------------- model


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Mistral-style decoder of this config, as medray's MFU counts them (built on the meta device,
    so the 7B shape costs no memory)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from medray.metrics import count_params_for_mfu

    with torch.device("meta"):
        return count_params_for_mfu(MistralForCausalLM(MistralConfig(**config)))


def load_tokenizer_source(source: str | Path):
    """A tokenizer folder, or Mistral's sentencepiece `tokenizer.model` converted (transformers 5 reads a folder
    holding only that file as the full 32,768-piece tokenizer); `<unk>` becomes the pad token."""
    from transformers import AutoTokenizer, LlamaTokenizer

    path = Path(source).expanduser()
    if path.is_file():
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy(path, Path(folder) / "tokenizer.model")
            tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=True, add_eos_token=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def default_tokenizer_source() -> Path:
    """The v0.3 sentencepiece model shipped in `mistral-common` (the CPU dry run's tokenizer)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def build_model_dir(folder: str | Path, tokenizer_source: str | Path, cpu: bool) -> dict[str, Any]:
    """Save a random-weight Mistral (7B v0.3 shape, or the tiny one on CPU) with its tokenizer as safetensors.

    The 7B weights are initialised in bf16 directly on GPU 0 (0.2 s) and saved in 5 GB shards (~15 s).
    """
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    started = time.perf_counter()
    tokenizer = load_tokenizer_source(tokenizer_source)
    shape = TINY_MISTRAL if cpu else MISTRAL_7B_V03
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda"):
        model = MistralForCausalLM._from_config(MistralConfig(**shape), dtype=torch.float32 if cpu else torch.bfloat16)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(str(folder))
    if Path(tokenizer_source).is_file():  # the sentencepiece model goes beside it, as shared/gpu's builder did
        shutil.copy(tokenizer_source, Path(folder) / "tokenizer.model")
    return {
        "dir": str(folder),
        "params": parameters,
        "vocab": len(tokenizer),
        "s": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------------------------------------- peak FLOP/s


def measure_peak_tflops(cuda: bool) -> dict[str, Any]:
    """Dense matmul TFLOP/s: bf16 8192^3 timed with CUDA events on GPU; fp32 1024^3 on CPU (dry runs only)."""
    import torch

    size, dtype, device, repeats = (8192, torch.bfloat16, "cuda", 20) if cuda else (1024, torch.float32, "cpu", 5)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        started = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - started
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    tflops = 2 * size**3 * repeats / seconds / 1e12
    return {"tflops": round(tflops, 1 if cuda else 4), "gpu": device_name, "matmul": f"{size}^3"}
