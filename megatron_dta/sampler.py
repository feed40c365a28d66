"""Tree-aware sampler: which rollouts of a dataset form each training step.

Rollouts that share a ``group`` value (a prompt's GRPO samples) or a first token (the root of one
prefix tree) form one unit, so that a step keeps what the balancer and DTA can share. A unit
larger than a step is cut into chunks of whole groups in DFS (lexicographic) order, so each chunk
still shares as much as it can. Each epoch shuffles the units with a generator seeded by
``(seed, epoch)`` and fills steps of at most ``rollouts_per_step`` rollouts first-fit, looking a
few units ahead for one that fits; the last step of an epoch may be short, and a single group
larger than a step is a step of its own.

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
        """Groups joined by shared first token, chunked to a step; each unit ascending."""
        groups: dict[object, list[int]] = {}
        for i, r in enumerate(rollouts):
            value = (
                None if group_key is None else (r.group if group_key == "group" else r.extra.get(group_key))
            )
            groups.setdefault(("rollout", i) if value is None else ("group", value), []).append(i)
        parent = list(range(len(groups)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        group_list = list(groups.values())
        owner_of_root: dict[int, int] = {}
        for g, members in enumerate(group_list):
            for i in members:
                first = int(rollouts[i].input_ids[0])
                other = owner_of_root.setdefault(first, g)
                parent[find(g)] = find(other)
        components: dict[int, list[list[int]]] = {}
        for g, members in enumerate(group_list):
            components.setdefault(find(g), []).append(members)
        units = []
        for comp in components.values():
            comp.sort(key=lambda members: min(_sort_key(rollouts[i].input_ids) for i in members))
            chunk: list[int] = []
            for members in comp:
                if chunk and len(chunk) + len(members) > self.rollouts_per_step:
                    units.append(sorted(chunk))
                    chunk = []
                chunk += members
            units.append(sorted(chunk))
        units.sort()  # a canonical order before shuffling, independent of dict order
        return units

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
