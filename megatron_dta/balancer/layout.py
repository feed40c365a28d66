"""The batch's rollouts in the forest's DFS order, where ranges of rollouts are cheap to price.

A contiguous range of DFS positions (a *unit*: a tree, or a piece of one) costs a prefix-sum
difference, and a cut between DFS neighbours duplicates exactly their common prefix (the piece
after the cut recomputes its ancestor path). For positions p < q of one tree, the common prefix of
rollouts p and q is the minimum of ``lcp[p+1 .. q]``, so any set of positions is priced exactly in
O(its size): the members' own features minus the overlaps of consecutive members.

Shape suffixes: N rollouts (DFS positions), F = len(FEATURES) cost features, T trees.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from megatron_dta.balancer.cost import FEATURES, CostModel, price, triangle
from megatron_dta.forest import PrefixForest


def _dfs_neighbour_overlaps(forest: PrefixForest, order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """[N] tokens and [N] nodes that rollout ``order[k]`` shares with ``order[k - 1]`` (0 at k = 0 and
    where a new tree starts)."""
    nodes = forest.nodes
    parent = [n.parent for n in nodes]
    dfs_out = forest.dfs_out.tolist()
    lcp_N = np.zeros(len(order), dtype=np.int64)
    lca_depth_N = np.zeros(len(order), dtype=np.int64)
    prev = -1
    for k, i in enumerate(order):
        w = forest.paths[i][-1]
        if prev >= 0:  # climb to the deepest ancestor of both (pre-order ids: prev <= w)
            while w >= 0 and not w <= prev < dfs_out[w]:
                w = parent[w]
            if w >= 0:
                lca_depth_N[k], lcp_N[k] = nodes[w].depth, nodes[w].end
        prev = forest.paths[i][-1]
    return lcp_N, lca_depth_N


class Layout:
    """The rollouts of ``forest`` in DFS order (``order[k]`` is the rollout at position k), with
    what each shares with its predecessor. Arrays without a suffix are [N], by position."""

    def __init__(self, forest: PrefixForest, model: CostModel):
        nodes = forest.nodes
        terminal = [p[-1] for p in forest.paths]
        n = len(terminal)
        self.order = np.array(sorted(range(n), key=lambda i: (terminal[i], i)), dtype=np.int64)
        lcp, lca_depth = _dfs_neighbour_overlaps(forest, self.order.tolist())
        length = np.array([len(forest.sequences[i]) for i in self.order], dtype=np.int64)
        depth = np.array([nodes[terminal[i]].depth for i in self.order], dtype=np.int64)
        ones = np.ones(n, dtype=np.int64)
        self.full_NF = np.stack([length, triangle(length), depth, ones, 0 * ones], axis=1)
        self.shared_NF = np.stack([lcp, triangle(lcp), lca_depth, 0 * ones, 0 * ones], axis=1)
        self.lcp = lcp  # tokens shared with the previous position
        self.lca_depth = lca_depth  # nodes shared with the previous position
        self.model = model
        coef_F = model.coefficients
        coef_F[-1] = 0.0  # units carry no per-microbatch constant
        self.full_cost = price(self.full_NF, coef_F)  # of the rollout alone
        self.cum_cost = np.cumsum(price(self.full_NF - self.shared_NF, coef_F))
        self.cum_tokens = np.cumsum(length - lcp)
        self.slack_cost = self.cum_cost - self.full_cost  # non-decreasing (see rest_starts)
        self.slack_tokens = self.cum_tokens - length
        self.shared_cost = price(self.shared_NF, coef_F)  # recomputed if a piece starts here
        starts = np.flatnonzero(lcp == 0)
        self.tree_of = np.cumsum(lcp == 0) - 1  # tree index of each position
        self.trees = list(zip(starts.tolist(), [*starts[1:].tolist(), n]))  # [T] position ranges
        self.unique_tokens = int(self.cum_tokens[-1]) if n else 0
        # [T] what any two pieces of a tree share: its root node (the least shared by DFS neighbours).
        self.tree_root_cost = np.array(
            [self.shared_cost[a + 1 : b].min(initial=np.inf) if b - a > 1 else 0.0 for a, b in self.trees]
        )

    def costs(self, a, b):
        """Cost of the positions [a, b) without the microbatch constant; a or b may be arrays."""
        return self.full_cost[a] + self.cum_cost[b - 1] - self.cum_cost[a]

    def token_counts(self, a, b):
        """Unique tokens of the positions [a, b); a or b may be arrays."""
        return self.full_NF[a, 0] + self.cum_tokens[b - 1] - self.cum_tokens[a]

    def cost(self, a: int, b: int) -> float:
        return float(self.costs(a, b))

    def tokens(self, a: int, b: int) -> int:
        return int(self.token_counts(a, b))

    def features(self, positions: np.ndarray) -> np.ndarray:
        """[F] features of one microbatch holding the rollouts at sorted DFS ``positions``.

        Exact for tokens, attention pairs and rollouts; nodes counts the batch forest's nodes on the
        members' paths, at least as many as the members' own trie has (it may merge some).
        """
        out_F = np.zeros(len(FEATURES), dtype=np.float64)
        out_F[-1] = 1.0
        if len(positions) == 0:
            return out_F
        out_F += self.full_NF[positions].sum(axis=0)
        if len(positions) > 1:
            top = positions[-1] + 1
            overlap = np.minimum.reduceat(self.lcp[:top], positions[:-1] + 1)
            overlap_depth = np.minimum.reduceat(self.lca_depth[:top], positions[:-1] + 1)
            out_F[0] -= overlap.sum()
            out_F[1] -= triangle(overlap).sum()
            out_F[2] -= overlap_depth.sum()
        return out_F

    def _shared_cost(self, lcp: np.ndarray, depth: np.ndarray) -> np.ndarray:
        coef_F = self.model.coefficients
        return coef_F[0] * lcp + coef_F[1] * triangle(lcp) + coef_F[2] * depth

    def shared_from(self, x: int | None, a: int, b: int) -> np.ndarray:
        """[b - a] cost of the common prefix of rollout x (< a) and each rollout in [a, b)."""
        if x is None:
            return np.zeros(b - a)
        lcp = np.minimum.accumulate(self.lcp[x + 1 : b])[a - x - 1 :]
        depth = np.minimum.accumulate(self.lca_depth[x + 1 : b])[a - x - 1 :]
        return self._shared_cost(lcp, depth)

    def shared_to(self, a: int, b: int, y: int | None) -> np.ndarray:
        """[b - a] cost of the common prefix of each rollout in [a, b) and rollout y (>= b)."""
        if y is None:
            return np.zeros(b - a)
        lcp = np.minimum.accumulate(self.lcp[a + 1 : y + 1][::-1])[::-1][: b - a]
        depth = np.minimum.accumulate(self.lca_depth[a + 1 : y + 1][::-1])[::-1][: b - a]
        return self._shared_cost(lcp, depth)

    def fitting_prefix(self, a: int, b: int, max_cost: float, max_tokens: float) -> int:
        """Rollouts k >= 1 in the longest piece [a, a + k) within both limits (at least one)."""
        kc = np.searchsorted(self.cum_cost[a:b], max_cost - self.full_cost[a] + self.cum_cost[a], "right")
        kt = np.searchsorted(
            self.cum_tokens[a:b], max_tokens - self.full_NF[a, 0] + self.cum_tokens[a], "right"
        )
        return max(1, int(min(kc, kt)))

    def rest_starts(self, a: int, b: int, max_cost: float, max_tokens: float) -> list[int]:
        """Greedy from the right: ``starts[k - 1]`` is the first position e from which [e, b) fits in k
        pieces within the limits; ``len(starts)`` pieces are needed for [a, b) (optimal for any a).

        A piece [c, d) costs own[c] - cum[c] + cum[d-1], and cum[c] - own[c] never falls as c grows
        (dropping a piece's first rollout never adds work), so each start is a binary search.
        """
        starts, d = [], b
        while d > a:
            c = max(
                np.searchsorted(self.slack_cost[a:d], self.cum_cost[d - 1] - max_cost),
                np.searchsorted(self.slack_tokens[a:d], self.cum_tokens[d - 1] - max_tokens),
            )
            d = min(d - 1, a + int(c))
            starts.append(d)
        return starts

    def cut(
        self, a: int, b: int, max_cost: float = math.inf, max_tokens: float = math.inf
    ) -> list[tuple[int, int]]:
        """Cut [a, b) into the fewest pieces within both limits (a rollout over them stays whole).

        Left to right, each cut is the one duplicating the fewest tokens (the latest on ties) among
        those keeping the piece within the limits and the rest within one piece fewer.
        """
        if self.cost(a, b) <= max_cost and self.tokens(a, b) <= max_tokens:
            return [(a, b)]
        starts = self.rest_starts(a, b, max_cost, max_tokens)
        pieces = []
        for need in range(len(starts), 1, -1):
            lo = starts[need - 2]
            hi = max(lo, min(a + self.fitting_prefix(a, b, max_cost, max_tokens), b - 1))
            e = self.cheapest_cut(lo, hi)
            pieces.append((a, e))
            a = e
        pieces.append((a, b))
        return pieces

    def explode(self, a: int, b: int, max_cost: float, max_tokens: float) -> list[tuple[int, int]]:
        """Split [a, b) into the subtrees under its top node, recursively while over a limit."""
        out, todo = [], [(a, b)]
        while todo:
            a, b = todo.pop()
            if b - a < 2 or (self.cost(a, b) <= max_cost and self.tokens(a, b) <= max_tokens):
                out.append((a, b))
                continue
            inner = self.lcp[a + 1 : b]
            bounds = [a, *(a + 1 + np.flatnonzero(inner == inner.min())).tolist(), b]
            todo += itertools.pairwise(bounds)
        return sorted(out)

    def cheapest_cut(self, lo: int, hi: int) -> int:
        """The cut position e in [lo, hi] duplicating the fewest tokens (lcp[e]); the last on ties."""
        return hi - int(np.argmin(self.lcp[lo : hi + 1][::-1]))

    def pieces_needed(self, a: int, b: int, max_cost: float, max_tokens: float) -> int:
        """A lower bound on the pieces any split of tree [a, b) within the limits has: every piece
        after the first recomputes at least the tree's root node."""
        if b - a < 2:
            return 1
        root_cost, root_tokens = self.shared_cost[a + 1 : b].min(), self.lcp[a + 1 : b].min()
        need = 1
        for total, limit, root in (
            (self.cost(a, b), max_cost, root_cost),
            (self.tokens(a, b), max_tokens, root_tokens),
        ):
            if total > limit:
                need = max(need, math.ceil((total - root) / (limit - root)) if limit > root else b - a)
        return min(need, b - a)
