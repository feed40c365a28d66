"""Synthetic rollout batches shaped like RL post-training workloads, for tests, benchmarks and the demo.

Every generator returns ``list[Rollout]`` in the rollout file format: ids in ``[0, vocab_size)``,
``loss_mask`` 1 exactly on model-generated tokens (never on prompt, system or observation tokens,
never on token 0), one advantage per rollout (rewards normalised within its group, as GRPO does)
and ``group`` set to the prompt/task/tree id. Token ids are uniform random, so rollouts share a
prefix only where the workload's structure makes them share one (a tiny vocabulary adds chance
sharing). Each generator draws from one ``numpy`` Generator in a fixed order: same seed, same batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from megatron_dta.errors import UserError
from megatron_dta.rollouts import Rollout, make_rollout

Segment = tuple[np.ndarray, bool]  # (token ids [n], trained: loss_mask 1 on them)


class _Draw:
    """Random token segments and group advantages from one seeded Generator."""

    def __init__(self, vocab_size: int, seed: int):
        if vocab_size < 1:
            raise UserError(f"vocab_size must be >= 1, got {vocab_size}; pass the model's vocabulary size")
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size

    def tokens(self, mean_len: int, spread: float = 0.0) -> np.ndarray:
        """Random ids [n], n uniform in ``mean_len * [1 - spread, 1 + spread]`` (at least 1)."""
        n = max(1, round(mean_len * self.rng.uniform(1 - spread, 1 + spread)))
        return self.rng.integers(0, self.vocab_size, n, dtype=np.int64)

    def advantages(self, n: int) -> np.ndarray:
        """[n] uniform rewards normalised to zero mean and unit std; a group of one learns nothing."""
        rewards = self.rng.random(n)
        if n < 2:
            return np.zeros(n)
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)

    def branch(self, paths: list[list[np.ndarray]], low: int, high: int, seg_len: int, spread: float):
        """Give every path between ``low`` and ``high`` children, each extending it by one new segment."""
        return [
            p + [self.tokens(seg_len, spread)] for p in paths for _ in range(self.rng.integers(low, high + 1))
        ]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")


def _rollout(segments: list[Segment], advantage: float, group: int) -> Rollout:
    ids = np.concatenate([tokens for tokens, _ in segments])
    mask = np.concatenate([np.full(len(tokens), trained, dtype=np.int8) for tokens, trained in segments])
    return make_rollout(ids, mask, advantage, group=group)


def _tree_group(draw: _Draw, paths: list[list[np.ndarray]], group: int) -> list[Rollout]:
    """One rollout per path: segment 0 is the prompt (mask 0), later segments are generated (mask 1)."""
    advantages = draw.advantages(len(paths))
    return [
        _rollout([(p[0], False)] + [(s, True) for s in p[1:]], float(a), group)
        for p, a in zip(paths, advantages)
    ]


def grpo_groups(
    *,
    vocab_size: int,
    seed: int = 0,
    num_prompts: int = 8,
    group_size: int = 8,
    prompt_len: int = 256,
    completion_len: int = 512,
) -> list[Rollout]:
    """GRPO: each prompt (length ``prompt_len``) with ``group_size`` sampled completions of
    0.5x..1.5x ``completion_len``; ``group`` is the prompt index."""
    _check_sizes(
        num_prompts=num_prompts, group_size=group_size, prompt_len=prompt_len, completion_len=completion_len
    )
    draw = _Draw(vocab_size, seed)
    rollouts = []
    for g in range(num_prompts):
        paths = draw.branch([[draw.tokens(prompt_len)]], group_size, group_size, completion_len, 0.5)
        rollouts += _tree_group(draw, paths, g)
    return rollouts


def fanout(
    *,
    vocab_size: int,
    seed: int = 0,
    prompt_len: int = 256,
    num_completions: int = 8,
    completion_len: int = 256,
) -> list[Rollout]:
    """One prompt with ``num_completions`` completions of exactly ``completion_len`` tokens: a
    controlled fan-out for benchmarks (sharing ratio = (P + C) * N / (P + C * N))."""
    _check_sizes(prompt_len=prompt_len, num_completions=num_completions, completion_len=completion_len)
    draw = _Draw(vocab_size, seed)
    paths = draw.branch([[draw.tokens(prompt_len)]], num_completions, num_completions, completion_len, 0.0)
    return _tree_group(draw, paths, 0)


def long_paths(
    *,
    vocab_size: int,
    seed: int = 0,
    prompt_len: int = 3072,
    num_paths: int = 4,
    path_len: int = 5120,
) -> list[Rollout]:
    """Long context: one shared prompt of ``prompt_len`` tokens, then ``num_paths`` completions of
    0.9x..1.1x ``path_len`` tokens each (rollouts are prompt + completion, ~8K tokens by default)."""
    _check_sizes(prompt_len=prompt_len, num_paths=num_paths, path_len=path_len)
    draw = _Draw(vocab_size, seed)
    paths = draw.branch([[draw.tokens(prompt_len)]], num_paths, num_paths, path_len, 0.1)
    return _tree_group(draw, paths, 0)


def _search_trees(draw: _Draw, num_roots, depth, low, high, prompt_len, segment_len) -> list[list[list]]:
    """Leaf paths of ``num_roots`` trees: a prompt, then ``depth`` levels of low..high children each."""
    trees = []
    for _ in range(num_roots):
        paths = [[draw.tokens(prompt_len)]]
        for _ in range(depth):
            paths = draw.branch(paths, low, high, segment_len, 0.5)
        trees.append(paths)
    return trees


def tree_search(
    *,
    vocab_size: int,
    seed: int = 0,
    num_roots: int = 4,
    depth: int = 4,
    branching: int = 3,
    segment_len: int = 128,
    prompt_len: int = 512,
) -> list[Rollout]:
    """Tree search (e.g. TreeRL-style step-level sampling): under each prompt every node has
    1..``branching`` children of 0.5x..1.5x ``segment_len`` generated tokens, ``depth`` levels deep;
    each leaf path is a rollout, so rollouts branch at intermediate steps. ``group`` is the tree."""
    _check_sizes(
        num_roots=num_roots, depth=depth, branching=branching, segment_len=segment_len, prompt_len=prompt_len
    )
    draw = _Draw(vocab_size, seed)
    trees = _search_trees(draw, num_roots, depth, 1, branching, prompt_len, segment_len)
    return [r for g, paths in enumerate(trees) for r in _tree_group(draw, paths, g)]


def mixed_sizes(
    *,
    vocab_size: int,
    seed: int = 0,
    num_small: int = 96,
    small_group: int = 4,
    small_len: int = 128,
    num_huge: int = 3,
    huge_depth: int = 3,
    huge_branching: int = 4,
    huge_segment_len: int = 384,
    huge_prompt_len: int = 2048,
) -> list[Rollout]:
    """Load-balancing stress: ``num_small`` small GRPO groups (prompt and completions ~``small_len``)
    and ``num_huge`` full trees (every node has ``huge_branching`` children, ``huge_depth`` levels),
    in random order. With the defaults each huge tree holds ~20% of the batch's unique tokens: more
    than one rank's even share at 8 ranks, so no tree-level assignment can balance it."""
    _check_sizes(
        num_small=num_small,
        small_group=small_group,
        small_len=small_len,
        num_huge=num_huge,
        huge_depth=huge_depth,
        huge_branching=huge_branching,
        huge_segment_len=huge_segment_len,
        huge_prompt_len=huge_prompt_len,
    )
    draw = _Draw(vocab_size, seed)
    trees = _search_trees(
        draw, num_huge, huge_depth, huge_branching, huge_branching, huge_prompt_len, huge_segment_len
    )
    trees += _search_trees(draw, num_small, 1, small_group, small_group, small_len, small_len)
    order = draw.rng.permutation(len(trees))
    return [r for g, t in enumerate(order) for r in _tree_group(draw, trees[t], g)]


