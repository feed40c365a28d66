"""Packing each rank's units into microbatches, the same number on every rank.

Per rank: units over ``max_tokens`` are cut where they duplicate least, the units of one tree are
joined while they fit (so they share their prefix), and the groups are packed first-fit decreasing
by unique tokens. Every rank then gets the largest count, because pipeline schedules and
collectives need it (``_add_microbatch``); a rank gets an empty microbatch only when it has fewer
rollouts than the others have microbatches.
"""

from __future__ import annotations

import numpy as np

from megatron_dta.balancer.assignment import Assignment

Bins = list[list[int]]  # one rank's microbatches, each a list of units


def pack(asg: Assignment, max_tokens: float) -> list[Bins]:
    """Per rank, the units of each of its microbatches; every rank has the same count."""
    bins_by_rank = []
    for r in range(len(asg.on)):
        _cut_to_fit(asg, r, max_tokens)
        bins_by_rank.append(_first_fit_decreasing(asg, _tree_groups(asg, r, max_tokens), max_tokens))
    k = max(1, max(len(b) for b in bins_by_rank))
    donors = sorted(range(len(bins_by_rank)), key=lambda r: -asg.loads[r])  # most loaded give first
    for r, bins in enumerate(bins_by_rank):
        while len(bins) < k and _add_microbatch(asg, r, bins_by_rank, donors):
            pass
        bins += [[] for _ in range(k - len(bins))]  # fewer rollouts here than microbatches elsewhere
    return bins_by_rank


def _cut_to_fit(asg: Assignment, r: int, max_tokens: float) -> None:
    """Cut r's units over ``max_tokens`` into the fewest pieces within it, all on r."""
    for u in sorted(asg.on[r]):
        pieces = asg.layout.cut(*asg.units[u], max_tokens=max_tokens)
        for _, e in reversed(pieces[:-1]):  # u keeps the first piece
            asg.put(asg.split(u, e), r)


def _tree_groups(asg: Assignment, r: int, max_tokens: float) -> list[tuple[int, list[int]]]:
    """(unique tokens, units) of r's units in DFS order, each run of one tree's units joined while
    the group fits ``max_tokens``."""
    lay = asg.layout
    groups: list[tuple[int, list[int]]] = []
    last_tree, last_end = -1, 0
    for u in sorted(asg.on[r], key=lambda u: asg.units[u]):
        a, b = asg.units[u]
        tree, tokens = int(lay.tree_of[a]), lay.tokens(a, b)
        shared = int(lay.lcp[last_end : a + 1].min()) if tree == last_tree else 0
        if tree == last_tree and groups[-1][0] + tokens - shared <= max_tokens:
            groups[-1] = (groups[-1][0] + tokens - shared, groups[-1][1] + [u])
        else:
            groups.append((tokens, [u]))
        last_tree, last_end = tree, b
    return groups


def _first_fit_decreasing(asg: Assignment, groups: list[tuple[int, list[int]]], max_tokens: float) -> Bins:
    """Largest group first, into the first microbatch with room for it (else a new one)."""
    bins: Bins = []
    room = np.zeros(0)  # [len(bins)] tokens left in each microbatch
    for t, units in sorted(groups, key=lambda group: (-group[0], asg.units[group[1][0]])):
        fit = np.flatnonzero(room >= t)
        if len(fit):
            bins[fit[0]] += units
            room[fit[0]] -= t
        else:
            bins.append(list(units))
            room = np.append(room, max_tokens - t)
    return bins


def _add_microbatch(asg: Assignment, rank: int, bins_by_rank: list[Bins], donors: list[int]) -> bool:
    """One more microbatch on ``rank``, by the first that applies: split its fullest multi-unit
    microbatch (free); take the cheapest unit from a multi-unit microbatch of the most loaded rank
    that has one, if that costs less than the cheapest cut; cut a unit where it duplicates the
    fewest tokens. False if none applies (only empty microbatches are left to add)."""
    bins = bins_by_rank[rank]
    if any(len(b) > 1 for b in bins):
        _split_fullest(asg, bins)
        return True
    cut = _cheapest_cut(asg, bins)
    while donors and not any(len(b) > 1 for b in bins_by_rank[donors[0]]):
        donors.pop(0)
    if donors and donors[0] != rank:
        given = bins_by_rank[donors[0]]
        give = min((u for b in given if len(b) > 1 for u in b), key=lambda u: asg.cost[u])
        if cut is None or asg.cost[give] <= cut[0]:
            next(b for b in given if give in b).remove(give)
            asg.move(give, rank)
            bins.append([give])
            return True
    if cut is None:
        return False
    piece = asg.split(cut[1], cut[2])
    asg.put(piece, rank)
    bins.append([piece])
    return True


def _split_fullest(asg: Assignment, bins: Bins) -> None:
    """Split the multi-unit microbatch with the most tokens in two, largest units first onto the
    half with fewer tokens."""
    tokens_of = [sum(asg.layout.tokens(*asg.units[u]) for u in b) for b in bins]
    i = max((i for i, b in enumerate(bins) if len(b) > 1), key=lambda i: tokens_of[i])
    halves: tuple[list[int], list[int]] = ([], [])
    sums = [0, 0]
    for u in sorted(bins[i], key=lambda u: -asg.layout.tokens(*asg.units[u])):
        half = 0 if sums[0] <= sums[1] else 1
        halves[half].append(u)
        sums[half] += asg.layout.tokens(*asg.units[u])
    bins[i : i + 1] = list(halves)


def _cheapest_cut(asg: Assignment, bins: Bins) -> tuple[float, int, int] | None:
    """(duplicated cost, unit, position) of the cheapest cut of a single-unit microbatch's unit."""
    lay, cut = asg.layout, None
    for u in (b[0] for b in bins if b):
        a, b = asg.units[u]
        if b - a > 1:
            e = lay.cheapest_cut(a + 1, b - 1)
            if cut is None or lay.shared_cost[e] < cut[0]:
                cut = (lay.shared_cost[e], u, e)
    return cut
