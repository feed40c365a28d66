"""Cost model and partitioner: which rollouts each rank computes, in which microbatch.

The cost of one microbatch is linear in five features of the prefix forest of its rollouts
(``CostModel``): unique tokens (linear layers), causal query-key pairs of tree attention, nodes
(one DFS push/pop each), rollouts (one loss each) and a constant. The coefficients are fitted to
measured timings by non-negative least squares (``CostModel.fit``, used by ``tools/calibrate.py``).

``balance`` splits a batch over ``ranks``. Rollouts are laid out in the forest's DFS order, where
a contiguous range of rollouts (a *unit*: a tree, or a piece of one) costs a prefix-sum difference,
and a cut between DFS neighbours duplicates exactly their common prefix (the piece after the cut
recomputes its ancestor path). Then:

1. Units: trees, cut into the fewest pieces that fit a limit and ``max_tokens_per_microbatch``,
   each cut at the position duplicating the fewest tokens (``_Layout.cut``); or trees split into
   the subtrees under their top node (``_Layout.explode``). The limit is bisected down to the
   smallest at which longest-processing-time-first stays within it.
2. Refinement of the most loaded rank (``_Assignment.refine``): shift a boundary with a DFS
   neighbour held by another rank (no new cut), move or swap units with the least loaded rank,
   or, above ``(1 + tolerance)`` x the mean, hand it a cut piece (maybe for a unit back). Loads
   are exact forest costs, so pieces of one tree on one rank share their prefix.
3. Per rank, first-fit decreasing into microbatches of at most ``max_tokens_per_microbatch``
   unique tokens (a rank's units of one tree together while they fit). Every rank gets the same
   count: extra microbatches come from splitting a multi-unit microbatch, else from taking a small
   unit from the most loaded rank, else from cutting a unit; a rank gets an empty microbatch only
   when it has fewer rollouts than the others have microbatches.

Of the candidate plans (cut or explode, at the bisected limit or at 1 + tolerance times its mean)
the one with the least loaded most loaded rank (the step time) wins; ties go to fewer duplicated
tokens. Invariants: every rollout is in exactly one microbatch; every rank has the same number of
microbatches; a microbatch has at most ``max_tokens_per_microbatch`` unique tokens unless it is a
single rollout over the limit. Pure numpy: no torch here.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_dta.forest import PrefixForest
from megatron_dta.rollouts import Rollout

FEATURES = ("per_token", "attention", "per_node", "per_leaf", "constant")
DEFAULT_TOLERANCE = 0.02  # refine to 1.02 x the mean; packing into microbatches may add a little


def _triangle(n):
    """Causal query-key pairs of the first ``n`` positions of a path: n (n + 1) / 2."""
    return n * (n + 1) // 2


def nnls(a_MN: np.ndarray, b_M: np.ndarray) -> np.ndarray:
    """Non-negative least squares, min ||A x - b|| s.t. x >= 0 (Lawson-Hanson active set).

    Columns are scaled to unit norm first: cost features span ten orders of magnitude.
    """
    a_MN = np.asarray(a_MN, dtype=np.float64)
    b_M = np.asarray(b_M, dtype=np.float64)
    n = a_MN.shape[1]
    scale_N = np.linalg.norm(a_MN, axis=0)
    live_N = scale_N > 0  # an all-zero feature gets coefficient 0
    a_MN = a_MN[:, live_N] / scale_N[live_N]
    k = a_MN.shape[1]
    x_K = np.zeros(k)
    passive_K = np.zeros(k, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(a_MN.shape) * max(np.abs(a_MN).sum(axis=0).max(initial=0), 1)
    for _ in range(3 * k + 10):
        grad_K = a_MN.T @ (b_M - a_MN @ x_K)
        if passive_K.all() or grad_K[~passive_K].max(initial=-np.inf) <= tol:
            break
        passive_K[np.argmax(np.where(passive_K, -np.inf, grad_K))] = True
        while True:
            s_K = np.zeros(k)
            s_K[passive_K] = np.linalg.lstsq(a_MN[:, passive_K], b_M, rcond=None)[0]
            if s_K[passive_K].min() > 0:
                break
            # Step from x towards s until the first passive coefficient hits zero; drop it.
            neg = passive_K & (s_K <= 0)
            alpha = np.min(x_K[neg] / (x_K[neg] - s_K[neg]))
            x_K = x_K + alpha * (s_K - x_K)
            passive_K &= x_K > tol
            x_K[~passive_K] = 0.0
        x_K = s_K
    out_N = np.zeros(n)
    out_N[live_N] = x_K / scale_N[live_N]
    return out_N


@dataclass
class CostModel:
    """Predicted seconds for one microbatch: a non-negative linear function of its forest.

    The defaults are a guess of the right shape (roughly a 1-2B model on one H100: attention
    matches the linear layers at ~10K keys per query, each node costs a DFS push/pop of kernel
    launches); ``tools/calibrate.py`` replaces them with a fit on the running hardware.
    """

    per_token: float = 2e-5  # s per unique token (all linear layers, forward + backward)
    attention: float = 2e-9  # s per causal query-key pair: sum over nodes of own x (prefix + own)
    per_node: float = 5e-4  # s per forest node (one push and one pop of the DFS)
    per_leaf: float = 1e-4  # s per rollout (its loss; each ends at a leaf or at a prefix node)
    constant: float = 5e-3  # s per microbatch
    fit_error: float | None = None  # rms relative error of the fit that produced it, if any

    def __post_init__(self):
        for name in FEATURES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")

    @property
    def coefficients(self) -> np.ndarray:
        """[5] in the order of ``FEATURES``."""
        return np.array([getattr(self, name) for name in FEATURES], dtype=np.float64)

    @staticmethod
    def features(forest: PrefixForest) -> np.ndarray:
        """[5] features of one microbatch holding the rollouts of ``forest``, in ``FEATURES`` order."""
        pairs = sum(_triangle(n.end) - _triangle(n.offset) for n in forest.nodes)
        return np.array(
            [forest.unique_tokens, pairs, len(forest.nodes), len(forest.sequences), 1], dtype=np.float64
        )

    def predict(self, forest_or_features: PrefixForest | np.ndarray) -> float | np.ndarray:
        """Seconds for a forest, a feature vector [5], or a matrix of them [rows, 5]."""
        if isinstance(forest_or_features, PrefixForest):
            forest_or_features = self.features(forest_or_features)
        return np.asarray(forest_or_features, dtype=np.float64) @ self.coefficients

    @classmethod
    def fit(cls, features_RF: np.ndarray, seconds_R: np.ndarray) -> tuple[CostModel, float]:
        """Fit coefficients >= 0 to measured ``seconds`` of microbatches with ``features`` rows.

        Minimises the relative error (each row divided by its time), since timings span orders of
        magnitude. Returns the model and its rms relative error, also kept as ``fit_error``.
        """
        features_RF = np.asarray(features_RF, dtype=np.float64)
        seconds_R = np.asarray(seconds_R, dtype=np.float64)
        if (
            features_RF.ndim != 2
            or features_RF.shape[1] != len(FEATURES)
            or len(features_RF) != len(seconds_R)
        ):
            raise ValueError(
                f"fit needs features [rows, {len(FEATURES)}] and one time per row, got "
                f"{features_RF.shape} and {seconds_R.shape}"
            )
        if not np.all(seconds_R > 0):
            raise ValueError("every measured time must be > 0 seconds")
        coef = nnls(features_RF / seconds_R[:, None], np.ones(len(seconds_R)))
        error = float(np.sqrt(np.mean((features_RF @ coef / seconds_R - 1) ** 2)))
        return cls(**dict(zip(FEATURES, coef.tolist())), fit_error=error), error

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ValueError(
                f"{path}: a cost model file is a JSON object with keys among {sorted(known)}; "
                f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}"
            )
        return cls(**data)


class _Layout:
    """The batch's rollouts in DFS order, with what each shares with its predecessor.

    For positions p < q of one tree, the common prefix of rollouts p and q is the minimum of
    ``lcp[p+1 .. q]``, so a set of positions' features are the members' own minus the overlaps of
    consecutive members; for a contiguous range that is a prefix-sum difference.
    """

    def __init__(self, forest: PrefixForest, model: CostModel):
        nodes = forest.nodes
        parent = [n.parent for n in nodes]
        dfs_out = forest.dfs_out.tolist()
        terminal = [p[-1] for p in forest.paths]
        n = len(terminal)
        self.order = np.array(sorted(range(n), key=lambda i: (terminal[i], i)), dtype=np.int64)
        lca_depth = np.zeros(n, dtype=np.int64)
        lcp = np.zeros(n, dtype=np.int64)
        prev = -1
        for k, i in enumerate(self.order.tolist()):
            w = terminal[i]
            if prev >= 0:  # climb to the deepest ancestor of both (pre-order ids: prev <= w)
                while w >= 0 and not w <= prev < dfs_out[w]:
                    w = parent[w]
                if w >= 0:
                    lca_depth[k], lcp[k] = nodes[w].depth, nodes[w].end
            prev = terminal[i]
        length = np.array([len(forest.sequences[i]) for i in self.order], dtype=np.int64)
        depth = np.array([nodes[terminal[i]].depth for i in self.order], dtype=np.int64)
        ones = np.ones(n, dtype=np.int64)
        self.full_NF = np.stack([length, _triangle(length), depth, ones, 0 * ones], axis=1)
        self.shared_NF = np.stack([lcp, _triangle(lcp), lca_depth, 0 * ones, 0 * ones], axis=1)
        self.lcp = lcp
        self.lca_depth = lca_depth
        self.model = model
        coef = model.coefficients
        coef[-1] = 0.0  # units carry no per-microbatch constant
        self.full_cost = self.full_NF @ coef
        self.cum_cost = np.cumsum((self.full_NF - self.shared_NF) @ coef)
        self.cum_tokens = np.cumsum(length - lcp)
        self.slack_cost = self.cum_cost - self.full_cost  # non-decreasing (see rest_starts)
        self.slack_tokens = self.cum_tokens - length
        self.shared_cost = self.shared_NF @ coef  # recomputed if a piece starts here
        starts = np.flatnonzero(lcp == 0)
        self.tree_of = np.cumsum(lcp == 0) - 1  # [n] tree index of each position
        self.trees = list(zip(starts.tolist(), [*starts[1:].tolist(), n]))
        self.unique_tokens = int(self.cum_tokens[-1]) if n else 0
        # What any two pieces of a tree share: its root node (the least shared by DFS neighbours).
        self.tree_root_cost = np.array(
            [self.shared_cost[a + 1 : b].min(initial=np.inf) if b - a > 1 else 0.0 for a, b in self.trees]
        )

    def cost(self, a: int, b: int) -> float:
        """Cost of the contiguous positions [a, b) without the microbatch constant."""
        return float(self.full_cost[a] + self.cum_cost[b - 1] - self.cum_cost[a])

    def tokens(self, a: int, b: int) -> int:
        return int(self.full_NF[a, 0] + self.cum_tokens[b - 1] - self.cum_tokens[a])

    def features(self, positions: np.ndarray) -> np.ndarray:
        """[5] features of one microbatch holding the rollouts at sorted DFS ``positions``.

        Exact for tokens, attention pairs and rollouts; nodes counts the batch forest's nodes on the
        members' paths, at least as many as the members' own trie has (it may merge some).
        """
        out = np.zeros(len(FEATURES), dtype=np.float64)
        out[-1] = 1.0
        if len(positions) == 0:
            return out
        out += self.full_NF[positions].sum(axis=0)
        if len(positions) > 1:
            top = positions[-1] + 1
            overlap = np.minimum.reduceat(self.lcp[:top], positions[:-1] + 1)
            overlap_depth = np.minimum.reduceat(self.lca_depth[:top], positions[:-1] + 1)
            out[0] -= overlap.sum()
            out[1] -= _triangle(overlap).sum()
            out[2] -= overlap_depth.sum()
        return out

    def _shared_cost(self, lcp: np.ndarray, depth: np.ndarray) -> np.ndarray:
        coef = self.model.coefficients
        return coef[0] * lcp + coef[1] * _triangle(lcp) + coef[2] * depth

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


class _Assignment:
    """Units (contiguous ranges of DFS positions; None once merged away) on ranks, and each rank's
    load: the cost of the forest of all its rollouts, so its pieces of one tree share a prefix."""

    def __init__(self, layout: _Layout, units: list[tuple[int, int]], ranks: int, max_tokens: float):
        self.layout = layout
        self.max_tokens = max_tokens
        self.units: list[tuple[int, int] | None] = []
        self.cost: list[float] = []
        self.owner: list[int] = []
        self.at_start: dict[int, int] = {}  # first position -> unit
        self.at_end: dict[int, int] = {}  # one past the last position -> unit
        self.on: list[set[int]] = [set() for _ in range(ranks)]
        self.loads = np.zeros(ranks)  # estimates (sums of unit costs) until exact() is called
        self.coef = layout.model.coefficients
        self.coef[-1] = 0.0
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

    def positions(self, units) -> np.ndarray:
        return np.sort(np.concatenate([np.arange(*self.units[u]) for u in units] or [np.zeros(0, np.int64)]))

    def exact(self, *ranks: int) -> None:
        for r in ranks:
            self.loads[r] = self.layout.features(self.positions(self.on[r])) @ self.coef

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
        holders: dict[int, list[int]] = {}
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

    def split(self, u: int, e: int) -> int:
        """Cut unit u at position e: u keeps [a, e), the returned new unit is [e, b) on no rank yet."""
        a, b = self.units[u]
        self.set(u, (a, e))
        return self.new_unit((e, b))

    def merge(self, rank: int) -> None:
        """Join units on ``rank`` that are DFS neighbours while the result fits a microbatch."""
        for u in sorted(self.on[rank], key=lambda u: self.units[u]):
            v = self.at_start.get(self.units[u][1]) if self.units[u] else None
            if v is not None and self.owner[v] == rank:
                (a, _), (_, b) = self.units[u], self.units[v]
                if self.layout.tokens(a, b) <= self.max_tokens:
                    self.set(u, None)
                    self.set(v, (a, b))

    def refine(self, tolerance: float, max_rounds: int, tries: int = 32, receivers: int = 4) -> None:
        """Improve the most loaded rank r: move the boundary between one of its units and a DFS
        neighbour on another rank; else, with each of the ``receivers`` least loaded ranks s in
        turn, move or swap units, or (above the cap) hand s a cut piece, maybe for a unit back.
        Candidates are ranked by estimated loads; the first of ``tries`` whose exact loads both end
        below r's old load is kept."""
        for _ in range(max_rounds):
            r = int(np.argmax(self.loads))
            mean, top = self.loads.mean(), self.loads[r]
            if top <= mean * (1 + tolerance / 2) or len(self.on) == 1:
                return
            if self._try(r, top, self._shift(r)[:tries]):
                continue
            lightest = np.argpartition(self.loads, min(receivers, len(self.on) - 1))[:receivers]
            for s in sorted((s for s in lightest.tolist() if s != r), key=lambda s: self.loads[s]):
                steps = [self._move_or_swap(r, s)]
                if top > mean * (1 + tolerance):
                    steps.append(self._cut_to(r, s, mean * (1 + tolerance)))
                if any(self._try(r, top, step[:tries]) for step in steps):
                    break
            else:
                return

    def _try(self, r: int, top: float, candidates) -> bool:
        for apply in candidates:
            other, undo = apply()
            self.exact(r, other)
            if max(self.loads[r], self.loads[other]) < top * (1 - 1e-9):
                self.merge(r)
                self.merge(other)
                self.exact(r, other)
                return True
            undo()
            self.exact(r, other)
        return False

    def _shift(self, r: int) -> list:
        """Moves of the boundary between a unit of r and its DFS neighbour on another rank, best
        estimated first (each to where the larger of the two loads is least)."""
        lay, found = self.layout, []
        for u in self.on[r]:
            a, b = self.units[u]
            if b - a < 2:
                continue
            e = np.arange(a + 1, b)
            for v, right in ((self.at_start.get(b), True), (self.at_end.get(a), False)):
                if v is None or self.owner[v] == r:
                    continue
                s = self.owner[v]
                if right:  # u keeps [a, e), v grows to [e, b2)
                    b2 = self.units[v][1]
                    keep = lay.full_cost[a] + lay.cum_cost[e - 1] - lay.cum_cost[a]
                    grow = lay.full_cost[e] + lay.cum_cost[b2 - 1] - lay.cum_cost[e]
                    grow_tokens = lay.full_NF[e, 0] + lay.cum_tokens[b2 - 1] - lay.cum_tokens[e]
                else:  # u keeps [e, b), v grows to [a0, e)
                    a0 = self.units[v][0]
                    keep = lay.full_cost[e] + lay.cum_cost[b - 1] - lay.cum_cost[e]
                    grow = lay.full_cost[a0] + lay.cum_cost[e - 1] - lay.cum_cost[a0]
                    grow_tokens = lay.full_NF[a0, 0] + lay.cum_tokens[e - 1] - lay.cum_tokens[a0]
                worst = np.maximum(self.loads[r] - self.cost[u] + keep, self.loads[s] - self.cost[v] + grow)
                worst[grow_tokens > self.max_tokens] = np.inf
                i = int(np.argmin(worst))
                if worst[i] < self.loads[r]:
                    found.append((worst[i], u, v, int(e[i]), right))
        return [lambda c=c: self._apply_shift(*c[1:]) for c in sorted(found, key=lambda c: c[0])]

    def _apply_shift(self, u: int, v: int, e: int, right: bool):
        old_u, old_v = self.units[u], self.units[v]
        if right:
            self.set(u, (old_u[0], e))
            self.set(v, (e, old_v[1]))
        else:
            self.set(v, (old_v[0], e))
            self.set(u, (e, old_u[1]))

        def undo():
            self.set(u, old_u)
            self.set(v, old_v)

        return self.owner[v], undo

    def _move_or_swap(self, r: int, s: int) -> list:
        """Moves r -> s and swaps between r and s, best estimated first."""
        gap, lr, ls = self.loads[r] - self.loads[s], self.loads[r], self.loads[s]
        ur, us = list(self.on[r]), list(self.on[s])
        cr = np.array([self.cost[u] for u in ur])
        cs = np.array([self.cost[u] for u in us])
        found = []
        if len(ur):
            new = np.maximum(lr - cr, ls + cr)
            found += [(new[i], ur[i], None) for i in np.argsort(new)[:4] if new[i] < lr]
        if len(ur) and len(us):
            order = np.argsort(cs)
            cs, us = cs[order], [us[o] for o in order]
            j = np.searchsorted(cs, cr - gap / 2)  # swap partners near cost(u) - gap / 2
            for jj in (np.clip(j - 1, 0, len(us) - 1), np.clip(j, 0, len(us) - 1)):
                d = cr - cs[jj]
                new = np.maximum(lr - d, ls + d)
                new[d <= 0] = np.inf
                found += [(new[i], ur[i], us[jj[i]]) for i in np.argsort(new)[:4] if new[i] < lr]
        return [lambda c=c: self._apply_swap(r, s, *c[1:]) for c in sorted(found, key=lambda c: c[0])]

    def _apply_swap(self, r: int, s: int, u: int, v: int | None):
        self.take(u)
        self.put(u, s)
        if v is not None:
            self.take(v)
            self.put(v, r)

        def undo():
            self.take(u)
            self.put(u, r)
            if v is not None:
                self.take(v)
                self.put(v, s)

        return s, undo

    def _cut_to(self, r: int, s: int, cap: float) -> list:
        """Pieces (prefix or suffix) of r's units for s, maybe with one of s's smallest units back,
        preferring (1) both ranks <= cap, (2) s filled to between half its room and cap, (3) any
        lower maximum; fewest duplicated tokens, then lowest maximum, within a preference."""
        lay, lr, ls = self.layout, self.loads[r], self.loads[s]
        held = self.positions(self.on[s])
        rows = []  # (unit, cut position e, moves the prefix?, new load r, new load s, duplicated)
        for u in self.on[r]:
            a, b = self.units[u]
            if b - a < 2:
                continue
            e = np.arange(a + 1, b)
            pre = lay.full_cost[a] + lay.cum_cost[e - 1] - lay.cum_cost[a]  # cost of [a, e)
            suf = lay.full_cost[e] + lay.cum_cost[b - 1] - lay.cum_cost[e]  # cost of [e, b)
            # What s already computes of a piece: the prefix it shares with s's DFS neighbours.
            i = np.searchsorted(held, a)
            prev, nxt = (held[i - 1] if i else None), (held[i] if i < len(held) else None)
            before = lay.shared_from(prev, a, b)  # [b - a]: shared by prev and position a + j
            after = lay.shared_to(a, b, nxt)  # [b - a]: shared by position a + j and nxt
            both = lay.shared_from(prev, nxt, nxt + 1)[0] if prev is not None and nxt is not None else 0.0
            pre_gain = pre - before[0] - after[e - 1 - a] + both
            suf_gain = suf - before[e - a] - after[-1] + both
            for moves_prefix, gain, keep in ((True, pre_gain, suf), (False, suf_gain, pre)):
                rows.append(
                    (
                        np.full(len(e), u),
                        e,
                        np.full(len(e), moves_prefix),
                        lr - self.cost[u] + keep,
                        ls + gain,
                        lay.lcp[e],
                    )
                )
        if not rows:
            return []
        unit, e, moves_prefix, new_r, new_s, dup = (np.concatenate(c) for c in zip(*rows))
        back = [None, *sorted(self.on[s], key=lambda v: self.cost[v])[:16]]
        back_cost = np.array([0.0] + [self.cost[v] for v in back[1:]])
        new_r = (new_r[:, None] + back_cost).ravel()
        new_s = (new_s[:, None] - back_cost).ravel()
        worst = np.maximum(new_r, new_s)
        dup = np.repeat(dup, len(back))
        room = cap - ls
        fills = (new_s <= cap) & (new_s - ls >= room / 2) & (new_r < lr)
        mode = np.select([worst <= cap, fills, worst < lr], [0, 1, 2], 3)
        best = [int(k) for k in np.lexsort((worst, dup, mode)) if mode[k] < 3][:64]
        picked = [divmod(k, len(back)) for k in best]
        return [
            lambda i=i, j=j: self._apply_cut(r, s, int(unit[i]), int(e[i]), bool(moves_prefix[i]), back[j])
            for i, j in picked
        ]

    def _apply_cut(self, r: int, s: int, u: int, e: int, moves_prefix: bool, v: int | None):
        whole = self.units[u]
        piece = self.split(u, e)  # u keeps the prefix on r; piece is the suffix, on no rank
        mover = u if moves_prefix else piece
        if mover == u:
            self.take(u)
            self.put(piece, r)
        self.put(mover, s)
        if v is not None:
            self.take(v)
            self.put(v, r)

        def undo():
            if v is not None:
                self.take(v)
                self.put(v, s)
            self.set(piece, None)
            self.units.pop(), self.cost.pop(), self.owner.pop()
            self.take(u)
            self.put(u, r)
            self.set(u, whole)

        return s, undo


