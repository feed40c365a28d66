"""Speed against memory under engine.memory_budget_mib: a sweep of budgets (an interface).

    python tools/memory_sweep.py --budgets none,400,265,200,132 [benchmark.py's model/workload options]
        --json OUT.json [--plot OUT.png] [--sparse-budgets 600,400] [--baselines dense,sparse,hf_sparse]

Runs ``tools/benchmark.py``'s fresh-process workers: dta at each budget (``none``: unbudgeted), sparse at
each ``--sparse-budgets`` (it splits its microbatches), and the unbudgeted baselines; prints a
table (s/step, tokens/s, planned and measured memory, measured / budget) and plots tokens/s
against the measured step memory rise (``steady_step_memory_bytes``: after the warm-up, see
``devtools.bench.SteadyStepMeter``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402 (a sibling tool: its workers and workload options)


def points(args, path: str) -> list[dict]:
    runs = [("dta", b) for b in args.budgets]
    runs += [("sparse", b) for b in args.sparse_budgets] + [(m, None) for m in args.baselines]
    out = []
    for mode, budget in runs:
        args.memory_budget_mib = budget
        res = benchmark.run_modes(args, path, [mode])
        r = res["modes"][mode]
        out.append(
            {
                "mode": mode,
                "budget_mib": budget,
                **r,
                **{k: res[k] for k in ("total_tokens", "unique_tokens")},
            }
        )
    return out


def table(rows: list[dict]) -> str:
    names = ["mode", "budget MiB", "s/step", "tokens/s", "planned MiB", "measured MiB", "measured / budget"]
    lines = ["| " + " | ".join([*names, "recomputed"]) + " |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['mode']} | {r['budget_mib']} | error: {r['error'].splitlines()[-1]} | | | | | |"
            )
            continue
        mib, budget, planned = (
            r["steady_step_memory_bytes"] / 2**20,
            r["budget_mib"],
            r.get("planned_memory_bytes"),
        )
        cells = [
            r["mode"],
            f"{budget:g}" if budget else "-",
            f"{r['seconds_per_step']:.2f}",
            f"{r['tokens_per_second']:,.0f}",
            f"{planned / 2**20:.0f}" if planned else "-",
            f"{mib:.0f}",
            f"{mib / budget:.2f}" if budget else "-",
            str(r.get("recomputed_tokens", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, marker in (
        ("dta", "o-"),
        ("sparse", "s"),
        ("dense", "^"),
        ("hf_sparse", "v"),
        ("hf_dense", "x"),
    ):
        ok = sorted(
            (r for r in rows if r["mode"] == mode and "error" not in r),
            key=lambda r: r["steady_step_memory_bytes"],
        )
        if ok:
            xs = [r["steady_step_memory_bytes"] / 2**20 for r in ok]
            ax.plot(xs, [r["tokens_per_second"] for r in ok], marker, label=mode)
            for r, x in zip(ok, xs):
                if r["budget_mib"]:
                    ax.annotate(f"{r['budget_mib']:g}", (x, r["tokens_per_second"]), fontsize=7)
    ax.set(xlabel="measured step memory rise (MiB)", ylabel="tokens/s", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", required=True, help="dta budgets in MiB, comma-separated; none: unbudgeted")
    ap.add_argument("--sparse-budgets", default="", help="sparse budgets in MiB, comma-separated")
    ap.add_argument("--baselines", default="sparse,dense", help="unbudgeted modes besides dta")
    ap.add_argument("--title", default="", help="plot title")
    own, rest = ap.parse_known_args(argv)
    args = benchmark.parse_args(rest)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.budgets = [None if b == "none" else float(b) for b in own.budgets.split(",") if b]
    args.sparse_budgets = [float(b) for b in own.sparse_budgets.split(",") if b]
    args.baselines = [m for m in own.baselines.split(",") if m]
    from megatron_dta.rollouts import write_rollouts
    from megatron_dta.synthetic import make_workload, parse_workload_args

    with tempfile.TemporaryDirectory() as d:
        path = args.rollouts or f"{d}/workload.jsonl"
        if not args.rollouts:
            vocab = benchmark.model_config(args).vocab_size
            write_rollouts(
                path, make_workload(args.workload, vocab, args.seed, **parse_workload_args(args.workload_arg))
            )
        rows = points(args, path)
    print(table(rows))
    if args.plot:
        plot(rows, args.plot, own.title)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": args.model, "dtype": args.dtype, "points": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
