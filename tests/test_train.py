"""The training entry: parallel runs equal the single-process run, resume after a kill reproduces
the uninterrupted run, export loads in transformers, the logprobs command, and user errors.

The model is tiny (2 layers, hidden 64, vocab 128) and the workload a dozen short multi-turn
rollouts, trained in float64 so that parallel runs can be held to round-off. Multi-process runs go
through `torchrun --nproc-per-node 2` (gloo) in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron_dta.checkpoint import latest_complete, step_dir, step_of
from megatron_dta.config import Config, ConfigError
from megatron_dta.engine import Engine
from megatron_dta.metrics import read_metrics
from megatron_dta.model.hf import load_hf_checkpoint, read_hf_dir
from megatron_dta.rollouts import load_rollouts, write_rollouts
from megatron_dta.synthetic import make_workload
from megatron_dta.train import build_model, create_layout, export, train

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
STEPS = 6
SMALL = {
    "model": {
        "preset": "tiny",
        "arch": {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_layers": 2},
    },
    "parallel": {"device": "cpu"},
    "data": {
        "workload": "multi_turn",
        "rollouts_per_step": 6,
        "workload_args": {
            "num_tasks": 2,
            "trajectories_per_task": 3,
            "turns": 3,
            "system_len": 16,
            "task_len": 8,
            "turn_len": 6,
            "obs_len": 6,
        },
    },
    # lr high and clipping tight so that clipping, warmup and the cosine all act within 6 steps
    "optimizer": {"lr": 1.0e-2, "warmup_steps": 1, "grad_clip": 0.5, "weight_decay": 0.1},
    "loss": {"eps_clip_high": 0.28, "entropy_coef": 0.01},
    "engine": {"block_size": 8},
    "train": {"steps": STEPS, "dtype": "float64"},
    "checkpoint": {"every": 2, "keep_last": None},
    "logging": {"progress": "lines"},
}
# everything in metrics.jsonl that is not a wall-clock or memory measurement
EXACT_KEYS = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "total_tokens",
    "unique_tokens",
    "computed_tokens",
    "sharing_ratio",
    "loss_tokens",
    "clip_fraction",
    "approx_kl",
    "entropy",
)


def tiny_multi_turn(seed: int, num_tasks: int = 2) -> list:
    """The CLI and loop tests' workload: two-turn agent trajectories, two per task (8-token system
    prompt, 4-token turns and observations), vocabulary 128."""
    return make_workload(
        "multi_turn",
        128,
        seed,
        num_tasks=num_tasks,
        trajectories_per_task=2,
        turns=2,
        system_len=8,
        task_len=4,
        turn_len=4,
        obs_len=4,
    )


def small_config(tmp_path: Path, name: str = "small.yaml", **changes) -> Path:
    cfg = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        section, field = key.split("__")
        cfg[section][field] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def same_threads_env() -> dict:
    """The environment for a subprocess that must repeat this process's float ops bit for bit
    (CPU kernels split work by thread count)."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def cli(*args, timeout=120, torchrun=False, check=True) -> subprocess.CompletedProcess:
    cmd = (
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "megatron_dta"]
        if torchrun
        else [PY, "-m", "megatron_dta"]
    )
    proc = subprocess.run(
        [*cmd, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"} if torchrun else same_threads_env(),
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
    return proc


def exact(metrics: list[dict]) -> list[dict]:
    return [{k: m[k] for k in EXACT_KEYS} for m in metrics]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_hf_dir(step_dir(run_dir, STEPS) / "model")[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process float64 run every other run is compared with."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = Config.from_yaml(small_config(tmp), [f"checkpoint.run_dir={tmp / 'run'}"])
    train(cfg)
    return tmp, tmp / "run"


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    """The reference run under torchrun with PP=2 (checkpoints at steps 2, 4, 6): the pp2 case of
    test_two_processes_equal_one compares it with the reference, the resume test cuts and resumes it."""
    tmp = tmp_path_factory.mktemp("pp2")
    args = ["train", "--config", small_config(tmp), f"checkpoint.run_dir={tmp / 'run'}", "parallel.pp=2"]
    cli(*args, torchrun=True, timeout=180)
    return args, tmp / "run"


def test_metrics_have_every_key_and_learn(reference):
    _, run = reference
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    required = {
        "step",
        "loss",
        "grad_norm",
        "lr",
        "total_tokens",
        "unique_tokens",
        "sharing_ratio",
        "tokens_per_second",
        "seconds",
        "peak_memory_bytes",
        "clip_fraction",
        "approx_kl",
        "entropy",
    }
    for m in metrics:
        assert required <= set(m)
        assert m["unique_tokens"] < m["total_tokens"] and m["sharing_ratio"] > 1
        assert m["peak_memory_bytes"] > 0 and m["entropy"] > 0
    assert metrics[0]["lr"] == pytest.approx(1e-2) and metrics[-1]["lr"] < metrics[1]["lr"]  # cosine
    assert any(m["grad_norm"] > 0.5 for m in metrics)  # clipping was active on some step
    assert any(m["clip_fraction"] > 0 for m in metrics[1:])  # later steps are off-policy updates
    assert metrics[0]["approx_kl"] == 0.0  # the first step of every rollout is on-policy
    assert {p.name for p in (run / "checkpoints").iterdir()} == {f"step_{s:08d}" for s in (2, 4, 6)}


def test_same_seed_same_metrics(reference, tmp_path):
    _, run = reference
    again = train(Config.from_yaml(small_config(tmp_path), [f"checkpoint.run_dir={tmp_path / 'run'}"]))
    assert exact(again) == exact(read_metrics(run / "metrics.jsonl"))
    for name, t in final_weights(tmp_path / "run").items():
        assert torch.equal(t, final_weights(run)[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["dp2", "tp2", "pp2"])
def test_two_processes_equal_one(reference, tmp_path, parallel, request):
    """DP=2: each rank trains on its share of the same global batch, loss normalized by the
    all-reduced token count, gradients summed. TP=2: every layer split over two ranks (the grad
    norm counts replicated norms once). PP=2: one layer per stage, the step's microbatches through
    the DFS pipeline schedule, several in flight (metrics from the last stage, the grad norm summed
    over stages, the checkpoint gathered from both). Tolerance 1e-9 relative: float64 runs that differ only in
    summation order (per-rank partial sums; under torchrun one thread per process) differ by
    ~1e-15 per step, and six Adam steps amplify that by orders of magnitude at most; a wrong
    normalization, a double-counted norm or a missed gradient shows up at 1e-3 or more."""
    _, run = reference
    out = tmp_path / "run"
    if parallel == "pp2":
        out = request.getfixturevalue("pp2_run")[1]
    else:
        extra = ["parallel.tp=2"] if parallel == "tp2" else []
        cli(
            "train",
            "--config",
            small_config(tmp_path),
            f"checkpoint.run_dir={out}",
            *extra,
            torchrun=True,
            timeout=180,
        )
    ours, ref = read_metrics(out / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert len(ours) == len(ref) == STEPS
    for a, b in zip(ours, ref):
        for key in set(EXACT_KEYS) - {"computed_tokens"}:  # ranks recompute prefixes they share
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["step"], key)
    ref_w = final_weights(run)
    for name, t in final_weights(out).items():
        assert (t - ref_w[name]).abs().max() <= 1e-9 * ref_w[name].abs().max(), name


@pytest.mark.slow
def test_pp2_with_tied_embeddings_equals_one_process(tmp_path):
    """Tied embeddings split over the first and last stage: their grads are summed across stages
    and counted once in the clipping norm, so both copies take the same updates and the run (and
    its checkpoint, which holds the embedding once) equals the single-process one."""
    config = small_config(tmp_path)
    tied = ["model.arch.tie_embeddings=true", "data.rollouts_per_step=12", "train.steps=2"]
    ref = train(Config.from_yaml(config, [f"checkpoint.run_dir={tmp_path / 'ref'}", *tied]))
    cli(
        "train",
        "--config",
        config,
        f"checkpoint.run_dir={tmp_path / 'pp2'}",
        "parallel.pp=2",
        *tied,
        torchrun=True,
        timeout=180,
    )
    ours = read_metrics(tmp_path / "pp2" / "metrics.jsonl")
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref):
        for key in EXACT_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["step"], key)  # as above
    ref_w = read_hf_dir(step_dir(tmp_path / "ref", 2) / "model")[1]
    got_w = read_hf_dir(step_dir(tmp_path / "pp2", 2) / "model")[1]
    assert set(got_w) == set(ref_w) and "lm_head.weight" not in got_w
    for name, t in got_w.items():
        assert (t - ref_w[name]).abs().max() <= 1e-9 * ref_w[name].abs().max(), name


@pytest.mark.slow
def test_deepspeed_zero2_dp2_equals_torch_dp1(tmp_path):
    """DeepSpeed ZeRO-2 (CPU, gloo, 2 ranks) against plain AdamW in one process, float32 (DeepSpeed
    keeps float32 master weights). Tolerance 1e-3 relative: float32 runs in a different reduction
    order differ by ~1e-7 per step, and AdamW's per-element normalisation turns that into O(lr) weight
    differences where a gradient element is near zero: the step-6 loss differed by 1.03e-4 when the
    reference ran with one thread instead of two. A wrong ZeRO reduction is off by O(1)."""
    cfg = small_config(tmp_path, train__dtype="float32")
    train(Config.from_yaml(cfg, [f"checkpoint.run_dir={tmp_path / 'torch'}"]))
    cli(
        "train",
        "--config",
        cfg,
        f"checkpoint.run_dir={tmp_path / 'ds'}",
        "optimizer.backend=deepspeed",
        "optimizer.zero_stage=2",
        torchrun=True,
        timeout=840,  # a fresh venv JIT-compiles DeepSpeed's CPU comm op on first use (minutes on 2 cores)
    )
    ours, ref = (
        read_metrics(tmp_path / "ds" / "metrics.jsonl"),
        read_metrics(tmp_path / "torch" / "metrics.jsonl"),
    )
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def kill_after_checkpoint(train_args: list, run_dir: Path, step: int) -> int:
    """Start ``megatron-dta train TRAIN_ARGS`` and SIGKILL it once a checkpoint of ``step`` or later
    is complete in ``run_dir``; returns the newest complete checkpoint's step."""
    proc = subprocess.Popen(
        [PY, "-m", "megatron_dta", "train", *map(str, train_args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=same_threads_env(),
    )
    deadline = time.monotonic() + 300  # generous: a busy 2-core machine slows the subprocess a lot
    try:
        while latest_complete(run_dir) is None or step_of(latest_complete(run_dir)) < step:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, f"no checkpoint of step {step} within the deadline"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return step_of(latest_complete(run_dir))


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_run(reference, tmp_path):
    """Kill a run (SIGKILL) after a checkpoint landed, resume from the newest complete one: the
    metrics are exactly those of the uninterrupted run (same CPU, same float64 ops)."""
    _, run = reference
    out = tmp_path / "run"
    killed_at = kill_after_checkpoint(
        ["--config", small_config(tmp_path), f"checkpoint.run_dir={out}", "checkpoint.every=1"], out, 2
    )
    assert 2 <= killed_at < STEPS, f"killed at step {killed_at}"
    cli("train", "--config", small_config(tmp_path), f"checkpoint.run_dir={out}", "--resume")
    assert exact(read_metrics(out / "metrics.jsonl")) == exact(read_metrics(run / "metrics.jsonl"))
    for name, t in final_weights(out).items():
        assert torch.equal(t, final_weights(run)[name]), name


@pytest.mark.slow
def test_pp2_resume_repeats_the_run(pp2_run, tmp_path):
    """A PP=2 run resumed from its step-2 checkpoint (each stage reloads its own layers and its
    optimizer file) repeats the uninterrupted run's later steps and weights bit for bit."""
    args, full = pp2_run
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for step in (4, STEPS):
        shutil.rmtree(step_dir(cut, step))
    assert step_of(latest_complete(cut)) == 2
    cli(*args[:-2], f"checkpoint.run_dir={cut}", args[-1], "--resume", torchrun=True, timeout=180)
    assert exact(read_metrics(cut / "metrics.jsonl")) == exact(read_metrics(full / "metrics.jsonl"))
    ref_w = read_hf_dir(step_dir(full, STEPS) / "model")[1]
    for name, t in read_hf_dir(step_dir(cut, STEPS) / "model")[1].items():
        assert torch.equal(t, ref_w[name]), name


def test_export_loads_in_transformers_with_our_logits(reference, tmp_path, single_process_world):
    """transformers loads the exported checkpoint and its log-probs equal ours (float64, patched HF
    as in test_exactness: round-off only, 1e-10)."""
    from reference import float64_hf, hf_logprobs_of
    from transformers import AutoModelForCausalLM

    _, run = reference
    hf_dir = tmp_path / "hf"
    assert export(str(run), str(hf_dir), step=4) == step_dir(run, 4)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="sdpa").eval()
    ours, _ = load_hf_checkpoint(hf_dir, single_process_world, torch.float64)
    rollouts = tiny_multi_turn(1, num_tasks=1)
    res = Engine(ours).logprobs(rollouts)
    with torch.no_grad(), float64_hf():
        for r, lp in zip(rollouts, res.logprobs):
            np.testing.assert_allclose(lp, hf_logprobs_of(hf, r.input_ids).numpy(), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="no complete checkpoint for step 3"):
        export(str(run), str(tmp_path / "nope"), step=3)


@pytest.mark.parametrize("pp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_logprobs_command_writes_rollout_layout(tmp_path, pp):
    """pp=2: the forward-only pass through the DFS pipeline schedule (two microbatches, results
    from the last stage, written by rank 0) gives the same float64 values."""
    cfg_path = small_config(tmp_path)
    rollouts = tiny_multi_turn(2)
    write_rollouts(tmp_path / "in.jsonl", rollouts)
    extra = ["parallel.pp=2", "data.microbatch_tokens=30"] if pp == 2 else []
    cli(
        "logprobs",
        "--config",
        cfg_path,
        "--rollouts",
        tmp_path / "in.jsonl",
        "--out",
        tmp_path / "out.jsonl",
        *extra,
        torchrun=pp == 2,
    )
    cfg = Config.from_yaml(cfg_path)
    expected = Engine(build_model(cfg, create_layout(cfg))).logprobs(rollouts)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(written) == len(rollouts)
    for w, r, lp, ent in zip(written, rollouts, expected.logprobs, expected.entropy):
        assert w["input_ids"] == r.input_ids.tolist()
        assert len(w["logprobs"]) == len(w["entropy"]) == len(r)
        assert w["logprobs"][0] == 0.0 and w["entropy"][0] == 0.0
        np.testing.assert_allclose(w["logprobs"], lp, rtol=0, atol=1e-12)
        np.testing.assert_allclose(w["entropy"], ent, rtol=0, atol=1e-12)
    assert len(load_rollouts(tmp_path / "out.jsonl", 128)) == len(rollouts)  # still a valid rollout file


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_config_value_is_one_line_exit_2(tmp_path):
    line = one_line_error(cli("train", "--config", small_config(tmp_path), "optimizer.lr=-1", check=False))
    assert "override 'optimizer.lr=-1'" in line and "optimizer.lr must be > 0" in line


def test_bad_rollout_file_is_one_line_exit_2(tmp_path):
    good = tiny_multi_turn(0, num_tasks=1)
    lines = [json.dumps(r.to_json()) for r in good[:2]]
    bad = json.loads(lines[1])
    bad["loss_mask"][0] = 1
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    line = one_line_error(
        cli(
            "train",
            "--config",
            small_config(tmp_path),
            f"data.rollouts={tmp_path / 'bad.jsonl'}",
            "data.workload=null",
            f"checkpoint.run_dir={tmp_path / 'run'}",
            check=False,
        )
    )
    assert f"{tmp_path / 'bad.jsonl'}:2: field 'loss_mask'" in line


def test_config_errors_name_the_source_the_key_and_the_fix(tmp_path):
    path = small_config(tmp_path)
    cases = [
        (
            ["optimizer.lrr=1"],
            "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?); valid keys in optimizer: lr",
        ),
        (["optimiser.lr=1"], "unknown section 'optimiser' (did you mean 'optimizer'?)"),
        (["train.steps=many"], "override 'train.steps=many': train.steps: expected an integer, got 'many'"),
        (["optimizer.betas=[0.9]"], "optimizer.betas: expected a list of 2 values"),
        (["loss.normalization=mean"], "loss.normalization 'mean' must be one of"),
        (["engine.mode=fast"], "engine.mode 'fast' must be one of"),
        (
            ["model.arch.hidden=3"],
            "unknown key model.arch.hidden; valid keys: decoder_sparse_step, head_dim, hidden_size",
        ),
        (["data.workload=nope"], "data.workload 'nope' is unknown; choose one of"),
        (["data.workload=null"], "set exactly one of data.rollouts"),
        (
            ["train.dtype=float64", "optimizer.backend=deepspeed"],
            "use optimizer.backend=torch or train.dtype=float32",
        ),
        (["parallel.pp=0"], "parallel.pp must be >= 1"),
        (
            ["parallel.pp=2", "optimizer.backend=deepspeed", "train.dtype=float32"],
            "parallel.pp=2 needs optimizer.backend=torch",
        ),
        (["lr=1"], "must look like section.key=value"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as info:
            Config.from_yaml(path, overrides)
        assert message in str(info.value), (overrides, str(info.value))
    (tmp_path / "bad.yaml").write_text("train:\n  steps: 0\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'bad.yaml'}: train.steps must be >= 1"):
        Config.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("train:\n  steps: [1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:3: malformed YAML"):
        Config.from_yaml(tmp_path / "broken.yaml")
    assert Config.from_yaml(path, ["optimizer.lr=1e-5"]).optimizer.lr == 1e-5  # YAML reads 1e-5 as a string


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = Config.from_yaml(path)
        assert cfg.engine.block_size == 2048 or "cpu" in path.name, path
    demo = Config.from_yaml(
        ROOT / "configs" / "demo_cpu.yaml", ["checkpoint.run_dir=runs/demo", "parallel.device=auto"]
    )
    assert demo == Config()  # the file spells out the built-in defaults that `make demo` trains