def _as_forest(batch) -> PrefixForest:
    if not isinstance(batch, PrefixForest):
        batch = PrefixForest([r.input_ids if isinstance(r, Rollout) else np.asarray(r) for r in batch])
    if not batch.sequences:
        raise ValueError("the batch has no rollouts: nothing to balance")
    return batch


def _check(ranks: int, max_tokens: int | None) -> float:
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an integer >= 1, got {ranks!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens_per_microbatch must be >= 1 or None (no limit), got {max_tokens}")
    return math.inf if max_tokens is None else max_tokens


def _pack(asg: _Assignment, max_tokens: float) -> list[list[list[int]]]:
    """Per rank: cut units over the token limit, first-fit decreasing by tokens into microbatches
    (the units of one tree together while they fit, so they share their prefix), then give every
    rank the same number of microbatches."""
    lay = asg.layout
    bins_by_rank = []
    for r in range(len(asg.on)):
        for u in sorted(asg.on[r]):
            pieces = lay.cut(*asg.units[u], max_tokens=max_tokens)
            for _, e in reversed(pieces[:-1]):  # u keeps the first piece
                asg.put(asg.split(u, e), r)
        items = []  # (unique tokens, units): a tree's units on this rank, DFS-next neighbours joined
        last_tree, last_end = -1, 0
        for u in sorted(asg.on[r], key=lambda u: asg.units[u]):
            a, b = asg.units[u]
            tree, tokens = int(lay.tree_of[a]), lay.tokens(a, b)
            shared = int(lay.lcp[last_end : a + 1].min()) if tree == last_tree else 0
            if tree == last_tree and items[-1][0] + tokens - shared <= max_tokens:
                items[-1] = (items[-1][0] + tokens - shared, items[-1][1] + [u])
            else:
                items.append((tokens, [u]))
            last_tree, last_end = tree, b
        bins: list[list[int]] = []
        room = np.zeros(0)
        for t, units in sorted(items, key=lambda item: (-item[0], asg.units[item[1][0]])):
            fit = np.flatnonzero(room >= t)
            if len(fit):
                bins[fit[0]] += units
                room[fit[0]] -= t
            else:
                bins.append(list(units))
                room = np.append(room, max_tokens - t)
        bins_by_rank.append(bins)
    k = max(1, max(len(b) for b in bins_by_rank))
    donors = sorted(range(len(bins_by_rank)), key=lambda r: -asg.loads[r])  # most loaded give first
    for r, bins in enumerate(bins_by_rank):
        while len(bins) < k and _add_microbatch(asg, r, bins_by_rank, donors):
            pass
        bins += [[] for _ in range(k - len(bins))]  # fewer rollouts here than microbatches elsewhere
    return bins_by_rank


def _add_microbatch(
    asg: _Assignment, rank: int, bins_by_rank: list[list[list[int]]], donors: list[int]
) -> bool:
    """One more microbatch on ``rank``, by the first that applies: split its fullest multi-unit
    microbatch (free); take the cheapest unit from a multi-unit microbatch of the most loaded rank
    that has one, if that costs less than the cheapest cut; cut a unit where it duplicates the
    fewest tokens. False if none applies (only empty microbatches are left to add)."""
    lay, bins = asg.layout, bins_by_rank[rank]
    tokens = [sum(lay.tokens(*asg.units[u]) for u in b) for b in bins]
    multi = [i for i, b in enumerate(bins) if len(b) > 1]
    if multi:
        i = max(multi, key=lambda i: tokens[i])
        first, second, t1, t2 = [], [], 0, 0
        for u in sorted(bins[i], key=lambda u: -lay.tokens(*asg.units[u])):
            if t1 <= t2:
                first.append(u)
                t1 += lay.tokens(*asg.units[u])
            else:
                second.append(u)
                t2 += lay.tokens(*asg.units[u])
        bins[i : i + 1] = [first, second]
        return True
    cut = None  # (duplicated cost, unit, position)
    for u in (b[0] for b in bins if b):
        a, b = asg.units[u]
        if b - a > 1:
            e = lay.cheapest_cut(a + 1, b - 1)
            if cut is None or lay.shared_cost[e] < cut[0]:
                cut = (lay.shared_cost[e], u, e)
    while donors and not any(len(b) > 1 for b in bins_by_rank[donors[0]]):
        donors.pop(0)
    if donors and donors[0] != rank:
        give = min((u for b in bins_by_rank[donors[0]] if len(b) > 1 for u in b), key=lambda u: asg.cost[u])
        if cut is None or asg.cost[give] <= cut[0]:
            next(b for b in bins_by_rank[donors[0]] if give in b).remove(give)
            asg.take(give)
            asg.put(give, rank)
            bins.append([give])
            return True
    if cut is None:
        return False
    piece = asg.split(cut[1], cut[2])
    asg.put(piece, rank)
    bins.append([piece])
    return True


def _plan(asg: _Assignment, max_tokens: float, tolerance: float = DEFAULT_TOLERANCE) -> BalancePlan:
    lay = asg.layout
    bins_by_rank = _pack(asg, max_tokens)
    k = len(bins_by_rank[0])
    coef = lay.model.coefficients
    microbatches, mb_tokens = [], []
    rank_costs = np.zeros(len(bins_by_rank))
    for r, bins in enumerate(bins_by_rank):
        for i, units in enumerate(bins):
            pos = asg.positions(units)
            feat = lay.features(pos)
            rank_costs[r] += feat @ coef
            mb_tokens.append(int(feat[0]))
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
    layout = _Layout(_as_forest(batch), cost_model or CostModel())

    def cut(limit: float) -> _Assignment:
        """Trees cut into the fewest pieces within ``limit`` and a microbatch, then longest first."""
        units = [p for a, b in layout.trees for p in layout.cut(a, b, limit, max_tokens)]
        asg = _Assignment(layout, units, ranks, max_tokens)
        asg.lpt(asg.cost)
        return asg

    def explode(limit: float) -> _Assignment:
        """Trees split into subtrees within ``limit`` and a microbatch, then placed sharing-aware."""
        units = [p for a, b in layout.trees for p in layout.explode(a, b, limit, max_tokens)]
        asg = _Assignment(layout, units, ranks, max_tokens)
        asg.lpt_shared()
        return asg

    candidates = []
    for attempt in (cut, explode):
        # The smallest limit at which an attempt stays within it (bisection; at the sum of all
        # costs it always does), and, for fewer cuts, (1 + tolerance) x that plan's mean.
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
        candidates += [best, attempt(best.loads.mean() * (1 + tolerance))]
    plans = []
    for asg in candidates:
        asg.refine(tolerance, max_rounds=20 * ranks + 1000)
        plans.append(_plan(asg, max_tokens, tolerance))
    # The shortest step (most loaded rank); the fewest duplicated tokens among ties.
    step = min(p.rank_costs.max() for p in plans)
    return min(
        (p for p in plans if p.rank_costs.max() <= step * (1 + 1e-3)), key=lambda p: p.duplicated_tokens
    )


def round_robin(
    batch, ranks: int, max_tokens_per_microbatch: int | None = None, cost_model: CostModel | None = None
) -> BalancePlan:
    """Baseline: rollout i on rank i mod ranks, trees ignored."""
    max_tokens = _check(ranks, max_tokens_per_microbatch)
    layout = _Layout(_as_forest(batch), cost_model or CostModel())
    position = np.empty(len(layout.order), dtype=np.int64)
    position[layout.order] = np.arange(len(layout.order))
    asg = _Assignment(layout, [(int(p), int(p) + 1) for p in position], ranks, max_tokens)
    for i in range(len(position)):
        asg.put(i, i % ranks)
    asg.exact(*range(ranks))
    return _plan(asg, max_tokens)


def token_count_greedy(
    batch, ranks: int, max_tokens_per_microbatch: int | None = None, cost_model: CostModel | None = None
) -> BalancePlan:
    """Baseline (AReaL-DTA's production balancer): whole trees, largest unique-token count first onto
    the rank with the fewest tokens; trees are cut only to fit a microbatch."""
    max_tokens = _check(ranks, max_tokens_per_microbatch)
    layout = _Layout(_as_forest(batch), cost_model or CostModel())
    asg = _Assignment(layout, layout.trees, ranks, max_tokens)
    asg.lpt([layout.tokens(a, b) for a, b in layout.trees])
    return _plan(asg, max_tokens)
