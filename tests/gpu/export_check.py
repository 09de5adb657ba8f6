"""`medray export` on the GPU path (Unsloth's merged_16bit) for the 7B shape: the merged model's logits beside the
4-bit base + adapter's, the base's, and the adapter's on the base's own 16-bit weights (what Unsloth merges into), on
one clinical sentence.

    python tests/gpu/export_check.py --model-dir /tmp/m7b              # on the GPU (after jobs/benchmark.py --build)
    python tests/gpu/export_check.py --cpu --model-dir /tmp/tiny       # the peft path on CPU (a tiny model)

The adapter's B matrices are random (0.02 scale) so that it changes the outputs. Prints one `EXPORTCHECK {json}`
line: seconds to make the adapter and to export, the files and size written, and the largest logit differences.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.generate_speed import make_adapter, run_config  # noqa: E402
from medray.export import export_merged  # noqa: E402
from medray.inference import load_for_inference, resolve_run  # noqa: E402
from medray.model import load_tokenizer  # noqa: E402

SENTENCE = "A 45-year-old man presents with chest pain radiating to the left arm."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--model-dir", default="/tmp/m7b")
    parser.add_argument("--work", default="/tmp/exportcheck")
    args = parser.parse_args()
    work, device = Path(args.work), torch.device("cpu" if args.cpu else "cuda:0")
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    started = time.perf_counter()
    cfg = run_config(args)
    make_adapter(cfg, work / "adapter", args.cpu, b_scale=0.02)
    out["adapter_s"] = round(time.perf_counter() - started, 1)
    run = resolve_run(work / "adapter")
    started = time.perf_counter()
    export_merged(run, work / "merged")
    out["export_s"] = round(time.perf_counter() - started, 1)
    out["files"] = sorted(path.name for path in (work / "merged").iterdir())
    out["merged_gib"] = round(sum(path.stat().st_size for path in (work / "merged").iterdir()) / 2**30, 2)
    ids = load_tokenizer(cfg.model)(SENTENCE, return_tensors="pt")["input_ids"].to(device)
    model, _ = load_for_inference(run, device=device)
    with torch.no_grad():
        tuned = model(input_ids=ids).logits.float().cpu()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float().cpu()
    del model
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if args.cpu else torch.bfloat16
    merged = AutoModelForCausalLM.from_pretrained(str(work / "merged"), dtype=dtype).to(device)
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float().cpu()
    out["max_abs_merged_vs_adapter"] = round((got - tuned).abs().max().item(), 4)
    out["max_abs_base_vs_adapter"] = round((base - tuned).abs().max().item(), 4)
    out["argmax_agree_merged_vs_adapter"] = round((got.argmax(-1) == tuned.argmax(-1)).float().mean().item(), 4)
    del merged
    out.update(_against_16bit_base(args.model_dir, run.adapter_dir, ids, dtype, device, got))
    print("EXPORTCHECK", json.dumps(out), flush=True)


def _against_16bit_base(model_dir, adapter_dir, ids, dtype, device, merged_logits) -> dict:
    """The merged model beside the adapter on the base's own 16-bit weights (what Unsloth's merge starts from)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base16 = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base16, str(adapter_dir)).eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float().cpu()
    difference = (merged_logits - reference).abs()
    return {
        "max_abs_merged_vs_16bit_adapter": round(difference.max().item(), 4),
        "mean_abs_merged_vs_16bit_adapter": round(difference.mean().item(), 5),
        "logit_scale_16bit_adapter": round(reference.abs().max().item(), 3),
        "argmax_agree_merged_vs_16bit_adapter": round(
            (merged_logits.argmax(-1) == reference.argmax(-1)).float().mean().item(), 4
        ),
    }


if __name__ == "__main__":
    main()
