"""Context parallelism (issue 14): CP=2 equals CP=1 in float64 on forests with forks inside
CP-split units, chunked long nodes, units of one token, duplicate and prefix rollouts, recompute
of every parent, and the dense and sparse modes; CP composes with TP and DP; the zig-zag split and
the refusals of what CP does not support. The multi-process cases run in tests/cp_worker.py, all
cases of a world size in one torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cp_worker import CASES
from reference import make_hf_model
from test_train import EXACT_KEYS, cli, exact, small_config

from megatron_dta.checkpoint import latest_complete, step_dir, step_of
from megatron_dta.config import Config, ConfigError
from megatron_dta.engine.context_parallel import zigzag_rows
from megatron_dta.metrics import read_metrics
from megatron_dta.model.hf import read_hf_dir
from megatron_dta.parallel import ParallelLayout
from megatron_dta.train import train

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TIMEOUT_S = 400  # a collective one rank never joins hangs: fail loudly instead


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cp") / "ckpt"
    make_hf_model("qwen3", seed=7, vocab=96).save_pretrained(path)
    return path


def run_worker(checkpoint, nproc: int, *extra) -> dict:
    out = checkpoint.parent / f"cp_{nproc}.json"
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), str(ROOT / "tests/cp_worker.py")]
    cmd += [str(checkpoint), str(out), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {TIMEOUT_S}s (a rank left a collective?)\n{exc.stderr}"
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cp2_equals_cp1_on_every_case(checkpoint):
    """Logprobs 1e-12 absolute, every gradient 1e-10 relative (SAME_OPS_FLOAT64), forward+backward
    and the no-grad pass, on both ranks; each rank's stack shard holds half of a long path."""
    result = run_worker(checkpoint, 2)
    assert result["failures"] == []
    assert sorted({c["name"] for c in result["cases"]}) == sorted(name for name, _, _ in CASES)
    assert len(result["cases"]) == 2 * len(CASES)


@pytest.mark.slow
def test_cp2_with_tp2_and_with_dp2_equal_cp1(checkpoint):
    """Four processes, two layouts in turn: CP=2 x TP=2, then CP=2 x DP=2 (each DP rank its share of
    the rollouts, gradients summed over DP x CP)."""
    cases = ["dta_packed_forks", "dta_budget0"]
    result = run_worker(checkpoint, 4, "--tp", "2", "1", "--cases", *cases)
    assert result["failures"] == []
    layouts = {c["layout"].split(",")[0] for c in result["cases"]}
    assert layouts == {"tp2 x cp2 x dp1", "tp1 x cp2 x dp2"}
    assert len(result["cases"]) == 4 * 2 * len(cases)


@pytest.mark.slow
def test_train_cp2_equals_one_process_and_resumes(tmp_path):
    """``megatron-dta train parallel.cp=2`` over 3 steps equals the single-process run (1e-9
    relative, as test_train's two-process runs: summation order only, amplified by Adam), and
    resumed from its step-2 checkpoint repeats its own later steps and weights bit for bit."""
    config, steps = small_config(tmp_path), ["train.steps=3", "checkpoint.every=2"]
    ref = train(Config.from_yaml(config, [f"checkpoint.run_dir={tmp_path / 'ref'}", *steps]))
    full, cut = tmp_path / "cp2", tmp_path / "cut"
    args = ["train", "--config", config, "parallel.cp=2", *steps]
    cli(*args, f"checkpoint.run_dir={full}", torchrun=True, timeout=300)
    ours = read_metrics(full / "metrics.jsonl")
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref):
        for key in EXACT_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["step"], key)
    ref_w = read_hf_dir(step_dir(tmp_path / "ref", 3) / "model")[1]
    full_w = read_hf_dir(step_dir(full, 3) / "model")[1]
    for name, t in full_w.items():
        assert (t - ref_w[name]).abs().max() <= 1e-9 * ref_w[name].abs().max(), name
    shutil.copytree(full, cut)
    shutil.rmtree(step_dir(cut, 3))
    assert step_of(latest_complete(cut)) == 2
    cli(*args, f"checkpoint.run_dir={cut}", "--resume", torchrun=True, timeout=300)
    assert exact(read_metrics(cut / "metrics.jsonl")) == exact(ours)
    for name, t in read_hf_dir(step_dir(cut, 3) / "model")[1].items():
        assert t.equal(full_w[name]), name


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 13, 64, 1001])
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_zigzag_partitions_the_unit_and_balances_causal_work(tokens, cp):
    parts = [zigzag_rows(tokens, cp, r) for r in range(cp)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(tokens))
    assert all((np.diff(p) > 0).all() for p in parts)
    # causal attention work of a row is its number of keys (row + 1): equal on every rank when 2C
    # chunks tile the unit, else off by the chunks' one-row length differences (<= 2 rows of keys)
    work = [int((p + 1).sum()) for p in parts]
    assert max(work) - min(work) <= (0 if tokens % (2 * cp) == 0 else 2 * tokens)
    if tokens < cp:
        assert sum(len(p) == 0 for p in parts) >= cp - tokens  # ranks without rows


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.cp=0"], "parallel.cp must be >= 1"),
        (
            ["parallel.cp=2", "optimizer.backend=deepspeed", "train.dtype=float32"],
            "needs optimizer.backend=torch",
        ),
        (["parallel.cp=2", "engine.attention=cascade"], "set engine.attention to auto or sdpa"),
        (["parallel.cp=2", "parallel.ep=2"], "parallel.cp=2 with parallel.ep=2 is not supported"),
    ],
)
def test_unsupported_cp_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_yaml(None, overrides)


def test_world_not_divisible_by_cp_is_refused(single_process_world):
    with pytest.raises(ConfigError, match="not divisible by tp x cp x ep x pp = 1 x 2 x 1 x 1"):
        ParallelLayout.create(cp=2, device="cpu")


def test_shipped_cp_config_loads():
    """(tests/test_planner.py plans it.)"""
    cfg = Config.from_yaml(ROOT / "configs" / "qwen3_8b_128k_cp4.yaml")
    assert (cfg.parallel.tp, cfg.parallel.cp) == (4, 4)
