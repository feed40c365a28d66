"""Local search on an ``Assignment``: lower the most loaded rank, one move at a time.

A move is a record (``Shift``, ``Swap``, ``Cut``) with ``apply`` and ``undo``. Candidates are
ranked by loads estimated from unit costs; each is applied, both ranks' loads are recomputed
exactly, and it is kept only if both end below the old maximum, else undone. A move records the
ranges it changes as they were when it was proposed, so it undoes to exactly that state (the
search tries candidates one after another from the same state).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_dta.balancer.assignment import Assignment


@dataclass(frozen=True)
class Shift:
    """Move the boundary between unit ``u`` and its DFS neighbour ``v`` (another rank's) to ``e``:
    ``right``: u = [a, b) keeps [a, e) and v = [b, b2) grows to [e, b2); else u = [a, b) keeps
    [e, b) and v = [a0, a) grows to [a0, e). No new cut."""

    u: int
    v: int
    e: int
    right: bool
    old_u: tuple[int, int]
    old_v: tuple[int, int]

    def apply(self, asg: Assignment) -> int:
        """The move's other rank (v's)."""
        if self.right:
            asg.set(self.u, (self.old_u[0], self.e))
            asg.set(self.v, (self.e, self.old_v[1]))
        else:
            asg.set(self.v, (self.old_v[0], self.e))
            asg.set(self.u, (self.e, self.old_u[1]))
        return asg.owner[self.v]

    def undo(self, asg: Assignment) -> None:
        asg.set(self.u, self.old_u)
        asg.set(self.v, self.old_v)


@dataclass(frozen=True)
class Swap:
    """Unit ``u`` from rank ``r`` to rank ``s``, and unit ``v`` (if any) from s to r."""

    r: int
    s: int
    u: int
    v: int | None

    def apply(self, asg: Assignment) -> int:
        asg.move(self.u, self.s)
        if self.v is not None:
            asg.move(self.v, self.r)
        return self.s

    def undo(self, asg: Assignment) -> None:
        asg.move(self.u, self.r)
        if self.v is not None:
            asg.move(self.v, self.s)


@dataclass(frozen=True)
class Cut:
    """Cut unit ``u`` = ``whole`` of rank ``r`` at ``e`` into itself and a new unit ``piece``; the
    prefix (``moves_prefix``) or the suffix goes to rank ``s``, and unit ``v`` (if any) from s to r."""

    r: int
    s: int
    u: int
    e: int
    moves_prefix: bool
    v: int | None
    whole: tuple[int, int]
    piece: int  # the index the suffix gets: the next new unit's

    def apply(self, asg: Assignment) -> int:
        piece = asg.split(self.u, self.e)  # u keeps the prefix on r; piece is the suffix, on no rank
        assert piece == self.piece
        if self.moves_prefix:
            asg.take(self.u)
            asg.put(piece, self.r)
        asg.put(self.u if self.moves_prefix else piece, self.s)
        if self.v is not None:
            asg.move(self.v, self.r)
        return self.s

    def undo(self, asg: Assignment) -> None:
        if self.v is not None:
            asg.move(self.v, self.s)
        asg.drop_newest(self.piece)
        asg.move(self.u, self.r)
        asg.set(self.u, self.whole)


def refine(asg: Assignment, tolerance: float, max_rounds: int, tries: int = 32, receivers: int = 4) -> None:
    """Improve the most loaded rank r: move the boundary between one of its units and a DFS
    neighbour on another rank; else, with each of the ``receivers`` least loaded ranks s in turn,
    move or swap units, or (above the cap) hand s a cut piece, maybe for a unit back. Candidates
    are ranked by estimated loads; the first of ``tries`` whose exact loads both end below r's old
    load is kept. Stops within ``(1 + tolerance / 2)`` x the mean or when nothing helps."""
    for _ in range(max_rounds):
        r = int(np.argmax(asg.loads))
        mean, top = asg.loads.mean(), asg.loads[r]
        if top <= mean * (1 + tolerance / 2) or len(asg.on) == 1:
            return
        if _first_that_helps(asg, r, top, shift_moves(asg, r)[:tries]):
            continue
        lightest = np.argpartition(asg.loads, min(receivers, len(asg.on) - 1))[:receivers]
        for s in sorted((s for s in lightest.tolist() if s != r), key=lambda s: asg.loads[s]):
            # Both lists are proposed before either is tried: from the same state.
            steps = [move_or_swap_moves(asg, r, s)]
            if top > mean * (1 + tolerance):
                steps.append(cut_moves(asg, r, s, mean * (1 + tolerance)))
            if any(_first_that_helps(asg, r, top, step[:tries]) for step in steps):
                break
        else:
            return


def _first_that_helps(asg: Assignment, r: int, top: float, moves: list) -> bool:
    """Keep the first of ``moves`` after which r and the other rank both cost less than ``top``."""
    for move in moves:
        other = move.apply(asg)
        asg.exact(r, other)
        if max(asg.loads[r], asg.loads[other]) < top * (1 - 1e-9):
            asg.merge(r)
            asg.merge(other)
            asg.exact(r, other)
            return True
        move.undo(asg)
        asg.exact(r, other)
    return False


def _by_estimate(found: list[tuple]) -> list:
    """The moves of ``(estimated max load, move)`` pairs, lowest estimate first (stable)."""
    return [move for _, move in sorted(found, key=lambda c: c[0])]


def shift_moves(asg: Assignment, r: int) -> list[Shift]:
    """Moves of the boundary between a unit of r and its DFS neighbour on another rank, best
    estimated first (each to where the larger of the two loads is least)."""
    lay, found = asg.layout, []
    for u in asg.on[r]:
        a, b = asg.units[u]
        if b - a < 2:
            continue
        e = np.arange(a + 1, b)
        for v, right in ((asg.at_start.get(b), True), (asg.at_end.get(a), False)):
            if v is None or asg.owner[v] == r:
                continue
            s, (a_v, b_v) = asg.owner[v], asg.units[v]
            if right:
                keep, grow, grow_tokens = lay.costs(a, e), lay.costs(e, b_v), lay.token_counts(e, b_v)
            else:
                keep, grow, grow_tokens = lay.costs(e, b), lay.costs(a_v, e), lay.token_counts(a_v, e)
            worst = np.maximum(asg.loads[r] - asg.cost[u] + keep, asg.loads[s] - asg.cost[v] + grow)
            worst[grow_tokens > asg.max_tokens] = np.inf
            i = int(np.argmin(worst))
            if worst[i] < asg.loads[r]:
                found.append((worst[i], Shift(u, v, int(e[i]), right, asg.units[u], asg.units[v])))
    return _by_estimate(found)


def move_or_swap_moves(asg: Assignment, r: int, s: int) -> list[Swap]:
    """Moves r -> s and swaps between r and s, best estimated first."""
    gap, lr, ls = asg.loads[r] - asg.loads[s], asg.loads[r], asg.loads[s]
    ur, us = list(asg.on[r]), list(asg.on[s])
    cr = np.array([asg.cost[u] for u in ur])
    cs = np.array([asg.cost[u] for u in us])
    found = []
    if len(ur):
        new = np.maximum(lr - cr, ls + cr)
        found += [(new[i], Swap(r, s, ur[i], None)) for i in np.argsort(new)[:4] if new[i] < lr]
    if len(ur) and len(us):
        order = np.argsort(cs)
        cs, us = cs[order], [us[o] for o in order]
        j = np.searchsorted(cs, cr - gap / 2)  # swap partners near cost(u) - gap / 2
        for jj in (np.clip(j - 1, 0, len(us) - 1), np.clip(j, 0, len(us) - 1)):
            d = cr - cs[jj]
            new = np.maximum(lr - d, ls + d)
            new[d <= 0] = np.inf
            found += [(new[i], Swap(r, s, ur[i], us[jj[i]])) for i in np.argsort(new)[:4] if new[i] < lr]
    return _by_estimate(found)


def _cut_rows(asg: Assignment, r: int, s: int) -> list[tuple[np.ndarray, ...]]:
    """Every cut of every unit of r, moving its prefix or its suffix to s, as arrays (one row per
    cut position): unit, position e, moves the prefix?, new load of r, new load of s, tokens
    duplicated. What s already computes of a piece, the prefix it shares with s's DFS neighbours,
    is not added to s's load."""
    lay, lr, ls = asg.layout, asg.loads[r], asg.loads[s]
    held = asg.positions(asg.on[s])
    rows = []
    for u in asg.on[r]:
        a, b = asg.units[u]
        if b - a < 2:
            continue
        e = np.arange(a + 1, b)
        pre, suf = lay.costs(a, e), lay.costs(e, b)  # of [a, e) and of [e, b)
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
                    lr - asg.cost[u] + keep,
                    ls + gain,
                    lay.lcp[e],
                )
            )
    return rows


