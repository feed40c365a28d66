"""Predicted vs measured step time and peak memory on this CPU machine (the planner's validation).

    python tools/validate_planner.py [--steps 4] [--json docs/planner_validation_cpu.json]

For each CPU config (one process; TP=2, PP=2, DP=2, CP=2, EP=2 over two gloo processes) it runs
``megatron-dta plan --gpu cpu`` (the profile tools/calibrate.py --profile-out fitted here), then
trains the config for 1 and for 1 + ``--steps`` steps (one thread per process). Time: the machine
is shared, so wall time measures the neighbours; the measured step is the CPU time the processes
spent on the extra steps, per step and process, compared with the plan's work per rank (compute,
DP reduction and optimizer, without the pipeline bubble, which is idle time CPU time cannot see).
The wall-clock step (median after the first) is reported beside it. Memory: the plan's largest
per-rank total against the largest peak resident memory of a process (metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (config, processes)
    ("configs/demo_cpu.yaml", 1),
    ("configs/cpu_2proc_tp2.yaml", 2),
    ("configs/cpu_2proc_pp2.yaml", 2),
    ("configs/cpu_2proc_dp2.yaml", 2),
    ("configs/cpu_2proc_cp2.yaml", 2),
    ("configs/cpu_2proc_ep2.yaml", 2),
]


def _run(cmd: list[str], env: dict) -> float:
    """CPU seconds the command and its children used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def validate(config: str, procs: int, steps: int, tmp: Path, env: dict) -> dict:
    name = Path(config).stem
    report = tmp / f"{name}.json"
    common = ["checkpoint.every=1000", "logging.progress=none"]
    py = sys.executable
    plan_args = ["--world-size", str(procs), "--gpu", "cpu", "--allow-oom", "--json", str(report)]
    _run([py, "-m", "megatron_dta", "plan", "--config", config, *plan_args, *common], env)
    torchrun = [str(Path(py).with_name("torchrun")), "--standalone", "--nproc-per-node", str(procs)]
    launch = [py, "-m", "megatron_dta"] if procs == 1 else [*torchrun, "-m", "megatron_dta"]
    cpu = [
        _run(
            [
                *launch,
                "train",
                "--config",
                config,
                f"train.steps={n}",
                f"checkpoint.run_dir={tmp / name}{n}",
                *common,
            ],
            env,
        )
        for n in (1, 1 + steps)
    ]
    plan = json.loads(report.read_text())
    metrics = [
        json.loads(line) for line in (tmp / f"{name}{1 + steps}" / "metrics.jsonl").read_text().splitlines()
    ]
    measured_s = (cpu[1] - cpu[0]) / steps / procs
    work = plan["breakdown_seconds"]
    predicted_s = work["compute_mean"] + work["dp_reduction"] + work["optimizer"]
    measured_mem = max(m["peak_memory_bytes"] for m in metrics)
    predicted_mem = max(r["memory_bytes"]["total"] for r in plan["ranks"])
    return {
        "config": config,
        "layout": plan["layout"],
        "predicted_work_seconds": predicted_s,
        "measured_cpu_seconds_per_step": measured_s,
        "time_error": predicted_s / measured_s - 1,
        "predicted_step_seconds": plan["step_seconds"],
        "measured_wall_step_seconds": statistics.median(m["seconds"] for m in metrics[1:]),
        "bubble": plan["bubble"],
        "predicted_peak_bytes": predicted_mem,
        "measured_peak_bytes": measured_mem,
        "memory_error": predicted_mem / measured_mem - 1,
        "predicted_terms_busiest_rank": max(plan["ranks"], key=lambda r: r["memory_bytes"]["total"])[
            "memory_bytes"
        ],
        "load_average": os.getloadavg()[0],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("| config | layout | work s plan | CPU s | error | peak MiB plan | measured | error | wall s |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for config, procs in CASES:
            r = validate(config, procs, args.steps, Path(tmp), env)
            rows.append(r)
            lay = r["layout"]
            print(
                f"| {Path(config).name} | "
                f"tp{lay['tp']} pp{lay['pp']} dp{lay['dp']} cp{lay['cp']} ep{lay['ep']} | "
                f"{r['predicted_work_seconds']:.3f} | {r['measured_cpu_seconds_per_step']:.3f} | "
                f"{r['time_error']:+.0%} | "
                f"{r['predicted_peak_bytes'] / 2**20:.0f} | {r['measured_peak_bytes'] / 2**20:.0f} | "
                f"{r['memory_error']:+.0%} | {r['measured_wall_step_seconds']:.2f} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
