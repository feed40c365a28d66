"""Tree-aware sampler: which rollouts of a dataset form each training step.

Rollouts that share a ``group`` value (a prompt's GRPO samples) stay together, and so does every
prefix tree that fits in a step, so that a step keeps what the balancer and DTA can share. The
trees are found top down: a set of rollouts larger than a step is split below its longest common
prefix (a BOS or chat-template head that every rollout starts with says nothing about sharing:
every step has it) by the next token, groups joining the parts their members fall in, until each
part fits in a step or is a single group. Only a part that cannot be split so (groups spanning
all of its branches) is cut into chunks of whole groups in DFS (lexicographic) order. Each epoch
shuffles the units with a generator seeded by ``(seed, epoch)`` and fills steps of at most
``rollouts_per_step`` rollouts first-fit, looking a few units ahead for one that fits: units
smaller than a step mix differently every epoch. The last step of an epoch may be short, and a
single group larger than a step is a step of its own.

Invariant: within an epoch every rollout is in exactly one step, and the steps are a pure
function of (dataset, rollouts_per_step, seed, epoch), so ``state_dict`` needs only the epoch and
the position in it to resume exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from megatron_dta.errors import CheckpointError
from megatron_dta.rollouts import Rollout, load_rollouts

LOOKAHEAD = 16  # units skipped while looking for one that fits the current step


def _sort_key(ids: np.ndarray) -> bytes:
    """Bytes that sort like the token list (big-endian; a prefix sorts first)."""
    return ids.astype(">i8").tobytes()


def _split(part: list[list[int]], ids: Sequence[np.ndarray]) -> list[list[list[int]]]:
    """The groups of ``part`` (lists of rollout indices) joined by the token that follows the
    longest prefix all their rollouts share (a rollout that ends there is a branch of its own)."""
    members = [i for g in part for i in g]
    keys = sorted(members, key=lambda i: _sort_key(ids[i]))
    first, last = ids[keys[0]], ids[keys[-1]]  # the lexicographic extremes share the common prefix
    n = min(len(first), len(last))
    diff = np.flatnonzero(first[:n] != last[:n])
    lcp = int(diff[0]) if len(diff) else n
    parent = list(range(len(part)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[object, int] = {}
    for g, group in enumerate(part):
        for i in group:
            branch = int(ids[i][lcp]) if len(ids[i]) > lcp else ("end", i)
            parent[find(g)] = find(owner.setdefault(branch, g))
    joined: dict[int, list[list[int]]] = {}
    for g, group in enumerate(part):
        joined.setdefault(find(g), []).append(group)
    return list(joined.values())


class TreeSampler:
    """Yields each step's rollout indices (ascending) forever, reshuffling every epoch."""

    def __init__(
        self,
        rollouts: Sequence[Rollout] | str | Path,
        rollouts_per_step: int,
        seed: int = 0,
        group_key: str | None = "group",
    ):
        if isinstance(rollouts, (str, Path)):
            rollouts = load_rollouts(rollouts)
        if not rollouts:
            raise ValueError("TreeSampler needs at least one rollout")
        if rollouts_per_step < 1:
            raise ValueError(f"rollouts_per_step must be >= 1, got {rollouts_per_step}")
        self.num_rollouts = len(rollouts)
        self.rollouts_per_step = rollouts_per_step
        self.seed = seed
        self.units = self._units(rollouts, group_key)
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def _units(self, rollouts: Sequence[Rollout], group_key: str | None) -> list[list[int]]:
        """Prefix trees that fit in a step, with their groups (see the module docstring); each unit
        ascending."""
        groups: dict[object, list[int]] = {}
        for i, r in enumerate(rollouts):
            value = (
                None if group_key is None else (r.group if group_key == "group" else r.extra.get(group_key))
            )
            groups.setdefault(("rollout", i) if value is None else ("group", value), []).append(i)
        ids = [r.input_ids for r in rollouts]
        units, todo = [], [list(groups.values())]
        while todo:
            part = todo.pop()
            parts = _split(part, ids) if sum(map(len, part)) > self.rollouts_per_step else [part]
            if len(parts) > 1:
                todo += parts
            elif len(part) == 1 or sum(map(len, part)) <= self.rollouts_per_step:
                units.append(sorted(part[0] if len(part) == 1 else sum(part, [])))
            else:
                units += self._chunks(part, ids)
        units.sort()  # a canonical order before shuffling, independent of dict order
        return units

    def _chunks(self, part: list[list[int]], ids) -> list[list[int]]:
        """Whole groups in DFS (lexicographic) order, cut into chunks of at most a step."""
        part = sorted(part, key=lambda members: min(_sort_key(ids[i]) for i in members))
        chunks, chunk = [], []
        for members in part:
            if chunk and len(chunk) + len(members) > self.rollouts_per_step:
                chunks.append(sorted(chunk))
                chunk = []
            chunk += members
        return [*chunks, sorted(chunk)]

    def steps_of_epoch(self, epoch: int) -> list[list[int]]:
        """Every step of ``epoch``, in order (a pure function of the dataset, seed and epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        pending = deque(self.units[u] for u in order)
        steps = []
        while pending:
            step, skipped = [], []
            while pending and len(step) < self.rollouts_per_step and len(skipped) < LOOKAHEAD:
                unit = pending.popleft()
                if not step or len(step) + len(unit) <= self.rollouts_per_step:
                    step += unit
                else:
                    skipped.append(unit)
            pending.extendleft(reversed(skipped))  # skipped units open the next step, in order
            steps.append(sorted(step))
        self._cached = (epoch, steps)
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            steps = self.steps_of_epoch(self.epoch)
            while self.position < len(steps):
                self.position += 1  # counted before yielding: state_dict() then resumes after it
                yield steps[self.position - 1]
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rollouts_per_step": self.rollouts_per_step,
            "num_rollouts": self.num_rollouts,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rollouts_per_step", "num_rollouts"):
            if state[key] != getattr(self, key):
                raise CheckpointError(
                    f"sampler state has {key}={state[key]} but this sampler has "
                    f"{getattr(self, key)}; resume with the same dataset and settings"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