def cut_moves(asg: Assignment, r: int, s: int, cap: float) -> list[Cut]:
    """Pieces (prefix or suffix) of r's units for s, maybe with one of s's smallest units back,
    preferring (1) both ranks <= cap, (2) s filled to between half its room and cap, (3) any
    lower maximum; fewest duplicated tokens, then lowest maximum, within a preference."""
    lr, ls = asg.loads[r], asg.loads[s]
    rows = _cut_rows(asg, r, s)
    if not rows:
        return []
    unit, e, moves_prefix, new_r, new_s, dup = (np.concatenate(c) for c in zip(*rows))
    back = [None, *sorted(asg.on[s], key=lambda v: asg.cost[v])[:16]]
    back_cost = np.array([0.0] + [asg.cost[v] for v in back[1:]])
    new_r = (new_r[:, None] + back_cost).ravel()  # [cuts x len(back)]
    new_s = (new_s[:, None] - back_cost).ravel()
    worst = np.maximum(new_r, new_s)
    dup = np.repeat(dup, len(back))
    room = cap - ls
    fills = (new_s <= cap) & (new_s - ls >= room / 2) & (new_r < lr)
    mode = np.select([worst <= cap, fills, worst < lr], [0, 1, 2], 3)
    best = [int(k) for k in np.lexsort((worst, dup, mode)) if mode[k] < 3][:64]
    moves = []
    for i, j in (divmod(k, len(back)) for k in best):
        u = int(unit[i])
        moves.append(Cut(r, s, u, int(e[i]), bool(moves_prefix[i]), back[j], asg.units[u], len(asg.units)))
    return moves
