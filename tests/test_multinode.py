"""Training across two Ray nodes: one worker per node, checkpoints in the shared storage path, the adapter loads.

The two nodes run on this machine: a head started with `ray start --head` and a second node joined with
`ray start --address`, each with its own temp dir and ports, the way a second host joins a real cluster. The driver
is a separate Python process that connects to the head and calls `medray.driver.run_training`, as a job driver on
the head would; it runs in its own process so its Ray connection and token settings never leak into this one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from raycluster import LocalRayCluster, local_ray_cluster
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_PRESET = "tiny-test"  # shipped in medray/presets

# A driver on its own: connect to the cluster, train, print where the summary went (the CLI's last line).
DRIVER = """
import sys
import ray
from medray.config import load_config
from medray.driver import run_training

ray.init(address=sys.argv[1], log_to_driver=False)
outcome = run_training(load_config(sys.argv[2], sys.argv[3:]))
print(f"summary: {outcome.summary_path}", flush=True)
"""


@pytest.fixture(scope="module")
def two_nodes():
    """Head + one more node, 2 CPUs each, token auth; both stopped after the module, pass or fail."""
    with local_ray_cluster(num_cpus=2, worker_nodes=1) as cluster:
        yield cluster


def alive_node_ids(cluster: LocalRayCluster) -> set[str]:
    status, answer = cluster.http("GET", "/api/v0/nodes?limit=100")
    assert status == 200, answer
    return {node["node_id"] for node in answer["data"]["result"]["result"] if node["state"] == "ALIVE"}


def run_driver(cluster: LocalRayCluster, overrides: list[str], timeout: float = 900) -> str:
    """Run DRIVER against the cluster with the tiny preset; returns its stdout, failing with its output."""
    command = [sys.executable, "-c", DRIVER, cluster.gcs_address, str(TINY_PRESET), *overrides]
    result = subprocess.run(command, env=cluster.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def test_workers_spread_over_two_nodes_and_share_checkpoints(two_nodes, tiny_mistral_dir, tmp_path):
    nodes = alive_node_ids(two_nodes)
    assert len(nodes) == 2, nodes
    storage = tmp_path / "shared"
    overrides = [
        f"model.name={tiny_mistral_dir}",
        f"run.storage_path={storage}",
        "run.name=two-nodes",
        "scaling.num_workers=2",
        "scaling.placement_strategy=STRICT_SPREAD",
    ]

    started = time.monotonic()
    stdout = run_driver(two_nodes, overrides)
    print(f"2-node training took {time.monotonic() - started:.1f}s")

    run_dir = storage / "two-nodes"
    assert stdout.strip().splitlines()[-1] == f"summary: {run_dir / 'summary.json'}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["node_ids"]) == 2
    assert set(summary["node_ids"]) == nodes, "the two workers did not run on the two different nodes"
    assert summary["steps"] == 6

    adapters = sorted(run_dir.glob("checkpoint_*/checkpoint/adapter_model.safetensors"))
    assert adapters, f"no checkpoint in the shared storage path {run_dir}"
    best = Path(summary["best_checkpoint"])
    assert best / "adapter_model.safetensors" in adapters
    assert_adapter_loads(tiny_mistral_dir, best)


def assert_adapter_loads(base_dir: Path, checkpoint: Path) -> None:
    """The checkpoint loads as a PEFT adapter on the base model, with the trained (non-zero) LoRA B weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(checkpoint))
    loaded = {name: param for name, param in model.named_parameters() if "lora_B" in name}
    assert loaded, "no LoRA weights in the loaded model"
    assert any(param.abs().sum() > 0 for param in loaded.values()), "LoRA B weights are all zero: never trained"
    for key, tensor in saved.items():
        if "lora_B" in key:
            match = [param for name, param in loaded.items() if name.startswith(key.removesuffix(".weight"))]
            assert match and match[0].detach().equal(tensor.to(match[0].dtype)), key
