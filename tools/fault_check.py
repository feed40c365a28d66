"""Inject the faults a cluster produces into real training runs and check that each is survived.

    python tools/fault_check.py [--quick] [--only NAME,...] [--json OUT.json] [--workdir DIR]

Every scenario runs the CLI in subprocesses (``torchrun`` for two ranks, with ``--max-restarts``
where the fault is a lost rank), compares the outcome with an uninterrupted run of the same
config, and prints one line per scenario: the fault, what happened, the data lost and the
measured seconds; the exit status is 1 if any scenario failed. ``--quick`` is the reduced set a
test runs (tests/test_faults.py); docs/reliability.md holds the full set's figures.

Faults are injected inside the training processes by a ``sitecustomize`` module this tool writes
into its work directory and puts first on PYTHONPATH: it reads ``FAULT_CHECK_INJECT`` (for
example ``kill-mid-step:3:1``: SIGKILL rank 1 during step 3 of the first attempt) and patches the
one function the fault needs. Nothing in megatron_dta knows about it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
STEPS = 4
TIMEOUT_S = 5.0  # parallel.timeout_s of the hang scenario
CONFIG = {
    "model": {
        "preset": "tiny",
        "arch": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_layers": 1},
    },
    "parallel": {"device": "cpu"},
    "data": {
        "workload": "multi_turn",
        "rollouts_per_step": 4,
        "workload_args": {
            "num_tasks": 2,
            "trajectories_per_task": 2,
            "turns": 2,
            "system_len": 6,
            "task_len": 4,
            "turn_len": 3,
            "obs_len": 3,
        },
    },
    # constant learning rate (min_lr = lr): a run cut short and continued with more steps is the
    # same run; weight decay so that any stray optimizer step shows in the weights
    "optimizer": {"lr": 1.0e-2, "min_lr": 1.0e-2, "weight_decay": 0.1},
    "train": {"steps": STEPS, "dtype": "float64"},
    "checkpoint": {"every": 1, "keep_last": 2},
    "logging": {"progress": "lines"},
}
SITECUSTOMIZE = """\
import os, sys
if os.environ.get("FAULT_CHECK_INJECT") and ("RANK" in os.environ or os.environ.get("FAULT_CHECK_SINGLE")):
    sys.path.insert(0, {tools!r})
    import fault_check
    fault_check.install(os.environ["FAULT_CHECK_INJECT"])
"""


# ---- injection: runs inside the training processes ----------------------------------------------


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _after_backward(step: int, rank: int, action) -> None:
    """Call ``action(engine)`` on ``rank`` right after the backward of the ``step``-th training step
    of this process (mid-step: gradients exist, the optimizer has not stepped)."""
    import megatron_dta.train as train

    real, seen = train.run_microbatches, {"n": 0}

    def run(engine, layout, micro, loss_fn=None, denominator=None, forward_only=False, **kw):
        results = real(engine, layout, micro, loss_fn, denominator, forward_only, **kw)
        if not forward_only:
            seen["n"] += 1
            if seen["n"] == step and _rank() == rank:
                action(engine)
        return results

    train.run_microbatches = run


def _sigkill(*_args) -> None:
    print(f"fault_check: SIGKILL rank {_rank()} at {time.time():.3f}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _hang(_engine) -> None:
    print(f"fault_check: rank {_rank()} stops answering at {time.time():.3f}", file=sys.stderr, flush=True)
    time.sleep(3600)


def _poison(engine) -> None:
    from megatron_dta.grads import grad_of

    grad_of(next(engine.model.parameters())).view(-1)[0] = float("nan")


def _kill_in_save(point: str, step: int) -> None:
    """SIGKILL at ``point`` of the save of ``step``: after the model files, after the manifest but
    before COMPLETE, after sealing but before the rename, or mid-prune (old COMPLETE removed)."""
    from megatron_dta import checkpoint as ckpt

    real_save = ckpt.Checkpointer.save

    def save(self, s, *args):
        if s != step:
            return real_save(self, s, *args)
        if point == "model":
            real_hf = ckpt.save_hf_checkpoint
            ckpt.save_hf_checkpoint = lambda *a, **k: (real_hf(*a, **k), _sigkill())
        elif point == "manifest":
            real_write = ckpt._write_durably
            ckpt._write_durably = lambda p, t: _sigkill() if p.name == ckpt.COMPLETE else real_write(p, t)
        elif point == "rename":
            ckpt.Checkpointer._publish = staticmethod(_sigkill)
        elif point == "prune":
            ckpt.Checkpointer._remove = staticmethod(lambda p: ((p / ckpt.COMPLETE).unlink(), _sigkill()))
        return real_save(self, s, *args)

    ckpt.Checkpointer.save = save


def install(spec: str) -> None:
    """Install the fault ``spec`` (kind:args) in this process; a restarted attempt runs clean."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    kind, *args = spec.split(":")
    if kind == "kill-mid-step":
        _after_backward(int(args[0]), int(args[1]), _sigkill)
    elif kind == "hang":
        _after_backward(int(args[0]), int(args[1]), _hang)
    elif kind == "nan":
        _after_backward(int(args[0]), int(args[1]), _poison)
    elif kind == "plan":
        import megatron_dta.train as train

        real_balance, rank = train.balance, int(args[0])
        train.balance = lambda batch, dp, mbt=None, cost=None: real_balance(
            batch, dp, 8 if _rank() == rank else mbt, cost
        )
    elif kind == "kill-save":
        _kill_in_save(args[0], int(args[1]))
    else:
        raise ValueError(f"unknown fault {spec!r}")


