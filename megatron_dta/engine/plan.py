"""Execution plans: the units of work of the three modes, built from prefix forests.

A ``Unit`` is one model call: a flat row of tokens made of one or more *segments* (spans of forest
nodes), a number ``prefix_len`` of ancestor positions whose K/V it reads from the DFS stack, and
the attention structure among its own tokens. Each segment may have child units, which run
(DFS) after the unit's forward and before its backward. The same record describes
- dense: one unit per rollout, no prefix, causal;
- sparse: one unit per packed microbatch, all its forest's nodes as segments, tree mask;
- dta: units of sibling segments (chunks of at most ``block_size`` tokens), children below.
A unit also lists the log-probabilities it produces (``pair_*``: hidden row, target token) and the
loss elements (``elem_*``: which pair, which (rollout, position) in the flat per-token tables).
Every (rollout, position >= 1) of the batch is exactly one element of exactly one unit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_dta.attention import AttnSpec
from megatron_dta.forest import PrefixForest, common_prefix_length

MODES = ("dense", "sparse", "dta")


@dataclass
class Unit:
    input_ids: torch.Tensor  # [T]
    position_ids: torch.Tensor  # [T]
    prefix_len: int
    spec: AttnSpec
    seg_bounds: list[tuple[int, int]]  # (start in unit, length) per segment
    children: list[list[Unit]]  # child units per segment
    pair_hidden: torch.Tensor  # [pairs] row of the unit whose hidden state predicts the target
    pair_target: torch.Tensor  # [pairs]
    elem_pair: torch.Tensor  # [elems] index into pairs
    elem_flat: torch.Tensor  # [elems] index into the flat per-token tables (seq_offset + position)
    seg_pos: list[int] = field(default_factory=list)  # position id of each segment's first token
    seg_chain: list[list[int]] = field(default_factory=list)  # in-unit ancestors of each segment, itself last
    # every (rollout, position) of the unit's tokens once, position 0 and the last included (MoE
    # routing counts): the row, the rollout's index in the batch, the flat index seq_offset + position
    tok_row: torch.Tensor | None = None
    tok_seq: torch.Tensor | None = None
    tok_flat: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def has_children(self) -> bool:
        return any(self.children)


@dataclass
class Plan:
    mode: str
    roots: list[Unit]
    max_path: int  # positions the DFS K/V stack must hold
    computed_tokens: int  # tokens run through the model (unique tokens for dta)
    units: int = 0
    extra: dict = field(default_factory=dict)

    def events(self, forward_only: bool = False) -> list[tuple[Unit, bool]]:
        """(unit, is_backward) in the executor's order: F u, its children's events (DFS), B u;
        forward-only runs have no B events."""
        events, todo = [], [(u, False) for u in reversed(self.roots)]
        while todo:
            unit, backward = todo.pop()
            events.append((unit, backward))
            if backward:
                continue
            if not forward_only:
                todo.append((unit, True))
            for kids in reversed(unit.children):
                todo.extend((k, False) for k in reversed(kids))
        return events


class _UnitBuilder:
    """Turns segments (node, start within node, length) of a forest into Units."""

    def __init__(self, forest: PrefixForest, seq_offsets: np.ndarray, seq_map: np.ndarray):
        self.f, self.seq_offsets, self.seq_map = forest, seq_offsets, seq_map

    def build(self, segments, prefix_len: int, seg_in=None, seg_out=None) -> Unit:
        f = self.f
        ids, pos, bounds, seg_pos = [], [], [], []
        pair_h, pair_t, elem_p, elem_f = [], [], [], []
        tok_r, tok_s, tok_f = [], [], []
        n_pairs = start = 0

        def add_pairs(hidden_rows, targets, positions, seqs):
            nonlocal n_pairs
            k = len(targets)
            if k == 0 or len(seqs) == 0:
                return
            pair_h.append(hidden_rows)
            pair_t.append(targets)
            p = np.arange(n_pairs, n_pairs + k)
            offs = self.seq_offsets[self.seq_map[np.asarray(seqs)]]
            elem_p.append(np.tile(p, len(seqs)))
            elem_f.append((offs[:, None] + positions[None, :]).ravel())
            n_pairs += k

        for nid, c, length in segments:
            node = f.nodes[nid]
            toks = node.tokens[c : c + length]
            ids.append(toks)
            pos.append(np.arange(node.offset + c, node.offset + c + length))
            bounds.append((start, length))
            seg_pos.append(node.offset + c)
            seqs = self.seq_map[np.asarray(node.sequences)]
            tok_r.append(np.tile(start + np.arange(length), len(seqs)))
            tok_s.append(np.repeat(seqs, length))
            tok_f.append((self.seq_offsets[seqs][:, None] + pos[-1][None, :]).ravel())
            inner = np.arange(length - 1)
            add_pairs(start + inner, toks[1:], node.offset + c + 1 + inner, node.sequences)
            last = start + length - 1
            if c + length < node.length:
                add_pairs(
                    np.array([last]),
                    node.tokens[c + length : c + length + 1],
                    np.array([node.offset + c + length]),
                    node.sequences,
                )
            else:
                for ch in node.children:
                    child = f.nodes[ch]
                    add_pairs(np.array([last]), child.tokens[:1], np.array([node.end]), child.sequences)
            start += length

        cat = lambda xs: (
            torch.from_numpy(np.concatenate(xs).astype(np.int64)) if xs else torch.zeros(0, dtype=torch.long)
        )
        input_ids = cat(ids)
        spec = AttnSpec(
            prefix_len,
            len(input_ids),
            None if seg_in is None else torch.as_tensor(seg_in, dtype=torch.long),
            None if seg_out is None else torch.as_tensor(seg_out, dtype=torch.long),
        )
        return Unit(
            input_ids,
            cat(pos),
            prefix_len,
            spec,
            bounds,
            [[] for _ in bounds],
            cat(pair_h),
            cat(pair_t),
            cat(elem_p),
            cat(elem_f),
            seg_pos,
            [[i] for i in range(len(bounds))],
            cat(tok_r),
            cat(tok_s),
            cat(tok_f),
        )


def seq_offsets_of(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def plan_dense(sequences: list[np.ndarray], seq_offsets: np.ndarray) -> Plan:
    roots = []
    for i, s in enumerate(sequences):
        f = PrefixForest([s])
        roots.append(_UnitBuilder(f, seq_offsets, np.array([i])).build([(0, 0, len(s))], 0))
    return Plan("dense", roots, 0, sum(len(s) for s in sequences), len(roots))


def split_by_budget(sequences: list[np.ndarray], budget: int | None) -> list[list[int]]:
    """Rollout groups in sorted (DFS) order whose forests hold at most ``budget`` unique tokens.

    In sorted order a rollout adds ``len - lcp(previous)`` unique tokens to its group; a group that
    starts mid-tree repeats the shared prefix (as peers' packed microbatches do).
    """
    order = sorted(range(len(sequences)), key=lambda i: sequences[i].tolist())
    groups, cur, used, prev = [], [], 0, None
    for i in order:
        s = sequences[i]
        new = len(s) - (common_prefix_length(prev, s) if prev is not None else 0)
        if cur and budget is not None and used + new > budget:
            groups.append(cur)
            cur, used, new = [], 0, len(s)
        cur.append(i)
        used += new
        prev = s
    if cur:
        groups.append(cur)
    return groups


def plan_sparse(sequences, seq_offsets, max_tokens: int | None = None) -> Plan:
    roots, computed = [], 0
    for group in split_by_budget(sequences, max_tokens):
        f = PrefixForest([sequences[i] for i in group])
        segs = [(n.id, 0, n.length) for n in f.nodes]
        seg_in = np.repeat(np.arange(len(f.nodes)), [n.length for n in f.nodes])
        unit = _UnitBuilder(f, seq_offsets, np.asarray(group)).build(segs, 0, seg_in, f.dfs_out[seg_in])
        roots.append(unit)
        computed += f.unique_tokens
    return Plan("sparse", roots, 0, computed, len(roots), {"microbatches": len(roots)})


def plan_dta(sequences, seq_offsets, block_size: int = 2048, pack_tokens: int | None = None) -> Plan:
    """DFS units over the forest.

    Long nodes become chains of chunks of at most ``block_size`` tokens (segments). A unit packs
    sibling segments and then, breadth first, all children of a segment at a time while it holds
    at most ``pack_tokens`` (default ``block_size``) tokens; inside a unit the segments attend through a
    tree mask, and children left outside become child units under their segment. Packing turns
    chains of short nodes and fans of short siblings into few model calls; the bound keeps a unit's
    activations (and so memory) independent of the tree's size.
    """
    pack_tokens = pack_tokens or block_size
    f = PrefixForest(sequences)
    builder = _UnitBuilder(f, seq_offsets, np.arange(len(sequences)))

    def first_chunk(nid):
        return (nid, 0, min(block_size, f.nodes[nid].length))

    def seg_children(seg):
        nid, c, length = seg
        node = f.nodes[nid]
        if c + length < node.length:
            return [(nid, c + length, min(block_size, node.length - c - length))]
        return [first_chunk(ch) for ch in node.children]

    def sibling_groups(segments):
        groups, cur, used = [], [], 0
        for seg in segments:
            if cur and used + seg[2] > pack_tokens:
                groups.append(cur)
                cur, used = [], 0
            cur.append(seg)
            used += seg[2]
        return groups + [cur] if cur else groups

    def make_unit(group, prefix_len):
        """(unit, its segments in unit order, children left outside per segment)."""
        used = sum(seg[2] for seg in group)
        inside, outside = {}, {}
        queue = deque(group)
        while queue:
            seg = queue.popleft()
            kids = seg_children(seg)
            # all of a segment's children or none: a unit that keeps some children inside while
            # the rest run as child units would hold its activations during all of them
            size = sum(ch[2] for ch in kids)
            if kids and used + size <= pack_tokens:
                used += size
                inside[seg], outside[seg] = kids, []
                queue.extend(kids)
            else:
                inside[seg], outside[seg] = [], kids
        order, parent = [], []
        stack = [(seg, -1) for seg in reversed(group)]
        while stack:  # unit segments in DFS pre-order, so the tree mask is an interval test
            seg, par = stack.pop()
            parent.append(par)
            order.append(seg)
            stack.extend((ch, len(order) - 1) for ch in reversed(inside[seg]))
        seg_out = np.arange(1, len(order) + 1)
        for i in range(len(order) - 1, -1, -1):
            if parent[i] >= 0:
                seg_out[parent[i]] = max(seg_out[parent[i]], seg_out[i])
        chains: list[list[int]] = []  # parents precede children in pre-order
        for i, par in enumerate(parent):
            chains.append((chains[par] if par >= 0 else []) + [i])
        lengths = [seg[2] for seg in order]
        tok_seg = np.repeat(np.arange(len(order)), lengths)
        multi = len(order) > 1
        unit = builder.build(
            order, prefix_len, tok_seg if multi else None, seg_out[tok_seg] if multi else None
        )
        unit.seg_chain = chains
        return unit, order, [outside[seg] for seg in order]

    n_units = 0
    roots: list[Unit] = []
    todo = [(roots, [first_chunk(r) for r in f.roots], 0)]
    while todo:
        sink, segments, prefix_len = todo.pop()
        for group in sibling_groups(segments):
            unit, order, outside = make_unit(group, prefix_len)
            n_units += 1
            sink.append(unit)
            for k, ((nid, c, length), rest) in enumerate(zip(order, outside)):
                if rest:
                    todo.append((unit.children[k], rest, f.nodes[nid].offset + c + length))
    return Plan(
        "dta",
        roots,
        f.max_path_tokens,
        f.unique_tokens,
        n_units,
        {"nodes": len(f.nodes), "sharing_ratio": f.sharing_ratio},
    )


def build_plan(
    mode: str,
    sequences,
    seq_offsets,
    block_size: int = 2048,
    max_tokens_per_microbatch=None,
    pack_tokens: int | None = None,
) -> Plan:
    if mode == "dense":
        return plan_dense(sequences, seq_offsets)
    if mode == "sparse":
        return plan_sparse(sequences, seq_offsets, max_tokens_per_microbatch)
    if mode == "dta":
        return plan_dta(sequences, seq_offsets, block_size, pack_tokens)
    raise ValueError(f"engine mode '{mode}' is unknown; choose one of {MODES}")