def multi_turn(
    *,
    vocab_size: int,
    seed: int = 0,
    num_tasks: int = 4,
    trajectories_per_task: int = 4,
    turns: int = 6,
    system_len: int = 1024,
    task_len: int = 256,
    turn_len: int = 128,
    obs_len: int = 256,
) -> list[Rollout]:
    """Agentic multi-turn (tau^2-bench-like), trained turn by turn.

    A system prompt with tool schema (``system_len``) opens every rollout of the batch; a task prompt
    (~``task_len``) is shared within a task (``group``). A trajectory is ``turns`` assistant actions
    (~``turn_len``) separated by observations (~``obs_len``); lengths vary 0.5x..1.5x. Every
    trajectory after a task's first copies the first b turns of an earlier one (b uniform in
    [0, turns)) and samples the rest. Each turn a trajectory sampled itself yields one rollout: the
    conversation so far ending with that turn's action, with loss_mask 1 on that last action only
    (earlier actions are trained by their own rollouts), and the trajectory's advantage. Copied
    turns are not emitted again, so the batch has no duplicate rollouts. Defaults: ~65 rollouts, ~170K
    tokens, sharing ratio ~7.
    """
    _check_sizes(
        num_tasks=num_tasks,
        trajectories_per_task=trajectories_per_task,
        turns=turns,
        system_len=system_len,
        task_len=task_len,
        turn_len=turn_len,
        obs_len=obs_len,
    )
    draw = _Draw(vocab_size, seed)
    system = draw.tokens(system_len)
    rollouts = []
    for task in range(num_tasks):
        head = [(system, False), (draw.tokens(task_len, 0.5), False)]
        trajectories: list[list[np.ndarray]] = []  # [action_0, obs_0, action_1, ..., action_{turns-1}]
        first_own_turn = []
        for _ in range(trajectories_per_task):
            b = int(draw.rng.integers(turns)) if trajectories else 0
            segs = list(trajectories[draw.rng.integers(len(trajectories))][: 2 * b]) if trajectories else []
            for t in range(b, turns):
                segs.append(draw.tokens(turn_len, 0.5))
                if t < turns - 1:
                    segs.append(draw.tokens(obs_len, 0.5))
            trajectories.append(segs)
            first_own_turn.append(b)
        for segs, b, adv in zip(trajectories, first_own_turn, draw.advantages(trajectories_per_task)):
            for t in range(b, turns):
                context = [(s, False) for s in segs[: 2 * t]]
                rollouts.append(_rollout(head + context + [(segs[2 * t], True)], float(adv), task))
    return rollouts


