"""The planner (`megatron-dta plan`, `train --dry-run`): parameter accounting against transformers'
own model, K/V stack bytes against what the executor allocates, every shipped large config planned
at its world size, world size 1024 within a minute, and the one-line refusal of a layout that does
not fit. Context parallelism and MoE with expert parallelism: parameters over CP and EP layouts,
CP stack shards against the executor's ``ShardedStacks``, the EP all-reduce bytes against the
batch's distinct tokens, and the shipped CP and MoE configs planned.

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


# context and expert parallelism: tiny models at small world sizes, plus the shipped CP and MoE
# configs (one planning subprocess, ~30 s)
TINY = ["engine.block_size=64", "data.workload=demo", "engine.activation_budget_tokens=1000000000"]
CP_EP_CASES = {  # name: (overrides, world, gpu)
    "ep": (["model.preset=tiny-moe", "parallel.ep=2", *TINY], 4, "h100"),
    "ep_dp1": (["model.preset=tiny-moe", "parallel.ep=2", *TINY], 2, "h100"),
    "cp": (["model.preset=tiny-qwen3", "parallel.cp=2", *TINY], 4, "h100"),
    "cp1_w1": (["model.preset=tiny-qwen3", *TINY], 1, "h100"),
    "cp2_w2": (["model.preset=tiny-qwen3", "parallel.cp=2", *TINY], 2, "h100"),
}
BIG_CASES = {  # name: (config, overrides, world, gpu)
    "cp4": ("qwen3_8b_128k_cp4.yaml", [ONE_TASK], 16, "h100"),
    "cp4_as_cp1": ("qwen3_8b_128k_cp4.yaml", [ONE_TASK, "parallel.cp=1"], 4, "h100"),
    "a3b": ("moe_qwen3_30b_a3b_8h200_ep8.yaml", [ONE_TASK], 8, "h200"),
    "a3b_8192": (
        "moe_qwen3_30b_a3b_8h200_ep8.yaml",
        [ONE_TASK, "engine.activation_budget_tokens=8192"],
        8,
        "h200",
    ),
}
CP_EP_SCRIPT = f"""
import json
from megatron_dta.config import Config
from megatron_dta.errors import UserError
from megatron_dta.planner import check_fits, load_profile, plan

def run(cfg, world, gpu):
    r = plan(cfg, world, load_profile(gpu), baselines=False)
    try:
        check_fits(r)
        r["refusal"] = None
    except UserError as e:
        r["refusal"] = str(e)
    return r

