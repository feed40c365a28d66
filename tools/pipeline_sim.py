"""Simulate the DFS pipeline schedule (megatron_dta.pipeline) on p stages and m microbatches.

    python tools/pipeline_sim.py [--workload tree_search] [--stages 2 4] [--microbatches 1 4 8]
        [--block-size 512] [--seed 0]

Each microbatch is a contiguous share of the workload's groups (trees), planned in dta mode. Unit
costs are tokens: forward t, backward 2t on every stage, communication free. Every stage runs the
events (F u, B u) of all microbatches in DFS order, as the implementation does; F u on stage s
waits for F u on s-1, B u on s for B u on s+1. Printed per (p, m): the bubble fraction
1 - busy / (p * makespan), and the peak kept activations of one stage (tokens whose forward ran
and backward has not), next to 1F1B over whole microbatches: bubble (p-1)/(m+p-1), peak
min(p, m) x the largest microbatch's tokens (stage 0 holds p microbatches in flight).
"""

from __future__ import annotations

import argparse
import sys
from itertools import pairwise

from megatron_dta.engine.plan import build_plan, seq_offsets_of
from megatron_dta.synthetic import WORKLOADS, make_workload


def dfs_events(plan):
    """[(is_backward, tokens)] of a plan's units in the executor's order (F u, children, B u)."""
    events, todo = [], [(u, False) for u in reversed(plan.roots)]
    while todo:
        unit, done = todo.pop()
        if done:
            events.append((True, unit.num_tokens))
            continue
        events.append((False, unit.num_tokens))
        todo.append((unit, True))
        for kids in reversed(unit.children):
            todo.extend((k, False) for k in reversed(kids))
    return events


def simulate(events, p: int) -> tuple[float, int]:
    """(bubble fraction, peak kept tokens on a stage) of one event stream on ``p`` stages."""
    free = [0.0] * p
    busy = 0.0
    kept = peak = 0
    for backward, t in events:
        cost = 2.0 * t if backward else float(t)
        stages = range(p - 1, -1, -1) if backward else range(p)
        dep = 0.0
        for s in stages:  # each stage after its own previous event and the neighbour's same event
            dep = max(free[s], dep) + cost
            free[s] = dep
        busy += p * cost
        kept += -t if backward else t
        peak = max(peak, kept)
    return 1.0 - busy / (p * max(free)), peak


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


def table(workload: str, stages, ms, block_size: int, seed: int) -> list[str]:
    rollouts = make_workload(workload, vocab_size=1000, seed=seed)
    trees = len({r.group for r in rollouts})
    lines = [f"workload {workload}: {len(rollouts)} rollouts, {trees} trees, block_size {block_size}",
             "| p | m | units | DFS bubble | 1F1B bubble | DFS peak kept tokens | 1F1B peak tokens |",
             "|---|---|---|---|---|---|---|"]
    for m in ms:
        plans = [plan_of(mb, block_size) for mb in microbatches(rollouts, m)]
        events = [e for plan in plans for e in dfs_events(plan)]
        biggest = max(plan.computed_tokens for plan in plans)
        for p in stages:
            bubble, peak = simulate(events, p)
            m_real = len(plans)
            lines.append(f"| {p} | {m_real} | {len(events) // 2} | {bubble:.3f} | {(p - 1) / (m_real + p - 1):.3f} "
                         f"| {peak} | {min(p, m_real) * biggest} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="tree_search")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if min(args.stages) < 1 or min(args.microbatches) < 1:
        ap.error("--stages and --microbatches must be >= 1")
    print("\n".join(table(args.workload, args.stages, args.microbatches, args.block_size, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
