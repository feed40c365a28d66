"""The tree sampler against its contract: every rollout once per epoch, groups whole, every prefix
tree that fits in a step kept in one step (below a head all rollouts share), steps that mix
differently each epoch, determinism and exact resume.

Each property is recounted from the rollouts' token lists directly, sharing no code with the
sampler's splitting.
"""

import json
from collections import Counter

import numpy as np
import pytest

from megatron_dta.rollouts import make_rollout, write_rollouts
from megatron_dta.sampler import TreeSampler


def sampler_dataset(seed: int = 0, head: tuple[int, ...] = ()):
    """GRPO groups, some groups sharing a first token (one tree across groups), some sharing a
    longer system prompt (a deeper tree), a few ungrouped; every rollout starts with ``head``."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 1000, 3).tolist() for _ in range(3)]
    rollouts = []
    for g in range(30):
        start = [int(rng.integers(0, 12))] if g % 3 else systems[g % 2]
        prompt = [*head, *start, *rng.integers(0, 1000, 5).tolist()]
        for _ in range(int(rng.integers(1, 6))):
            rollouts.append(make_rollout(prompt + rng.integers(0, 1000, 4).tolist(), group=f"g{g}"))
    for _ in range(10):
        rollouts.append(make_rollout([*head, *rng.integers(0, 1000, 6).tolist()]))
    order = rng.permutation(len(rollouts))
    return [rollouts[i] for i in order]


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def trees_below_head(rollouts) -> list[set[int]]:
    """For every prefix longer than the one all rollouts share: the rollouts that have it, with
    the rest of their groups."""
    seqs = [tuple(r.input_ids.tolist()) for r in rollouts]
    head = 0
    while all(len(s) > head and s[head] == seqs[0][head] for s in seqs):
        head += 1
    by_group: dict = {}
    for i, r in enumerate(rollouts):
        if r.group is not None:
            by_group.setdefault(r.group, set()).add(i)
    having: dict[tuple, set[int]] = {}
    for i, s in enumerate(seqs):
        for k in range(head + 1, len(s) + 1):
            having.setdefault(s[:k], set()).add(i)
    return [
        members.union(*(by_group[rollouts[i].group] for i in members if rollouts[i].group is not None))
        for members in having.values()
    ]


@pytest.mark.parametrize("head", [(), (7,), (7, 8, 9)], ids=["no_head", "bos", "template"])
@pytest.mark.parametrize("per_step", [1, 7, 16, 64])
def test_sampler_keeps_groups_and_trees_and_covers_each_epoch(per_step, head):
    rollouts = sampler_dataset(head=head)
    sampler = TreeSampler(rollouts, per_step, seed=3)
    trees = [t for t in trees_below_head(rollouts) if len(t) <= per_step]
    for epoch in range(3):
        steps = sampler.steps_of_epoch(epoch)
        assert sorted(i for s in steps for i in s) == list(range(len(rollouts)))
        step_of = {i: k for k, s in enumerate(steps) for i in s}
        groups = {}
        for i, r in enumerate(rollouts):
            if r.group is not None:
                groups.setdefault(r.group, set()).add(step_of[i])
        assert all(len(s) == 1 for s in groups.values())
        for members in trees:  # a tree that fits in a step stays in one
            assert len({step_of[i] for i in members}) == 1, sorted(members)
        biggest_group = max(Counter(r.group for r in rollouts if r.group is not None).values())
        assert all(len(s) <= max(per_step, biggest_group) for s in steps)
    assert sampler.steps_of_epoch(0) != sampler.steps_of_epoch(1)  # reshuffled each epoch


@pytest.mark.parametrize("head", [(7,), (7, 8, 9)], ids=["bos", "template"])
def test_steps_mix_differently_each_epoch_under_a_common_head(head):
    """Issue 13 defect 3: with a token every rollout starts with, the whole set was one tree cut
    once into fixed chunks, and epochs only reordered the same steps."""
    rollouts = sampler_dataset(head=head)
    sampler = TreeSampler(rollouts, 16, seed=3)
    compositions = [{frozenset(s) for s in sampler.steps_of_epoch(epoch)} for epoch in range(3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert len(compositions[a] & compositions[b]) < len(compositions[a]) // 2, (a, b)


def test_sampler_is_deterministic_and_resumes_exactly(tmp_path):
    rollouts = sampler_dataset(1)
    write_rollouts(tmp_path / "data.jsonl", rollouts)
    a = TreeSampler(tmp_path / "data.jsonl", 8, seed=11)
    b = TreeSampler(rollouts, 8, seed=11)
    assert take(a, 40) == take(b, 40)  # crosses epochs
    assert take(TreeSampler(rollouts, 8, seed=12), 5) != take(TreeSampler(rollouts, 8, seed=11), 5)

    straight = take(TreeSampler(rollouts, 8, seed=5), 50)
    first = TreeSampler(rollouts, 8, seed=5)
    head = take(first, 23)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    resumed = TreeSampler(rollouts, 8, seed=5)
    resumed.load_state_dict(state)
    assert head + take(resumed, 27) == straight
    with pytest.raises(ValueError, match="rollouts_per_step"):
        TreeSampler(rollouts, 9, seed=5).load_state_dict(state)
