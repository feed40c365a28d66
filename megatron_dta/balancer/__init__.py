"""Cost model and partitioner: which rollouts each rank computes, in which microbatch.

The cost of one microbatch is linear in five features of the prefix forest of its rollouts
(``cost.CostModel``), fitted to measured timings by non-negative least squares.

``balance`` (``partition``) splits a batch over ``ranks``. Rollouts are laid out in the forest's
DFS order (``layout.Layout``), where a contiguous range of rollouts (a *unit*: a tree, or a piece of
one) costs a prefix-sum difference, and a cut between DFS neighbours duplicates exactly their
common prefix (the piece after the cut recomputes its ancestor path). Then:

1. Units: trees, cut into the fewest pieces that fit a limit and ``max_tokens_per_microbatch``,
   each cut at the position duplicating the fewest tokens (``Layout.cut``); or trees split into
   the subtrees under their top node (``Layout.explode``). The limit is bisected down to the
   smallest at which longest-processing-time-first (``assignment.Assignment.lpt``) stays within it.
2. Refinement of the most loaded rank (``refine.refine``): shift a boundary with a DFS neighbour
   held by another rank (no new cut), move or swap units with the least loaded rank, or, above
   ``(1 + tolerance)`` x the mean, hand it a cut piece (maybe for a unit back); each move a record
   with ``apply`` and ``undo``. Loads are exact forest costs, so pieces of one tree on one rank
   share their prefix.
3. Per rank, first-fit decreasing into microbatches of at most ``max_tokens_per_microbatch``
   unique tokens (``pack``; a rank's units of one tree together while they fit). Every rank gets
   the same count: extra microbatches come from splitting a multi-unit microbatch, else from
   taking a small unit from the most loaded rank, else from cutting a unit; a rank gets an empty
   microbatch only when it has fewer rollouts than the others have microbatches.

Of the candidate plans (cut or explode, at the bisected limit or at 1 + tolerance times its mean)
the one with the least loaded most loaded rank (the step time) wins; ties go to fewer duplicated
tokens. Invariants: every rollout is in exactly one microbatch; every rank has the same number of
microbatches; a microbatch has at most ``max_tokens_per_microbatch`` unique tokens unless it is a
single rollout over the limit. Pure numpy: no torch here.

Modules, in the order data flows: ``cost`` -> ``layout`` -> ``assignment`` -> ``refine`` ->
``pack`` -> ``plan`` -> ``partition``.
"""

from megatron_dta.balancer.assignment import Assignment
from megatron_dta.balancer.cost import FEATURES, CostModel, nnls
from megatron_dta.balancer.layout import Layout
from megatron_dta.balancer.partition import balance, round_robin, token_count_greedy
from megatron_dta.balancer.plan import DEFAULT_TOLERANCE, BalancePlan, Microbatch

__all__ = [
    "DEFAULT_TOLERANCE",
    "FEATURES",
    "Assignment",
    "BalancePlan",
    "CostModel",
    "Layout",
    "Microbatch",
    "balance",
    "nnls",
    "round_robin",
    "token_count_greedy",
]
