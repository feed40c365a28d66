"""The balancer's output (``BalancePlan``) and how an assignment becomes one: packed into
microbatches, each priced exactly, with the bounds a plan is judged against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from megatron_dta.balancer.assignment import Assignment
from megatron_dta.balancer.cost import price
from megatron_dta.balancer.pack import pack

DEFAULT_TOLERANCE = 0.02  # refine to 1.02 x the mean; packing into microbatches may add a little


class Microbatch(NamedTuple):
    rank: int
    index: int
    sequences: list[int]  # rollout indices, ascending (file order)


@dataclass
class BalancePlan:
    """Who computes what: ``num_microbatches`` microbatches on each of ``len(rank_costs)`` ranks."""

    microbatches: list[Microbatch]  # ordered by rank, then index
    microbatch_tokens: list[int]  # unique tokens of each microbatch
    rank_costs: np.ndarray  # [ranks] predicted seconds (microbatch constants included)
    num_microbatches: int
    unique_tokens: int  # of the whole batch
    duplicated_tokens: int  # sum of microbatch unique tokens - unique tokens of the batch
    lower_bound: float  # the imbalance of the largest rollout (indivisible) alone on a rank
    # Estimated floor of duplicated tokens: every tree over a microbatch's token limit or over
    # (1 + tolerance) x the ideal rank cost split into the fewest pieces, each recomputing its root.
    duplication_lower_bound: int

    @property
    def imbalance(self) -> float:
        """Max rank cost / mean rank cost (1.0 is perfect)."""
        return float(self.rank_costs.max() / self.rank_costs.mean())

    def for_rank(self, rank: int) -> list[list[int]]:
        """The rollout indices of each of ``rank``'s microbatches, in order."""
        k = self.num_microbatches
        return [mb.sequences for mb in self.microbatches[rank * k : (rank + 1) * k]]

    def to_json(self) -> dict:
        return {
            "microbatches": [mb._asdict() for mb in self.microbatches],
            "imbalance": self.imbalance,
            "duplicated_tokens": self.duplicated_tokens,
            "unique_tokens": self.unique_tokens,
            "num_microbatches": self.num_microbatches,
            "rank_costs": self.rank_costs.tolist(),
            "lower_bound": self.lower_bound,
            "duplication_lower_bound": self.duplication_lower_bound,
        }


def make_plan(asg: Assignment, max_tokens: float, tolerance: float = DEFAULT_TOLERANCE) -> BalancePlan:
    """Pack ``asg`` into microbatches (this changes it) and price every microbatch exactly."""
    lay = asg.layout
    bins_by_rank = pack(asg, max_tokens)
    k = len(bins_by_rank[0])
    coef_F = lay.model.coefficients
    microbatches, mb_tokens = [], []
    rank_costs = np.zeros(len(bins_by_rank))
    for r, bins in enumerate(bins_by_rank):
        for i, units in enumerate(bins):
            pos = asg.positions(units)
            feat_F = lay.features(pos)
            rank_costs[r] += price(feat_F, coef_F)
            mb_tokens.append(int(feat_F[0]))
            microbatches.append(Microbatch(r, i, sorted(lay.order[pos].tolist())))
    largest = float(lay.full_cost.max()) + k * lay.model.constant
    # A plan whose ranks cost at most (1 + tolerance) x this plan's mean cuts every tree into at
    # least pieces_needed pieces, each after the first recomputing at least the tree's root node.
    cap = (rank_costs.mean() - k * lay.model.constant) * (1 + tolerance)
    dup_bound = sum(
        (lay.pieces_needed(a, b, cap, max_tokens) - 1) * int(lay.lcp[a + 1 : b].min())
        for a, b in lay.trees
        if b - a > 1
    )
    return BalancePlan(
        microbatches=microbatches,
        microbatch_tokens=mb_tokens,
        rank_costs=rank_costs,
        num_microbatches=k,
        unique_tokens=lay.unique_tokens,
        duplicated_tokens=int(sum(mb_tokens)) - lay.unique_tokens,
        lower_bound=max(1.0, largest / rank_costs.mean()),
        duplication_lower_bound=dup_bound,
    )