def demo(*, vocab_size: int, seed: int = 0) -> list[Rollout]:
    """The README demo: a small multi-turn batch, ~32 rollouts of a few hundred tokens, ~8K tokens in
    all, sharing ratio ~6-8."""
    return multi_turn(
        vocab_size=vocab_size,
        seed=seed,
        num_tasks=2,
        trajectories_per_task=4,
        turns=6,
        system_len=96,
        task_len=32,
        turn_len=16,
        obs_len=20,
    )


WORKLOADS: dict[str, Callable[..., list[Rollout]]] = {
    "grpo": grpo_groups,
    "multi_turn": multi_turn,
    "tree_search": tree_search,
    "mixed": mixed_sizes,
    "long_paths": long_paths,
    "fanout": fanout,
    "demo": demo,
}


def parse_workload_args(pairs: list[str]) -> dict[str, int]:
    """``["num_tasks=8", ...]`` (a tool's repeated ``--workload-arg KEY=INT``) as generator keywords."""
    out = {}
    for kv in pairs:
        key, _, value = kv.partition("=")
        if not key or not value.lstrip("-").isdigit():
            raise UserError(f"--workload-arg {kv!r}: expected KEY=INTEGER")
        out[key] = int(value)
    return out


def make_workload(name: str, vocab_size: int, seed: int = 0, **overrides) -> list[Rollout]:
    """Build the named workload; ``overrides`` replace the generator's keyword defaults."""
    if name not in WORKLOADS:
        raise UserError(f"unknown workload {name!r}; valid names: {', '.join(sorted(WORKLOADS))}")
    return WORKLOADS[name](vocab_size=vocab_size, seed=seed, **overrides)
