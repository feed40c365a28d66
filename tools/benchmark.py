"""Dense vs sparse vs DTA, side by side, each mode in its own fresh process (an interface).

    python tools/benchmark.py [--hf-checkpoint DIR | --model PRESET] [--rollouts FILE.jsonl |
        --workload NAME] --modes dense,sparse,dta --steps N [--dtype D]
        [--max-tokens-per-microbatch T] [--cp N] --json OUT.json [--plot OUT.png]

Writes {"total_tokens", "unique_tokens", "sharing_ratio", "modes": {MODE: {"seconds_per_step"
(median), "tokens_per_second" (total tokens / s), "peak_memory_bytes" (peak RSS on CPU, peak
allocated on GPU), "step_memory_bytes" (peak minus memory in use before the warm-up step, the
weights' gradients allocated), "steady_step_memory_bytes" (the largest rise of the timed steps,
after the warm-up: ``devtools.bench.SteadyStepMeter``), "planned_memory_bytes" and "recomputed_tokens" (under
``--memory-budget-mib``, engine.memory_budget_mib)}}} and
prints a table with ratios to dense. ``--cp N`` runs each mode under ``torchrun --nproc-per-node N``
with every unit split over N context-parallel ranks (the slowest rank's time, the largest rank's
memory). Extra modes hf_dense / hf_sparse run HF transformers on the
same architecture (each rollout alone / packed forest with a 4D ancestor mask). ``--plot`` also
sweeps a fan-out workload (one 256-token prompt, 4..64 completions) and plots tokens/s and peak
memory per mode against sharing ratio and number of leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--hf-checkpoint", help="local HF checkpoint directory to benchmark")
    src.add_argument("--model", default="tiny", help="model preset built with random weights (default: tiny)")
    data = ap.add_mutually_exclusive_group()
    data.add_argument("--rollouts", help="rollout file (JSON Lines)")
    data.add_argument("--workload", default="demo", help="synthetic workload name (default: demo)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument(
        "--workload-arg",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override a size of the synthetic workload, e.g. prompt_len=3072 (repeatable)",
    )
    ap.add_argument(
        "--modes", default="dense,sparse,dta", help="comma-separated: dense,sparse,dta,hf_dense,hf_sparse"
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode after 1 warm-up step")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (GPU default), float64")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--block-size", type=int, default=2048, help="dta: max tokens per unit")
    ap.add_argument(
        "--max-tokens-per-microbatch",
        type=int,
        default=None,
        help="sparse: unique tokens packed together (the forest is split beyond it)",
    )
    ap.add_argument("--cp", type=int, default=1, help="context-parallel ranks (processes) per mode")
    ap.add_argument(
        "--memory-budget-mib",
        type=float,
        default=None,
        help="engine.memory_budget_mib for dense, sparse and dta: the step's memory rise cap",
    )
    ap.add_argument("--json", required=False, help="write the results here")
    ap.add_argument("--plot", help="also run the fan-out sweep and save a PNG plot here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def model_config(args):
    from megatron_dta.model.config import preset
    from megatron_dta.model.hf import config_from_hf, read_hf_dir

    if args.hf_checkpoint:
        return config_from_hf(read_hf_dir(args.hf_checkpoint)[0])
    return preset(args.model)


def run_worker(args) -> None:
    import torch

    from megatron_dta.devtools.bench import run_mode
    from megatron_dta.rollouts import load_rollouts

    cfg = model_config(args)
    rollouts = load_rollouts(args.rollouts, cfg.vocab_size)
    res = run_mode(
        args.worker,
        cfg,
        rollouts,
        args.steps,
        args.dtype,
        args.device,
        args.block_size,
        args.max_tokens_per_microbatch,
        args.hf_checkpoint,
        args.cp,
        args.memory_budget_mib,
    )
    if int(os.environ.get("RANK", "0")):
        return
    res["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    Path(args.worker_out).write_text(json.dumps(res))


def run_modes(args, rollouts_path: str, modes: list[str]) -> dict:
    from megatron_dta.forest import PrefixForest
    from megatron_dta.rollouts import load_rollouts

    forest = PrefixForest([r.input_ids for r in load_rollouts(rollouts_path)])
    out = {
        "total_tokens": forest.total_tokens,
        "unique_tokens": forest.unique_tokens,
        "sharing_ratio": forest.sharing_ratio,
        "leaves": sum(1 for n in forest.nodes if not n.children),
        "model": args.hf_checkpoint or args.model,
        "dtype": args.dtype,
        "cp": args.cp,
        "memory_budget_mib": args.memory_budget_mib,
        "modes": {},
    }
    for mode in modes:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            launch = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node"]
            cmd = [
                *([*launch, str(args.cp)] if args.cp > 1 else [sys.executable]),
                str(HERE),
                "--cp",
                str(args.cp),
                "--worker",
                mode,
                "--worker-out",
                tmp.name,
                "--rollouts",
                rollouts_path,
                "--steps",
                str(args.steps),
                "--dtype",
                args.dtype,
                "--device",
                args.device,
                "--block-size",
                str(args.block_size),
            ]
            cmd += ["--hf-checkpoint", args.hf_checkpoint] if args.hf_checkpoint else ["--model", args.model]
            if args.max_tokens_per_microbatch:
                cmd += ["--max-tokens-per-microbatch", str(args.max_tokens_per_microbatch)]
            if args.memory_budget_mib:
                cmd += ["--memory-budget-mib", str(args.memory_budget_mib)]
            print(f"[benchmark] {mode}: {args.steps} steps ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=worker_env())
            if proc.returncode:
                tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
                print(f"[benchmark] {mode} failed: {tail}", file=sys.stderr)
                out["modes"][mode] = {"error": tail}
                continue
            out["modes"][mode] = json.loads(Path(tmp.name).read_text())
            out["device"] = out["modes"][mode].pop("device")
    return out


def worker_env() -> dict:
    """The workers' environment. On CPU memory is read as RSS, and glibc keeps freed heap pages that
    it may never return, so RSS drifts above what is live (a 200 MiB budget read as 269 MiB steady
    rise): allocations from 128 KiB up are mmapped and go back to the system when freed."""
    return {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}


def print_table(res: dict) -> None:
    modes = {m: r for m, r in res["modes"].items() if "error" not in r}
    base = modes.get("dense")
    print(
        f"\n{res['total_tokens']:,} tokens, {res['unique_tokens']:,} unique, sharing ratio R = "
        f"{res['sharing_ratio']:.2f}, model {res['model']}, {res['dtype']}, {res.get('device', '?')}"
    )
    print(
        f"{'mode':<10} {'s/step':>8} {'tokens/s':>10} {'vs dense':>9} "
        f"{'/ R':>6} {'peak MiB':>9} {'step MiB':>9}"
    )
    for m, r in modes.items():
        if base:
            speed = base["seconds_per_step"] / r["seconds_per_step"]
            ratios = f"{speed:8.2f}x {speed / res['sharing_ratio']:6.2f}"
        else:
            ratios = f"{'-':>9} {'-':>6}"
        print(
            f"{m:<10} {r['seconds_per_step']:8.3f} {r['tokens_per_second']:10.0f} {ratios} "
            f"{r['peak_memory_bytes'] / 2**20:9.0f} {r['step_memory_bytes'] / 2**20:9.0f}"
        )
    if "dta" in modes and "sparse" in modes:
        print(
            f"dta vs sparse: "
            f"{modes['sparse']['seconds_per_step'] / modes['dta']['seconds_per_step']:.2f}x tokens/s, "
            f"step memory "
            f"{modes['dta']['step_memory_bytes'] / max(modes['sparse']['step_memory_bytes'], 1):.2f}x"
        )


def sweep_and_plot(args, modes: list[str], png: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_dta.rollouts import write_rollouts
    from megatron_dta.synthetic import make_workload

    vocab = model_config(args).vocab_size
    points = []
    with tempfile.TemporaryDirectory() as d:
        for n in (4, 8, 16, 32, 64):
            path = f"{d}/fanout{n}.jsonl"
            write_rollouts(
                path,
                make_workload(
                    "fanout", vocab, args.seed, prompt_len=256, num_completions=n, completion_len=32
                ),
            )
            points.append(run_modes(args, path, modes))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for m in modes:
        ok = [p for p in points if "error" not in p["modes"].get(m, {"error": 1})]
        for col, key in enumerate(("sharing_ratio", "leaves")):
            xs = [p[key] for p in ok]
            axes[0, col].plot(xs, [p["modes"][m]["tokens_per_second"] for p in ok], "o-", label=m)
            axes[1, col].plot(xs, [p["modes"][m]["peak_memory_bytes"] / 2**20 for p in ok], "o-", label=m)
    for col, key in enumerate(("sharing ratio R", "leaves")):
        axes[0, col].set(xlabel=key, ylabel="tokens/s")
        axes[1, col].set(xlabel=key, ylabel="peak memory (MiB)")
    axes[0, 0].legend()
    fig.suptitle(
        f"fan-out sweep: 256-token prompt, 4..64 completions of 32 tokens ({args.model}, {args.dtype})"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"[benchmark] wrote {png}")
    return {"fanout_sweep": points}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        run_worker(args)
        return 0
    from megatron_dta.cli_util import user_errors
    from megatron_dta.rollouts import write_rollouts
    from megatron_dta.synthetic import make_workload, parse_workload_args

    modes = [m for m in args.modes.split(",") if m]
    with user_errors(), tempfile.TemporaryDirectory() as d:
        path = args.rollouts
        if path is None:
            path = f"{d}/workload.jsonl"
            overrides = parse_workload_args(args.workload_arg)
            write_rollouts(
                path, make_workload(args.workload, model_config(args).vocab_size, args.seed, **overrides)
            )
        res = run_modes(args, path, modes)
        res["workload"] = args.rollouts or args.workload
        print_table(res)
        if args.plot:
            res.update(sweep_and_plot(args, modes, args.plot))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
            print(f"[benchmark] wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
