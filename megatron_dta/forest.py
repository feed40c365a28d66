"""Prefix forest: the compressed trie (radix forest) of a batch of token sequences.

Each node is a maximal span of tokens shared by every sequence through it; each sequence is the
path of nodes from a root to its terminal node. Construction sorts the sequences and joins
neighbours by their longest common prefix (like a suffix tree from a suffix array), so its cost is
the sort plus one vectorized comparison per neighbour pair: linear in total tokens. Everything is
iterative (no recursion) so chains of thousands of nodes are fine. Pure numpy: no torch here.

Invariant kept by every method: nodes are numbered in DFS pre-order, so node ``u`` is an
ancestor-or-self of ``v`` iff ``dfs_in[u] <= v < dfs_out[u]`` (``dfs_in[u] == u``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Node:
    id: int
    parent: int  # -1 for a root
    offset: int  # position id of the node's first token
    tokens: np.ndarray  # int64 [length]
    children: list[int] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)  # every sequence whose path runs through here
    ends: list[int] = field(default_factory=list)  # sequences whose last token is this node's last
    depth: int = 1  # nodes on the path from the root to here, this one included

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def end(self) -> int:
        return self.offset + len(self.tokens)


class _Build:
    __slots__ = ("children", "end", "parent", "src", "start", "terminals")

    def __init__(self, src: int, start: int, end: int, parent: _Build | None):
        self.src, self.start, self.end, self.parent = src, start, end, parent
        self.children: list[_Build] = []
        self.terminals: list[int] = []


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two sequences share."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class PrefixForest:
    """Compressed trie of ``sequences`` (each a 1-D int array of length >= 1)."""

    def __init__(self, sequences: Sequence[np.ndarray]):
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("PrefixForest: every sequence needs at least one token")
        self.sequences = seqs
        self.nodes: list[Node] = []
        self.paths: list[list[int]] = []
        self._build(seqs)

    def _build(self, seqs: list[np.ndarray]) -> None:
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].tolist())
        roots: list[_Build] = []
        stack: list[_Build] = []  # path of the previous sequence, root first
        prev = None
        for i in order:
            s = seqs[i]
            lcp = common_prefix_length(prev, s) if prev is not None else 0
            while stack and stack[-1].start >= lcp:
                stack.pop()
            if stack and stack[-1].end > lcp:
                # Split the node at lcp: a new upper part takes its place, the old node keeps the tail
                # so that sequences already ending at it still end at it.
                low = stack[-1]
                up = _Build(low.src, low.start, lcp, low.parent)
                siblings = low.parent.children if low.parent is not None else roots
                siblings[siblings.index(low)] = up
                up.children.append(low)
                low.parent, low.start = up, lcp
                stack[-1] = up
            if len(s) > lcp:
                parent = stack[-1] if stack else None
                node = _Build(i, lcp, len(s), parent)
                (parent.children if parent is not None else roots).append(node)
                stack.append(node)
            stack[-1].terminals.append(i)
            prev = s
        self._number(roots)

    def _number(self, roots: list[_Build]) -> None:
        """Assign DFS pre-order ids, fill Node records and the per-sequence paths."""
        terminal_of = [0] * len(self.sequences)
        todo = [(r, -1) for r in reversed(roots)]
        while todo:
            b, parent = todo.pop()
            nid = len(self.nodes)
            node = Node(nid, parent, b.start, self.sequences[b.src][b.start : b.end])
            if parent >= 0:
                self.nodes[parent].children.append(nid)
                node.depth = self.nodes[parent].depth + 1
            node.ends = sorted(b.terminals)
            for t in node.ends:
                terminal_of[t] = nid
            self.nodes.append(node)
            todo.extend((c, nid) for c in reversed(b.children))
        for seq, term in enumerate(terminal_of):
            path = []
            while term >= 0:
                path.append(term)
                term = self.nodes[term].parent
            path.reverse()
            self.paths.append(path)
            for nid in path:
                self.nodes[nid].sequences.append(seq)
        self.dfs_out = np.arange(1, len(self.nodes) + 1, dtype=np.int64)
        for node in reversed(self.nodes):  # children have larger ids: one reverse sweep fills subtree ends
            if node.parent >= 0:
                self.dfs_out[node.parent] = max(self.dfs_out[node.parent], self.dfs_out[node.id])

    # ---- derived quantities ------------------------------------------------------------------
    @property
    def roots(self) -> list[int]:
        return [n.id for n in self.nodes if n.parent < 0]

    @property
    def total_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def unique_tokens(self) -> int:
        return sum(n.length for n in self.nodes)

    @property
    def sharing_ratio(self) -> float:
        return self.total_tokens / max(self.unique_tokens, 1)

    @property
    def max_depth(self) -> int:
        return max((n.depth for n in self.nodes), default=0)

    @property
    def max_path_tokens(self) -> int:
        return max((len(s) for s in self.sequences), default=0)

    def dfs_order(self) -> list[int]:
        """Node ids in DFS pre-order (ids are assigned in that order)."""
        return list(range(len(self.nodes)))

    def is_ancestor_or_self(self, u: int, v: int) -> bool:
        return u <= v < self.dfs_out[u]

    def reconstruct(self, seq: int) -> np.ndarray:
        return np.concatenate([self.nodes[n].tokens for n in self.paths[seq]])

    def stats(self) -> dict:
        return {
            "sequences": len(self.sequences),
            "total_tokens": self.total_tokens,
            "unique_tokens": self.unique_tokens,
            "sharing_ratio": self.sharing_ratio,
            "nodes": len(self.nodes),
            "max_depth": self.max_depth,
            "trees": len(self.roots),
            "max_path_tokens": self.max_path_tokens,
        }

    def packed(self) -> PackedForest:
        """All unique tokens in DFS order with position ids and the ancestor relation (sparse mode)."""
        lengths = np.array([n.length for n in self.nodes], dtype=np.int64)
        offsets = np.array([n.offset for n in self.nodes], dtype=np.int64)
        node_start = np.cumsum(lengths) - lengths
        node_of_token = np.repeat(np.arange(len(self.nodes), dtype=np.int64), lengths)
        # a token's position is its node's offset plus its index inside the node
        index_in_node = np.arange(len(node_of_token), dtype=np.int64) - node_start[node_of_token]
        no_tokens = [np.zeros(0, dtype=np.int64)]  # an empty forest packs to empty arrays
        return PackedForest(
            input_ids=np.concatenate([n.tokens for n in self.nodes] or no_tokens),
            position_ids=offsets[node_of_token] + index_in_node,
            node_of_token=node_of_token,
            node_start=node_start,
            dfs_out=self.dfs_out.copy(),
        )


@dataclass
class PackedForest:
    """Unique tokens of a forest laid out in DFS order.

    Token ``k`` is visible to token ``q`` iff ``node_of_token[k]`` is an ancestor-or-self of
    ``node_of_token[q]`` and ``k <= q``: an O(tokens) description of the tree mask.
    """

    input_ids: np.ndarray  # [N]
    position_ids: np.ndarray  # [N]
    node_of_token: np.ndarray  # [N]
    node_start: np.ndarray  # [nodes] index of each node's first token
    dfs_out: np.ndarray  # [nodes]

    def dense_mask(self) -> np.ndarray:
        """[N, N] boolean ancestor mask (only for small CPU inputs and tests)."""
        nq = self.node_of_token[:, None]
        nk = self.node_of_token[None, :]
        idx = np.arange(len(self.input_ids))
        return (nk <= nq) & (nq < self.dfs_out[nk]) & (idx[None, :] <= idx[:, None])
