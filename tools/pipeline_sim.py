"""Simulate the DFS pipeline schedule (megatron_dta.pipeline.dfs_schedule) on p stages and m microbatches.

    python tools/pipeline_sim.py [--workload tree_search] [--stages 2 4] [--microbatches 1 4 8]
        [--in-flight K] [--block-size 512] [--seed 0] [--workload-arg num_roots=16 ...]

Each microbatch is a contiguous share of the workload's groups (trees), planned in dta mode. The
simulation is the schedule the implementation executes: unit costs are tokens (forward t,
backward 2t on every stage, communication free), F u on stage s waits for F u on s-1, B u for
B u on s+1, and each stage keeps at most K microbatches in flight (default 2p). Printed per (p, m):
the bubble fraction 1 - busy / (p * makespan) and the peak in-flight memory of the busiest stage
(kept activation tokens, and microbatches in flight, each holding its path's K/V stacks), next
to 1F1B over whole microbatches: bubble (p-1)/(m+p-1), peak min(p, m) x the largest
microbatch's tokens (stage 0 holds p microbatches in flight).
"""

from __future__ import annotations

import argparse
import sys
from itertools import pairwise

from megatron_dta.engine.plan import build_plan, seq_offsets_of
from megatron_dta.errors import UserError
from megatron_dta.pipeline import dfs_schedule, event_tokens
from megatron_dta.synthetic import WORKLOADS, make_workload, parse_workload_args


def microbatches(rollouts, m: int):
    groups: dict = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r)
    trees = list(groups.values())
    bounds = [len(trees) * i // m for i in range(m + 1)]
    return [[r for tree in trees[a:b] for r in tree] for a, b in pairwise(bounds) if b > a]


def plan_of(rollouts, block_size: int):
    seqs = [r.input_ids for r in rollouts]
    return build_plan("dta", seqs, seq_offsets_of([len(s) for s in seqs]), block_size)


def table(
    workload: str,
    stages,
    ms,
    block_size: int,
    seed: int,
    in_flight: int | None = None,
    workload_args: dict | None = None,
) -> list[str]:
    rollouts = make_workload(workload, vocab_size=1000, seed=seed, **(workload_args or {}))
    trees = len({r.group for r in rollouts})
    lines = [
        (
            f"workload {workload}: {len(rollouts)} rollouts, {trees} trees, block_size {block_size}, "
            f"in flight {in_flight or '2p'}"
        ),
        "| p | m | units | DFS bubble | 1F1B bubble | "
        "DFS peak kept tokens (mb in flight) | 1F1B peak tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for m in ms:
        plans = [plan_of(mb, block_size) for mb in microbatches(rollouts, m)]
        if len(plans) in seen:  # m beyond the number of trees gives the same microbatches again
            continue
        seen.add(len(plans))
        events = [event_tokens(plan.events()) for plan in plans]
        biggest = max(plan.computed_tokens for plan in plans)
        for p in stages:
            sched = dfs_schedule(events, p, in_flight or 2 * p)
            m_real = len(plans)
            lines.append(
                f"| {p} | {m_real} | {sum(map(len, events)) // 2} | {sched.bubble:.3f} "
                f"| {(p - 1) / (m_real + p - 1):.3f} | {max(sched.peak_kept_tokens)} "
                f"({max(sched.peak_in_flight)}) | {min(p, m_real) * biggest} |"
            )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="tree_search")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--in-flight", type=int, default=None, help="microbatches in flight per stage (default: p)"
    )
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workload-arg",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override a size of the synthetic workload, e.g. num_roots=16 (repeatable)",
    )
    args = ap.parse_args(argv)
    if min(args.stages) < 1 or min(args.microbatches) < 1 or (args.in_flight or 1) < 1:
        ap.error("--stages, --microbatches and --in-flight must be >= 1")
    try:
        extra = parse_workload_args(args.workload_arg)
        lines = table(
            args.workload, args.stages, args.microbatches, args.block_size, args.seed, args.in_flight, extra
        )
    except (TypeError, UserError) as exc:  # an unknown or malformed --workload-arg
        ap.error(str(exc))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
