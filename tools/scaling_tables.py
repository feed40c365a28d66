"""Predicted strong and weak scaling of Qwen3-8B / Qwen3-32B on the agentic workload (docs/scaling.md).

    python tools/scaling_tables.py [--sizes 8 64 1024] [--gpu h100] --json docs/scaling.json
        --plot docs/scaling.png

For every size and candidate layout it calls the planner (``megatron_dta.planner.plan``, the code
behind ``megatron-dta plan``) on the configs/qwen3_*gpu.yaml settings with the layout replaced, and
keeps every mode's prediction. Strong scaling: one global batch of ``--strong-tasks`` agentic
tasks at every size; weak scaling: one task (a GRPO group of 8 trajectories) per ``--gpus-per-task``
GPUs. The batches and their balanced plans are built once per batch and data-parallel size and shared
by the layouts and both models. Everything printed is a prediction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # model: (config, [(tp, pp, optimizer backend)])
    "qwen3-8b": ("configs/qwen3_8b_64gpu.yaml", [(4, 1, "megatron"), (8, 1, "megatron")]),
    "qwen3-32b": ("configs/qwen3_32b_64gpu.yaml", [(8, 1, "megatron"), (8, 2, "torch")]),
}


def study(
    sizes, gpu: str, strong_tasks: int, gpus_per_task: int, out: Path, kinds=("strong", "weak")
) -> list[dict]:
    """Every (kind, size, model, layout) planned; ``out`` is rewritten after each, so a long study
    that is stopped keeps what it did."""
    from megatron_dta.config import Config
    from megatron_dta.planner import load_profile, plan, workload_of

    hw = load_profile(gpu)
    workloads: dict = {}
    rows = []
    for kind in kinds:
        for world in sizes:
            tasks = strong_tasks if kind == "strong" else max(1, world // gpus_per_task)
            for model, (config, layouts) in MODELS.items():
                for tp, pp, backend in layouts:
                    if world % (tp * pp):
                        continue
                    over = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"optimizer.backend={backend}"]
                    cfg = Config.from_yaml(ROOT / config, [*over, f"data.workload_args.num_tasks={tasks}"])
                    if tasks not in workloads:  # both models share the vocabulary: one batch
                        workloads[tasks] = workload_of(cfg, cfg.model.model_config().vocab_size)
                    t0 = time.perf_counter()
                    r = plan(cfg, world, hw, workloads[tasks])
                    peak = max(x["memory_bytes"]["total"] for x in r["ranks"])
                    row = {
                        "kind": kind,
                        "model": model,
                        "gpus": world,
                        "tasks": tasks,
                        "layout": r["layout"],
                        "optimizer": backend,
                        "batch": r["batch"],
                        "dta": {
                            "step_seconds": r["step_seconds"],
                            "tokens_per_second": r["tokens_per_second"],
                            "mfu": r["mfu"],
                            "bubble": r["bubble"],
                            "imbalance": r["imbalance"],
                            "peak_memory_bytes": peak,
                            "fits": r["fits"],
                            "breakdown_seconds": r["breakdown_seconds"],
                            "communication_bytes": r["communication_bytes"],
                        },
                        **r["baselines"],
                        "plan_seconds": time.perf_counter() - t0,
                    }
                    rows.append(row)
                    out.write_text(json.dumps(rows, indent=1) + "\n")
                    print(
                        f"{kind} {model} {world} GPUs tp{tp} pp{pp} dp{r['layout']['dp']}: "
                        f"{r['tokens_per_second']:,.0f} tok/s, MFU {r['mfu']:.3f}, "
                        f"peak {peak / 2**30:.1f} GiB, bubble {r['bubble']:.3f}, "
                        f"imbalance {r['imbalance']:.3f} ({row['plan_seconds']:.0f} s)",
                        flush=True,
                    )
    return rows


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for i, kind in enumerate(("strong", "weak")):
        for model, style in (("qwen3-8b", "o-"), ("qwen3-32b", "s--")):
            best = best_rows(rows, kind, model)
            gpus = [r["gpus"] for r in best]
            for mode, color in (("dta", "C0"), ("sparse", "C1"), ("dense", "C2")):
                label = f"{model} {mode}"
                axes[i][0].plot(
                    gpus, [r[mode]["tokens_per_second"] for r in best], style, color=color, label=label
                )
                axes[i][1].plot(gpus, [r[mode]["mfu"] for r in best], style, color=color, label=label)
                axes[i][2].plot(
                    gpus,
                    [r[mode]["peak_memory_bytes"] / 2**30 for r in best],
                    style,
                    color=color,
                    label=label,
                )
        for ax, title in zip(axes[i], ("tokens/s (all GPUs)", "MFU", "peak memory per GPU (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_title(f"{kind} scaling, predicted: {title}")
            ax.set_xlabel("H100 GPUs")
        axes[i][0].set_yscale("log")
        axes[i][2].axhline(80, color="k", lw=0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def best_rows(rows: list[dict], kind: str, model: str) -> list[dict]:
    """Per size, the dta layout with the highest predicted tokens/s among those that fit."""
    out = []
    for gpus in sorted({r["gpus"] for r in rows}):
        cands = [r for r in rows if r["kind"] == kind and r["model"] == model and r["gpus"] == gpus]
        fitting = [r for r in cands if r["dta"]["fits"]] or cands
        if fitting:
            out.append(max(fitting, key=lambda r: r["dta"]["tokens_per_second"]))
    return out


def markdown(rows: list[dict]) -> str:
    """Per scaling kind and model, the best dta layout per size next to the baselines."""
    gib = 2**30
    out = []
    for kind in ("strong", "weak"):
        for model in MODELS:
            out += [
                f"**{kind} scaling, {model}** (predicted; * = does not fit in 80 GiB)",
                "",
                "| GPUs | tasks | layout | step s | dta tok/s | MFU | GiB | sparse tok/s | GiB "
                "| dense tok/s | GiB | bubble | imbalance | TP / DP GiB per rank |",
                "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
            for r in best_rows(rows, kind, model):
                lay, d, sp, de = r["layout"], r["dta"], r["sparse"], r["dense"]
                mark = {m: "" if r[m]["fits"] else "*" for m in ("dta", "sparse", "dense")}
                comm = d["communication_bytes"]
                out.append(
                    f"| {r['gpus']} | {r['tasks']} | tp{lay['tp']} pp{lay['pp']} dp{lay['dp']} "
                    f"| {d['step_seconds']:.2f} | {d['tokens_per_second']:,.0f} | {d['mfu']:.3f} "
                    f"| {d['peak_memory_bytes'] / gib:.0f}{mark['dta']} "
                    f"| {sp['tokens_per_second']:,.0f} | {sp['peak_memory_bytes'] / gib:.0f}{mark['sparse']} "
                    f"| {de['tokens_per_second']:,.0f} | {de['peak_memory_bytes'] / gib:.0f}{mark['dense']} "
                    f"| {d['bubble']:.3f} | {d['imbalance']:.2f} "
                    f"| {comm['tp'] / gib:.0f} / {comm['dp'] / gib:.1f} |"
                )
            out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 64, 1024])
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--strong-tasks", type=int, default=8)
    ap.add_argument("--gpus-per-task", type=int, default=128)
    ap.add_argument("--json", help="where the study's rows go")
    ap.add_argument("--plot")
    ap.add_argument("--kinds", nargs="+", default=["strong", "weak"], choices=["strong", "weak"])
    ap.add_argument(
        "--tables-from", metavar="JSON", help="print the markdown tables of an earlier --json and exit"
    )
    args = ap.parse_args(argv)
    if args.tables_from:  # tables and plot of an earlier (or a stopped) study
        rows = json.loads(Path(args.tables_from).read_text())
        print(markdown(rows))
        if args.plot:
            plot(rows, args.plot)
        return 0
    if not args.json:
        ap.error("--json is required (or --tables-from)")
    rows = study(args.sizes, args.gpu, args.strong_tasks, args.gpus_per_task, Path(args.json), args.kinds)
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
