"""The planner (`megatron-dta plan`, `train --dry-run`): parameter accounting against transformers'
own model, K/V stack bytes against what the executor allocates, every shipped large config planned
at its world size, world size 1024 within a minute, and the one-line refusal of a layout that does
not fit.

The planner builds its fake process-group world in the process that runs it, and this test session
already runs a gloo world (conftest), so the planner runs in subprocesses: one computes every
case below (one import of megatron-core), the CLI cases run the command itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dta.config import Config
from megatron_dta.data import TrainData
from megatron_dta.engine import Engine
from megatron_dta.engine.executor import Executor
from megatron_dta.model.config import ModelConfig, preset
from megatron_dta.model.hf import config_to_hf
from megatron_dta.train import build_model, create_layout

# the planning subprocess takes ~3 CPU minutes (megatron-core's import, 32B meta models, 1M-token
# batches): on a shared machine its wall time can pass the suite's 900 s
# planning subprocesses at world sizes up to 1024: minutes of CPU, so `make test-fast` skips them
pytestmark = [pytest.mark.timeout(2400), pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PADDED = ModelConfig("qwen3", 1001, 64, 96, 4, 8, 4, qk_norm=True)  # vocab 1001 over tp=4: padding rows
LAYOUTS = [  # (model, tp, pp, world)
    ("qwen3-8b", 8, 1, 1024),
    ("qwen3-8b", 2, 4, 1024),
    ("1.7b", 2, 4, 64),  # tied embeddings: the last stage holds a copy of the embedding
    ("padded", 4, 2, 8),
]
# one task of the agentic workload keeps the path lengths (what the K/V stacks and a rank's
# activations depend on) at a fraction of the planning time of the configs' batches
ONE_TASK = "data.workload_args.num_tasks=1"
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("qwen3_*gpu*.yaml"))
KV_OVERRIDES = ["model.preset=tiny-qwen3", "engine.block_size=64", "data.workload=demo"]

CASES = f"""
import json, re, time, torch
from megatron_dta.config import Config
from megatron_dta.model.config import ModelConfig, preset
from megatron_dta.planner import load_profile, plan
from megatron_dta.planner.ranks import rank_shapes

out = {{"layouts": [], "configs": {{}}}}
for name, tp, pp, world in {LAYOUTS!r}:
    shapes = rank_shapes({PADDED!r} if name == "padded" else preset(name), tp, pp, world, torch.bfloat16)
    out["layouts"].append([len(shapes), sum(s.parameters for s in shapes.values()),
                           sum(s.allocated for s in shapes.values())])
for config in {CONFIGS!r}:
    cfg = Config.from_yaml("configs/" + config, [{ONE_TASK!r}])
    if cfg.model.hf_checkpoint is not None:
        continue
    world, gpu = re.search(r"_(\\d+)gpu(?:_(\\w+))?\\.yaml$", config).groups()
    r = plan(cfg, int(world), load_profile(gpu or "h100"), baselines=False)
    out["configs"][config] = {{**{{k: r[k] for k in ("fits", "parameters_total", "device_memory_bytes")}},
        "world": int(world), "ranks": len(r["ranks"]),
        "replica_parameters": sum(x["parameters"] for x in r["ranks"] if x["coords"]["dp"] == 0),
        "peak": max(x["memory_bytes"]["total"] for x in r["ranks"])}}
cfg = Config.from_yaml("configs/qwen3_8b_1024gpu.yaml", ["data.workload_args.num_tasks=2"])
t0 = time.process_time()
r = plan(cfg, 1024, load_profile("h100"))
out["w1024"] = {{"cpu_seconds": time.process_time() - t0, "ranks": len(r["ranks"]), "dp": r["layout"]["dp"]}}
r = plan(Config.from_yaml(None, {KV_OVERRIDES!r}), 1, load_profile("h100"), baselines=False)
out["kv_stacks"] = r["ranks"][0]["memory_bytes"]["kv_stacks"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def planned() -> dict:
    res = subprocess.run([PY, "-c", CASES], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "megatron_dta", *args]
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def hf_parameter_count(cfg: ModelConfig) -> int:
    """Parameters of transformers' own model for this architecture, built on the meta device."""
    import transformers

    config = transformers.AutoConfig.for_model(**config_to_hf(cfg))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_parameters_over_ranks_equal_hf_model(planned):
    for (name, tp, pp, _), (positions, owned, allocated) in zip(LAYOUTS, planned["layouts"]):
        cfg = PADDED if name == "padded" else preset(name)
        assert positions == tp * pp
        assert owned == hf_parameter_count(cfg), (name, tp, pp)
        # the ranks allocate more by exactly megatron's vocab padding, the tied copy and the
        # norms every TP rank holds (two per layer, q/k per-head norms, the final one)
        H, padded_vocab = cfg.hidden_size, -(-cfg.vocab_size // tp) * tp
        tables = 1 if cfg.tie_embeddings and pp == 1 else 2
        extra = (padded_vocab - cfg.vocab_size) * H * tables + cfg.vocab_size * H * (
            cfg.tie_embeddings and pp > 1
        )
        extra += (tp - 1) * (cfg.num_layers * (2 * H + 2 * cfg.head_dim * cfg.qk_norm) + H)
        assert allocated == owned + extra, (name, tp, pp)


def test_kv_stack_bytes_equal_what_the_executor_allocates(planned, monkeypatch):
    """The plan's kv_stacks term for a world of one is the executor's allocation on the same batch."""
    cfg = Config.from_yaml(None, KV_OVERRIDES)
    model = build_model(cfg, create_layout(cfg))
    data = TrainData(cfg.data, model.cfg.vocab_size)
    allocated = []
    real_alloc = Executor._alloc_stacks

    def record(self, plan):
        stacks = real_alloc(self, plan)
        allocated.append(sum(t.numel() * t.element_size() for group in stacks for t in group))
        return stacks

    monkeypatch.setattr(Executor, "_alloc_stacks", record)
    Engine(model, cfg.engine).forward_backward([data.rollouts[i] for i in data.next_indices()])
    assert allocated and planned["kv_stacks"] == max(allocated) > 0


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_fits_and_counts_parameters(planned, config):
    cfg = Config.from_yaml(ROOT / "configs" / config)
    if cfg.model.hf_checkpoint is not None:
        pytest.skip(f"{config} names a local HF checkpoint (the plan reads its config.json)")
    r = planned["configs"][config]
    assert r["fits"] and r["peak"] <= r["device_memory_bytes"]
    assert r["ranks"] == r["world"]
    assert r["parameters_total"] == r["replica_parameters"] == hf_parameter_count(cfg.model.model_config())


def test_plan_at_world_size_1024_within_a_minute(planned):
    r = planned["w1024"]
    assert r["ranks"] == 1024 and r["dp"] == 256
    # CPU time of the planning process: the machine is shared, so wall time measures the neighbours
    assert r["cpu_seconds"] < 60, r


def test_layout_that_does_not_fit_is_one_line_exit_2():
    res = _cli(
        "plan", "--config", "configs/qwen3_32b_8gpu_h200.yaml", "--world-size", "8", "--gpu", "h100", ONE_TASK
    )
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert re.match(
        r"error: rank \d+: [\d.]+ GiB of 80.0 GiB, largest term \w+ [\d.]+ GiB: .*parallel\.", line
    ), line


def test_train_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    run_dir = tmp_path / "run"
    res = _cli("train", "--dry-run", f"checkpoint.run_dir={run_dir}")
    assert res.returncode == 0, res.stderr
    assert "layout tp=1 pp=1 dp=1" in res.stdout and "| dta |" in res.stdout
    assert not run_dir.exists()
