"""Which rank holds which unit, and each rank's load; the initial longest-first placements.

A unit is a contiguous range of DFS positions of a ``Layout``. Its index stays fixed while its range
changes (a boundary shift, a cut, a merge with a DFS neighbour); a merged-away unit's range is
None. A rank's load is the cost of the forest of all its rollouts (``exact``), so its pieces of one
tree share their prefix; between ``exact`` calls it is kept as a running sum of unit costs.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from megatron_dta.balancer.cost import price
from megatron_dta.balancer.layout import Layout


class Assignment:
    """Units on ranks. Lists are indexed by unit: ``units`` (range or None), ``cost`` (its range's
    cost alone), ``owner`` (its rank, -1 for none); ``on[rank]`` is the set of units on ``rank``."""

    def __init__(self, layout: Layout, units: list[tuple[int, int]], ranks: int, max_tokens: float):
        self.layout = layout
        self.max_tokens = max_tokens
        self.units: list[tuple[int, int] | None] = []
        self.cost: list[float] = []
        self.owner: list[int] = []
        self.at_start: dict[int, int] = {}  # first position -> unit
        self.at_end: dict[int, int] = {}  # one past the last position -> unit
        self.on: list[set[int]] = [set() for _ in range(ranks)]
        self.loads = np.zeros(ranks)  # estimates (sums of unit costs) until exact() is called
        self.coef_F = layout.model.coefficients
        self.coef_F[-1] = 0.0  # microbatch constants are added once the rank is packed
        for unit in units:
            self.new_unit(unit)

    def new_unit(self, unit: tuple[int, int]) -> int:
        self.units.append(None)
        self.cost.append(0.0)
        self.owner.append(-1)
        self.set(len(self.units) - 1, unit)
        return len(self.units) - 1

    def set(self, u: int, unit: tuple[int, int] | None) -> None:
        """Give unit u a new range (None: drop it), keeping the indexes and its rank's load."""
        rank = self.owner[u]
        if rank >= 0:
            self.take(u)
        if self.units[u] is not None:
            a, b = self.units[u]
            if self.at_start.get(a) == u:
                del self.at_start[a]
            if self.at_end.get(b) == u:
                del self.at_end[b]
        self.units[u] = unit
        if unit is not None:
            self.at_start[unit[0]], self.at_end[unit[1]] = u, u
            self.cost[u] = self.layout.cost(*unit)
            if rank >= 0:
                self.put(u, rank)

    def put(self, u: int, rank: int) -> None:
        self.on[rank].add(u)
        self.owner[u] = rank
        self.loads[rank] += self.cost[u]

    def take(self, u: int) -> None:
        rank = self.owner[u]
        self.on[rank].remove(u)
        self.owner[u] = -1
        self.loads[rank] -= self.cost[u]

    def move(self, u: int, rank: int) -> None:
        self.take(u)
        self.put(u, rank)

    def split(self, u: int, e: int) -> int:
        """Cut unit u at position e: u keeps [a, e), the returned new unit is [e, b) on no rank yet."""
        a, b = self.units[u]
        self.set(u, (a, e))
        return self.new_unit((e, b))

    def drop_newest(self, piece: int) -> None:
        """Forget ``piece``, the unit made last (undoes ``new_unit``; its range must be joined back)."""
        assert piece == len(self.units) - 1, "only the newest unit can be forgotten"
        self.set(piece, None)
        self.units.pop(), self.cost.pop(), self.owner.pop()

    def merge(self, rank: int) -> None:
        """Join units on ``rank`` that are DFS neighbours while the result fits a microbatch."""
        for u in sorted(self.on[rank], key=lambda u: self.units[u]):
            v = self.at_start.get(self.units[u][1]) if self.units[u] else None
            if v is not None and self.owner[v] == rank:
                (a, _), (_, b) = self.units[u], self.units[v]
                if self.layout.tokens(a, b) <= self.max_tokens:
                    self.set(u, None)
                    self.set(v, (a, b))

    def positions(self, units) -> np.ndarray:
        """Sorted DFS positions of ``units``."""
        return np.sort(np.concatenate([np.arange(*self.units[u]) for u in units] or [np.zeros(0, np.int64)]))

    def exact(self, *ranks: int) -> None:
        """Replace the running loads of ``ranks`` by the cost of the forest of each one's rollouts."""
        for r in ranks:
            self.loads[r] = price(self.layout.features(self.positions(self.on[r])), self.coef_F)

    def lpt(self, size: Sequence[float]) -> None:
        """Largest ``size`` first, each onto the rank with the least ``size`` so far."""
        heap = [(0.0, r) for r in range(len(self.on))]
        for u in sorted(range(len(self.units)), key=lambda u: -size[u]):
            load, r = heapq.heappop(heap)
            self.put(u, r)
            heapq.heappush(heap, (load + size[u], r))
        self.exact(*range(len(self.on)))

    def lpt_shared(self) -> None:
        """Largest unit first onto the rank where it ends least loaded: the least loaded rank, or
        one already holding a unit of its tree, which then adds the unit minus the tree's root."""
        lay = self.layout
        heap = [(0.0, r) for r in range(len(self.on))]
        holders: dict[int, list[int]] = {}  # tree -> ranks holding a unit of it
        for u in sorted(range(len(self.units)), key=lambda u: -self.cost[u]):
            while heap[0][0] != self.loads[heap[0][1]]:  # drop entries made stale below
                heapq.heapreplace(heap, (self.loads[heap[0][1]], heap[0][1]))
            r, new = heap[0][1], heap[0][0] + self.cost[u]
            tree = int(lay.tree_of[self.units[u][0]])
            held = holders.setdefault(tree, [])
            if held:
                loads = self.loads[held] + self.cost[u] - lay.tree_root_cost[tree]
                i = int(np.argmin(loads))
                if loads[i] < new:
                    r, new = held[i], loads[i]
            self.put(u, r)
            self.loads[r] = new
            if r == heap[0][1]:
                heapq.heapreplace(heap, (new, r))
            else:
                heapq.heappush(heap, (new, r))
            if r not in held:
                held.append(r)
        self.exact(*range(len(self.on)))
