"""The partitioners: ``balance`` and the two baselines it is measured against."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from megatron_dta.balancer.assignment import Assignment
from megatron_dta.balancer.cost import CostModel
from megatron_dta.balancer.layout import Layout
from megatron_dta.balancer.plan import DEFAULT_TOLERANCE, BalancePlan, make_plan
from megatron_dta.balancer.refine import refine
from megatron_dta.forest import PrefixForest
from megatron_dta.rollouts import Rollout


def balance(
    batch: Sequence[Rollout | np.ndarray] | PrefixForest,
    ranks: int,
    max_tokens_per_microbatch: int | None = None,
    cost_model: CostModel | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> BalancePlan:
    """Partition ``batch`` (rollouts, token arrays, or their forest) over ``ranks``: whole trees by
    predicted cost, cut along the DFS order where needed, refined to within ``1 + tolerance`` of the
    mean where the batch allows it."""
    max_tokens = _check(ranks, max_tokens_per_microbatch)
    layout = Layout(_as_forest(batch), cost_model or CostModel())

    def cut(limit: float) -> Assignment:
        """Trees cut into the fewest pieces within ``limit`` and a microbatch, then longest first."""
        units = [p for a, b in layout.trees for p in layout.cut(a, b, limit, max_tokens)]
        asg = Assignment(layout, units, ranks, max_tokens)
        asg.lpt(asg.cost)
        return asg

    def explode(limit: float) -> Assignment:
        """Trees split into subtrees within ``limit`` and a microbatch, then placed sharing-aware."""
        units = [p for a, b in layout.trees for p in layout.explode(a, b, limit, max_tokens)]
        asg = Assignment(layout, units, ranks, max_tokens)
        asg.lpt_shared()
        return asg

    candidates = []
    for attempt in (cut, explode):
        best = _smallest_limit_kept(attempt, layout, ranks, tolerance)
        candidates += [best, attempt(best.loads.mean() * (1 + tolerance))]  # the second: fewer cuts
    plans = []
    for asg in candidates:
        refine(asg, tolerance, max_rounds=20 * ranks + 1000)
        plans.append(make_plan(asg, max_tokens, tolerance))
    # The shortest step (most loaded rank); the fewest duplicated tokens among ties.
    step = min(p.rank_costs.max() for p in plans)
    return min(
        (p for p in plans if p.rank_costs.max() <= step * (1 + 1e-3)), key=lambda p: p.duplicated_tokens
    )


def _smallest_limit_kept(
    attempt: Callable[[float], Assignment], layout: Layout, ranks: int, tolerance: float
) -> Assignment:
    """The placement at the smallest unit cost limit whose ranks all stay within it, by bisection
    (at the sum of all costs every attempt does)."""
    lo = max(layout.cum_cost[-1] / ranks, layout.full_cost.max())
    hi = max(lo, float(layout.cum_cost[-1]))
    best = attempt(hi)
    while hi > lo * (1 + tolerance / 8):
        mid = math.sqrt(lo * hi)
        asg = attempt(mid)
        if asg.loads.max() <= mid:
            hi, best = mid, asg
        else:
            lo = mid
    return best


def round_robin(
    batch, ranks: int, max_tokens_per_microbatch: int | None = None, cost_model: CostModel | None = None
) -> BalancePlan:
    """Baseline: rollout i on rank i mod ranks, trees ignored."""
    max_tokens = _check(ranks, max_tokens_per_microbatch)
    layout = Layout(_as_forest(batch), cost_model or CostModel())
    position = np.empty(len(layout.order), dtype=np.int64)
    position[layout.order] = np.arange(len(layout.order))
    asg = Assignment(layout, [(int(p), int(p) + 1) for p in position], ranks, max_tokens)
    for i in range(len(position)):
        asg.put(i, i % ranks)
    asg.exact(*range(ranks))
    return make_plan(asg, max_tokens)


def token_count_greedy(
    batch, ranks: int, max_tokens_per_microbatch: int | None = None, cost_model: CostModel | None = None
) -> BalancePlan:
    """Baseline (AReaL-DTA's production balancer): whole trees, largest unique-token count first onto
    the rank with the fewest tokens; trees are cut only to fit a microbatch."""
    max_tokens = _check(ranks, max_tokens_per_microbatch)
    layout = Layout(_as_forest(batch), cost_model or CostModel())
    asg = Assignment(layout, layout.trees, ranks, max_tokens)
    asg.lpt([layout.tokens(a, b) for a, b in layout.trees])
    return make_plan(asg, max_tokens)


def _as_forest(batch) -> PrefixForest:
    if not isinstance(batch, PrefixForest):
        batch = PrefixForest([r.input_ids if isinstance(r, Rollout) else np.asarray(r) for r in batch])
    if not batch.sequences:
        raise ValueError("the batch has no rollouts: nothing to balance")
    return batch


def _check(ranks: int, max_tokens: int | None) -> float:
    """The token limit as a number (inf for none), once the arguments are valid."""
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens_per_microbatch must be >= 1 or None (no limit), got {max_tokens}")
    return math.inf if max_tokens is None else max_tokens