out = {{name: run(Config.from_yaml(None, ov), w, g) for name, (ov, w, g) in {CP_EP_CASES!r}.items()}}
for name, (c, ov, w, g) in {BIG_CASES!r}.items():
    out[name] = run(Config.from_yaml("configs/" + c, ov), w, g)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def planned_cp_ep() -> dict:
    res = subprocess.run(
        [PY, "-c", CP_EP_SCRIPT], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _replica_parameters(report: dict) -> int:
    """Parameters of one model replica: the ranks of DP rank 0 and CP rank 0 (the others copy them)."""
    return sum(r["parameters"] for r in report["ranks"] if r["coords"]["dp"] == 0 and r["coords"]["cp"] == 0)


@pytest.mark.parametrize("case", ["ep", "cp"])
def test_cp_and_ep_layouts_count_the_hf_model_once(planned_cp_ep, case):
    r = planned_cp_ep[case]
    overrides, world, _ = CP_EP_CASES[case]
    mcfg = Config.from_yaml(None, overrides).model.model_config()
    assert sorted(x["rank"] for x in r["ranks"]) == list(range(world))
    assert r["layout"]["dp"] == 2 and r["layout"][case] == 2
    assert _replica_parameters(r) == r["parameters_total"] == hf_parameter_count(mcfg)
    if case == "ep":  # an EP rank > 0 owns only its experts: num_experts / ep of every MoE layer's
        expert = 3 * mcfg.hidden_size * mcfg.moe_intermediate_size * mcfg.num_experts // 2
        owned = {x["coords"]["ep"]: x["parameters"] for x in r["ranks"]}
        assert owned[1] == len(mcfg.moe_layers) * expert


def test_cp2_kv_stacks_are_the_executors_shards_of_half_the_path(planned_cp_ep):
    """CP=1's kv_stacks is the executor's allocation (test above); CP=2's is ``ShardedStacks`` of the
    same path, ~half."""
    from megatron_dta.engine.context_parallel import ShardedStacks

    mcfg = preset("tiny-qwen3")
    kv1 = planned_cp_ep["cp1_w1"]["ranks"][0]["memory_bytes"]["kv_stacks"]
    per_position = mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * 4 * 4  # K, V, dK, dV float32
    max_path, rest = divmod(kv1, per_position)
    assert rest == 0 and max_path > 100
    stacks = ShardedStacks(
        mcfg.num_layers, (mcfg.num_kv_heads, mcfg.head_dim), torch.float32, torch.float32, max_path, 2, "meta"
    )
    sharded = sum(t.numel() * t.element_size() for group in stacks for t in group)
    ranks = planned_cp_ep["cp2_w2"]["ranks"]
    assert [x["memory_bytes"]["kv_stacks"] for x in ranks] == [sharded, sharded]
    assert abs(sharded / kv1 - 0.5) <= 1.5 / max_path + 1e-12  # ceil(path / 2) + 1 rows
    # kept activations: the CP=1 rank's, halved, plus the gathered K/V a leaf unit keeps
    act1, act2 = (planned_cp_ep[c]["ranks"][0]["memory_bytes"]["activations"] for c in ("cp1_w1", "cp2_w2"))
    assert 0.4 < act2 / act1 < 0.75, (act1, act2)


def test_ep_all_reduce_bytes_are_two_per_moe_layer_and_distinct_token(planned_cp_ep):
    """EP=2 (DP=1, nothing recomputed): each MoE layer all-reduces its [T, H] output forward and the
    input gradient backward once for every distinct token of the batch (DTA computes each once)."""
    overrides, _, _ = CP_EP_CASES["ep_dp1"]
    cfg = Config.from_yaml(None, overrides)
    mcfg = cfg.model.model_config()
    data = TrainData(cfg.data, mcfg.vocab_size)
    distinct = {
        tuple(r.input_ids[: i + 1].tolist())
        for r in (data.rollouts[i] for i in data.next_indices())
        for i in range(len(r))
    }
    ring = 2 * (2 - 1) / 2  # bytes a rank sends in a ring all-reduce over 2 ranks, per byte
    expected = len(mcfg.moe_layers) * 2 * len(distinct) * mcfg.hidden_size * 4 * ring
    comm = planned_cp_ep["ep_dp1"]["communication_bytes"]
    assert comm["ep"] == pytest.approx(expected, rel=1e-12)
    assert comm["cp"] == 0 and planned_cp_ep["cp"]["communication_bytes"]["cp"] > 0


def test_shipped_cp_and_moe_configs_plan(planned_cp_ep):
    cp4, cp1, a3b, a3b_8192 = (planned_cp_ep[c] for c in ("cp4", "cp4_as_cp1", "a3b", "a3b_8192"))
    assert cp4["fits"] and cp4["refusal"] is None and len(cp4["ranks"]) == 16
    assert cp4["parameters_total"] == hf_parameter_count(preset("qwen3-8b"))
    # the same 128K paths on 4 GPUs without CP: the kept activations overflow, and the fix says CP
    assert not cp1["fits"] and re.search(r"largest term activations .*parallel\.cp", cp1["refusal"])
    # Qwen3-30B-A3B on 8 H200 fits with its 4096-token activation budget; 8192 tokens of kept
    # activations on top of ~87 GiB of weights, grads and Adam state do not
    assert a3b["parameters_total"] == hf_parameter_count(preset("qwen3-30b-a3b"))
    assert a3b["fits"] and a3b["refusal"] is None
    assert not a3b_8192["fits"] and "largest term optimizer" in a3b_8192["refusal"]
    assert (
        a3b_8192["ranks"][0]["memory_bytes"]["activations"] > a3b["ranks"][0]["memory_bytes"]["activations"]
    )