# ---- the runs -----------------------------------------------------------------------------------


class Work:
    """The work directory, its config file and sitecustomize, and the reference runs (made once)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "site").mkdir(parents=True, exist_ok=True)
        (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(tools=str(ROOT / "tools")))
        self.config = root / "config.yaml"
        self.config.write_text(json.dumps(CONFIG))
        self._refs: dict[str, tuple[Path, float]] = {}

    def env(self, inject: str | None = None, single: bool = False) -> dict:
        # torchrun next to this interpreter first on PATH (the launch scripts call it by name)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}",
        }
        env["PYTHONPATH"] = os.pathsep.join([str(self.root / "site"), str(ROOT), env.get("PYTHONPATH", "")])
        env.pop("FAULT_CHECK_INJECT", None)
        if inject:
            env["FAULT_CHECK_INJECT"] = inject
            if single:
                env["FAULT_CHECK_SINGLE"] = "1"
        return env

    def train(
        self,
        run_dir: Path,
        *overrides: str,
        ranks: int = 1,
        restarts: int = 0,
        inject: str | None = None,
        resume: bool = False,
        limit_fsize: int | None = None,
        timeout: float = 600,
    ) -> tuple[subprocess.CompletedProcess, float]:
        args = ["train", "--config", str(self.config), f"checkpoint.run_dir={run_dir}", *overrides]
        args += ["--resume"] if resume else []
        if ranks == 1:
            cmd = [PY, "-m", "megatron_dta", *args]
        else:
            cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(ranks), "--max-restarts", str(restarts)]
            cmd += ["--monitor-interval", "0.2", "-m", "megatron_dta", *args]

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

        start = time.perf_counter()
        proc = _run(cmd, self.env(inject, single=ranks == 1), timeout, limit if limit_fsize else None)
        with open(f"{run_dir}.log", "a") as log:  # every attempt's output, for a failure's post-mortem
            log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
        return proc, time.perf_counter() - start

    def reference(self, ranks: int) -> tuple[Path, float]:
        """The uninterrupted run on ``ranks`` processes, and its wall seconds."""
        key = f"ref_dp{ranks}"
        run, timing = self.root / key, self.root / f"{key}.seconds"
        if key not in self._refs and timing.is_file():  # made by an earlier call with this --workdir
            self._refs[key] = (run, float(timing.read_text()))
        if key not in self._refs:
            shutil.rmtree(run, ignore_errors=True)
            proc, seconds = self.train(run, ranks=ranks)
            _ok(proc, f"reference run on {ranks} rank(s)")
            timing.write_text(f"{seconds}\n")
            self._refs[key] = (run, seconds)
        return self._refs[key]


def _run(cmd: list[str], env: dict, timeout: float, preexec_fn=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole session, torchrun's workers too
    (killing torchrun alone leaves them running)."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")


def _weights(run_dir: Path, step: int = STEPS):
    from megatron_dta.checkpoint import step_dir
    from megatron_dta.model.hf import read_hf_dir

    return read_hf_dir(step_dir(run_dir, step) / "model")[1]


def _same_run(run: Path, ref: Path) -> None:
    """Final weights bit for bit, and every metric that is not a time or a memory figure."""
    import torch

    from megatron_dta.metrics import read_metrics

    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"weights differ: {name}"
    keys = ("step", "loss", "grad_norm", "lr", "total_tokens", "loss_tokens", "skipped")
    ours, theirs = read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [[m[k] for k in keys] for m in ours] == [[m[k] for k in keys] for m in theirs], "metrics differ"


def _fresh(work: Work, name: str) -> Path:
    run = work.root / name
    shutil.rmtree(run, ignore_errors=True)
    return run


# ---- scenarios: each returns (outcome, seconds) and raises AssertionError when not survived -----


def restart_under_torchrun(work: Work) -> tuple[str, float]:
    """DP=2, rank 1 SIGKILLed mid-step 3 (after its backward), torchrun --max-restarts 1."""
    ref, ref_seconds = work.reference(2)
    run = _fresh(work, "restart")
    proc, seconds = work.train(run, ranks=2, restarts=1, inject="kill-mid-step:3:1")
    _ok(proc, "the restarted run")
    assert "SIGKILL rank 1" in proc.stderr and "resuming from" in proc.stderr, proc.stderr[-2000:]
    assert "(restart 1 of this job)" in proc.stderr
    _same_run(run, ref)
    return (
        "restarted, resumed from step_00000002, weights and metrics bit for bit equal to the "
        f"uninterrupted run; wall {seconds:.1f} s (the uninterrupted run: {ref_seconds:.1f} s)",
        seconds,
    )


def launch_script_restart(work: Work) -> tuple[str, float]:
    """launch/single_node.sh (MAX_RESTARTS default 1) with rank 0 SIGKILLed mid-step 2."""
    ref, _ = work.reference(2)
    run = _fresh(work, "launch")
    start = time.perf_counter()
    cmd = ["bash", "launch/single_node.sh", str(work.config), "2", f"checkpoint.run_dir={run}"]
    proc = _run(cmd, work.env("kill-mid-step:2:0"), 600)
    seconds = time.perf_counter() - start
    _ok(proc, "launch/single_node.sh")
    assert "resuming from" in proc.stderr, proc.stderr[-2000:]
    _same_run(run, ref)
    return "restarted by the script's torchrun, resumed, bit for bit equal", seconds


def multi_node_script_restart(work: Work) -> tuple[str, float]:
    """launch/multi_node.sh as two one-process "nodes" on this machine (c10d rendezvous on
    127.0.0.1), global rank 1 SIGKILLed mid-step 3: both nodes' workers restart and resume."""
    import socket

    ref, _ = work.reference(2)
    run = _fresh(work, "multi_node")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    nodes = [
        subprocess.Popen(
            ["bash", "launch/multi_node.sh", str(work.config), f"checkpoint.run_dir={run}"],
            cwd=ROOT,
            env={
                **work.env("kill-mid-step:3:1"),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "NNODES": "2",
                "NODE_RANK": str(node),
                "NPROC_PER_NODE": "1",
                "RDZV_ID": f"fault-check-{port}",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=900) for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)
        raise
    seconds = time.perf_counter() - start
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    stderr = "".join(err for _, err in outputs)
    assert "SIGKILL rank 1" in stderr and "(restart 1 of this job)" in stderr, stderr[-3000:]
    _same_run(run, ref)
    return "both nodes' workers restarted (c10d rendezvous), resumed, bit for bit equal", seconds


def kill_during_save(work: Work, points=("model", "manifest", "rename", "prune")) -> tuple[str, float]:
    """One process SIGKILLed at each point of the save of step 3, then resumed."""
    ref, _ = work.reference(1)
    total = 0.0
    for point in points:
        run = _fresh(work, f"kill_save_{point}")
        proc, s1 = work.train(run, inject=f"kill-save:{point}:3")
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        proc, s2 = work.train(run, resume=True)
        _ok(proc, f"resume after a kill at '{point}'")
        assert "interrupted save or prune" in proc.stderr, (point, proc.stderr[-2000:])
        _same_run(run, ref)
        total += s1 + s2
    return (
        f"killed at {len(points)} points ({', '.join(points)}): the torn directory removed with a log "
        "line, resumed from the newest complete checkpoint, bit for bit equal",
        total,
    )


def corrupt_checkpoint(work: Work) -> tuple[str, float]:
    """A byte flipped in the newest checkpoint's model, a truncated optimizer file in the one before."""
    from megatron_dta.checkpoint import step_dir

    ref, _ = work.reference(1)
    run = _fresh(work, "corrupt")
    proc, _ = work.train(run, f"train.steps={STEPS - 1}", "checkpoint.keep_last=null")
    _ok(proc, "the run to corrupt")
    model = step_dir(run, STEPS - 1) / "model" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x10
    model.write_bytes(bytes(data))
    opt = step_dir(run, STEPS - 2) / "optimizer" / "torch_tp0.pt"
    opt.write_bytes(opt.read_bytes()[:-64])
    proc, seconds = work.train(run, "checkpoint.keep_last=null", resume=True)
    _ok(proc, "the resume past corrupt checkpoints")
    assert proc.stderr.count("checkpoint: refusing") == 2, proc.stderr[-2000:]
    assert f"resuming from {step_dir(run, STEPS - 3)}" in proc.stderr
    _same_run(run, ref)
    return (
        "both refused by the manifest's SHA-256 (set aside as corrupt-step_N, logged), resumed from "
        "step_00000001, bit for bit equal",
        seconds,
    )


def disk_full(work: Work) -> tuple[str, float]:
    """RLIMIT_FSIZE of 32 KiB (the model file is ~90 KiB) from step 3 on; then resumed without it."""
    from megatron_dta.checkpoint import complete_checkpoints, verify

    ref, _ = work.reference(1)
    run = _fresh(work, "disk_full")
    proc, _ = work.train(run, "train.steps=2")
    _ok(proc, "the run before the disk fills")
    proc, seconds = work.train(run, resume=True, limit_fsize=32 * 1024)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "cannot write the checkpoint of step 3" in line[0], proc.stderr[-2000:]
    assert "File too large" in line[0] and "newest: step_00000002" in line[0], line
    for path in complete_checkpoints(run):
        verify(path)
    assert not list((run / "checkpoints").glob(".tmp-*"))
    proc, _ = work.train(run, resume=True)
    _ok(proc, "the resume after the disk was freed")
    _same_run(run, ref)
    return (
        f"one-line error, exit 2: {line[0][7:90]}...; earlier checkpoints verified; resumed bit for bit",
        seconds,
    )


def hung_rank(work: Work) -> tuple[str, float]:
    """Rank 1 stops answering after its backward of step 2; parallel.timeout_s=5."""
    run = _fresh(work, "hang")
    proc, seconds = work.train(
        run, f"parallel.timeout_s={TIMEOUT_S}", ranks=2, inject="hang:2:1", timeout=300
    )
    assert proc.returncode != 0
    hung_at = float(proc.stderr.split("stops answering at ")[1].split()[0])
    failures = [x for x in proc.stderr.splitlines() if "CollectiveFailure:" in x]
    assert failures, proc.stderr[-3000:]
    message = failures[0].split("CollectiveFailure: ", 1)[1]
    assert message.startswith("step 2: the all-reduce of the step's timings and finiteness"), message
    assert "rank 0" in message and f"parallel.timeout_s={TIMEOUT_S:g}" in message
    end = time.time()
    # torchrun's summary stamps the first failure to the second (local time): rank 0's error
    stamp = proc.stderr.split("Root Cause")[1].split("time      : ")[1].split()[0]
    failed_at = time.mktime(time.strptime(stamp, "%Y-%m-%d_%H:%M:%S"))
    assert "rank      : 0" in proc.stderr.split("Root Cause")[1]
    return (
        f"rank 0 failed {failed_at - hung_at:.0f} s after the hang (timeout {TIMEOUT_S:g} s; torchrun's "
        f"1 s stamp), naming the operation: '{message[:100]}...'; job ended {end - hung_at:.1f} s after it",
        failed_at - hung_at,
    )


def nan_on_one_rank(work: Work) -> tuple[str, float]:
    """DP=2, a NaN put into one gradient entry of rank 1 at step 2 only."""
    import torch

    from megatron_dta.checkpoint import step_dir
    from megatron_dta.metrics import read_metrics

    run = _fresh(work, "nan")
    proc, seconds = work.train(run, "checkpoint.keep_last=null", ranks=2, inject="nan:2:1")
    _ok(proc, "the run with a NaN gradient")
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["skipped"] for m in metrics] == [None, "non-finite", None, None], metrics
    assert metrics[-1]["nonfinite_steps"] == 1
    a, b = _weights(run, 1), _weights(run, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    o1, o2 = (torch.load(step_dir(run, s) / "optimizer" / "torch_tp0.pt", weights_only=False) for s in (1, 2))
    assert o1["optimizer"]["state"].keys() == o2["optimizer"]["state"].keys()
    for k, st in o1["optimizer"]["state"].items():
        assert all(torch.equal(v, o2["optimizer"]["state"][k][n]) for n, v in st.items())
    return (
        "both ranks skipped step 2 (weights and AdamW state equal to step 1's), counted, run finished",
        seconds,
    )


def plan_mismatch(work: Work) -> tuple[str, float]:
    """DP=2, rank 1 balances with another microbatch limit (a plan the other rank did not make)."""
    run = _fresh(work, "plan")
    proc, seconds = work.train(run, ranks=2, inject="plan:1", timeout=300)
    assert proc.returncode != 0 and "PlanMismatch: data-parallel ranks computed different" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    return "both ranks stopped at step 1 with PlanMismatch naming the two digests; nothing trained", seconds


def empty_step_dp1_vs_dp2(work: Work) -> tuple[str, float]:
    """Steps whose rollouts all have length 1, between normal steps: DP=1 and DP=2 end equal."""
    from megatron_dta.metrics import read_metrics
    from megatron_dta.rollouts import make_rollout, write_rollouts
    from megatron_dta.synthetic import make_workload

    args = CONFIG["data"]["workload_args"]
    rollouts = make_workload("multi_turn", 64, 0, **args)[:4]
    rollouts += [make_rollout([63]), make_rollout([63]), make_rollout([62]), make_rollout([62])]
    path = work.root / "with_empty.jsonl"
    write_rollouts(path, rollouts)
    data = [f"data.rollouts={path}", "data.workload=null", "data.rollouts_per_step=2", "train.steps=6"]
    one, two = _fresh(work, "empty_dp1"), _fresh(work, "empty_dp2")
    proc, s1 = work.train(one, *data)
    _ok(proc, "DP=1")
    proc, s2 = work.train(two, *data, ranks=2)
    _ok(proc, "DP=2")
    skipped = [m["skipped"] for m in read_metrics(one / "metrics.jsonl")]
    assert "empty" in skipped and None in skipped, skipped
    assert skipped == [m["skipped"] for m in read_metrics(two / "metrics.jsonl")]
    a, b = _weights(one, 6), _weights(two, 6)
    # float64 runs that differ only in the order of DP partial sums: ~1e-15 per step; before the
    # fix the empty steps alone moved DP=2's weights by ~5e-3 (weight decay and Adam momentum)
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)
    assert worst <= 1e-9, worst
    return (
        f"steps {[i + 1 for i, s in enumerate(skipped) if s]} skipped on both; "
        f"max relative weight difference {worst:.1e}",
        (s1 + s2),
    )


def _kill_after_manifest(work: Work) -> tuple[str, float]:
    return kill_during_save(work, points=("manifest",))


SCENARIOS = {  # name: (what is injected, scenario, in --quick, in the full set)
    "restart": ("rank SIGKILLed mid-step, torchrun --max-restarts 1 (DP=2)", restart_under_torchrun, 1, 1),
    "launch-script": ("the same through launch/single_node.sh", launch_script_restart, 0, 1),
    "multi-node-script": (
        "the same through launch/multi_node.sh, 2 nodes x 1",
        multi_node_script_restart,
        0,
        1,
    ),
    "kill-save": ("SIGKILL while writing a checkpoint", kill_during_save, 0, 1),
    "kill-save-one": ("SIGKILL after the manifest, before COMPLETE", _kill_after_manifest, 1, 0),
    "corrupt": ("corrupt checkpoints: flipped byte, truncated file", corrupt_checkpoint, 0, 1),
    "disk-full": ("disk full while saving (RLIMIT_FSIZE)", disk_full, 0, 1),
    "hang": ("a rank stops answering in a collective (DP=2)", hung_rank, 1, 1),
    "nan": ("NaN gradient on one of two ranks", nan_on_one_rank, 0, 1),
    "plan": ("DP ranks compute different balancer plans", plan_mismatch, 0, 1),
    "empty-step": ("steps that predict no token, DP=1 vs DP=2", empty_step_dp1_vs_dp2, 0, 1),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced set a test runs")
    ap.add_argument("--only", help="comma-separated scenario names: " + ", ".join(SCENARIOS))
    ap.add_argument("--json", metavar="OUT.json", help="write the results here")
    ap.add_argument("--workdir", metavar="DIR", help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args(argv)
    names = (
        args.only.split(",") if args.only else [n for n, s in SCENARIOS.items() if s[2 if args.quick else 3]]
    )
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        print(
            f"error: unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fault_check-"))
    work = Work(root)
    results, failed = [], 0
    for name in names:
        fault, fn, _, _ = SCENARIOS[name]
        try:
            outcome, seconds = fn(work)
            ok = True
        except (AssertionError, subprocess.TimeoutExpired, IndexError) as exc:
            outcome, seconds, ok = f"NOT SURVIVED: {exc}", float("nan"), False
            failed += 1
        results.append({"scenario": name, "fault": fault, "ok": ok, "outcome": outcome, "seconds": seconds})
        print(f"{'ok  ' if ok else 'FAIL'} {name:16s} {seconds:7.1f} s  {outcome}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
