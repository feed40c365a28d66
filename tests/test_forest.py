"""PrefixForest against brute force over the set of distinct prefixes, and the synthetic workloads.

The reference never builds a trie: a batch's unique tokens are its distinct non-empty prefixes, a
node is a maximal run of them ending where a sequence ends or the batch branches, and token k sees
token q iff k's prefix is a prefix of q's.
"""

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dta.forest import PrefixForest
from megatron_dta.rollouts import parse_rollout
from megatron_dta.synthetic import WORKLOADS, make_workload

PROPERTY = settings(max_examples=200, deadline=None)


@st.composite
def batches(draw) -> list[list[int]]:
    """Sequences over a tiny alphabet (lots of sharing, single-token nodes, several roots), plus exact
    duplicates, prefixes and extensions of earlier ones, in random order."""
    alphabet = draw(st.integers(1, 4))
    seq = st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=10)
    out = draw(st.lists(seq, min_size=1, max_size=8))
    for kind, pick, tail in draw(
        st.lists(st.tuples(st.sampled_from("dpe"), st.integers(0, 999), seq), max_size=6)
    ):
        s = out[pick % len(out)]
        out.append({"d": list(s), "p": s[: 1 + pick % len(s)], "e": s + tail}[kind])
    return draw(st.permutations(out))


def distinct_prefixes(seqs) -> set[tuple]:
    return {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}


def node_end_prefixes(seqs) -> set[tuple]:
    """Prefixes where a node ends: a sequence ends there, or it has other than one extension."""
    prefixes = distinct_prefixes(seqs)
    extensions = Counter(p[:-1] for p in prefixes)
    ends = {tuple(s) for s in seqs}
    return {p for p in prefixes if p in ends or extensions[p] != 1}


def node_prefix(forest: PrefixForest, n: int) -> tuple:
    """The tokens from the root to the end of node n, read from any sequence through it."""
    node = forest.nodes[n]
    return tuple(forest.sequences[node.sequences[0]][: node.end].tolist())


def ancestors_or_self(forest: PrefixForest, v: int) -> set[int]:
    out = set()
    while v >= 0:
        out.add(v)
        v = forest.nodes[v].parent
    return out


def check_forest(seqs: list[list[int]]) -> PrefixForest:
    forest = PrefixForest([np.array(s) for s in seqs])
    nodes = forest.nodes
    for i, s in enumerate(seqs):
        assert forest.reconstruct(i).tolist() == s
        path = forest.paths[i]
        assert nodes[path[0]].parent == -1 and nodes[path[-1]].end == len(s)
        assert all(nodes[b].parent == a for a, b in itertools.pairwise(path))
    for n, node in enumerate(nodes):
        assert node.id == n and node.length >= 1
        assert node.sequences == [i for i, p in enumerate(forest.paths) if n in p]
        assert node.ends == [i for i, p in enumerate(forest.paths) if p[-1] == n]
        for i in node.sequences:  # every sequence through a node holds the node's tokens at its offset
            assert seqs[i][node.offset : node.end] == node.tokens.tolist()
        parent = nodes[node.parent] if node.parent >= 0 else None
        assert node.offset == (parent.end if parent else 0)
        assert node.depth == (parent.depth + 1 if parent else 1)
        # Compression: a node that neither branches nor ends a sequence would be merged into its child.
        assert len(node.children) >= 2 or node.ends, f"node {n} should have been merged"
        assert all(nodes[c].parent == n for c in node.children)
        first_tokens = [int(nodes[c].tokens[0]) for c in node.children]
        assert len(set(first_tokens)) == len(first_tokens)

    # Counts against brute force over distinct prefixes.
    ends = node_end_prefixes(seqs)
    assert {node_prefix(forest, n) for n in range(len(nodes))} == ends
    assert forest.unique_tokens == len(distinct_prefixes(seqs))
    assert forest.total_tokens == sum(map(len, seqs))
    assert len(nodes) == len(ends)
    assert len(forest.roots) == len({s[0] for s in seqs}) == forest.stats()["trees"]
    assert forest.max_depth == max(sum(q[: len(p)] == p for p in ends) for q in ends)

    # DFS pre-order: an explicit traversal visits ids 0, 1, 2, ...; dfs_out bounds each subtree.
    visit, todo = [], list(reversed(forest.roots))
    while todo:
        n = todo.pop()
        visit.append(n)
        todo.extend(reversed(nodes[n].children))
    assert visit == list(range(len(nodes)))
    for v in range(len(nodes)):
        above = ancestors_or_self(forest, v)
        assert all(forest.is_ancestor_or_self(u, v) == (u in above) for u in range(len(nodes)))
    return forest


def check_packed(forest: PrefixForest, seqs: list[list[int]]) -> None:
    packed = forest.packed()
    prefixes = []  # the distinct prefix each packed token stands for
    for k, n in enumerate(packed.node_of_token):
        pos = int(packed.position_ids[k])
        through = {tuple(seqs[i][: pos + 1]) for i in forest.nodes[n].sequences}
        assert len(through) == 1, "sequences sharing a token must share its whole prefix"
        prefixes.append(through.pop())
        assert packed.input_ids[k] == prefixes[-1][-1]
    assert sorted(prefixes) == sorted(distinct_prefixes(seqs))  # one packed token per distinct prefix
    assert np.array_equal(
        packed.node_start, [np.flatnonzero(packed.node_of_token == n)[0] for n in range(len(forest.nodes))]
    )
    expected = np.array([[len(pk) <= len(pq) and pq[: len(pk)] == pk for pk in prefixes] for pq in prefixes])
    assert np.array_equal(packed.dense_mask(), expected)  # [q, k]


@PROPERTY
@given(batches())
def test_forest_matches_brute_force(seqs):
    check_packed(check_forest(seqs), seqs)


@PROPERTY
@given(batches(), st.integers(1, 30))
def test_split_by_budget_fills_groups_up_to_the_budget_in_unique_tokens(seqs, budget):
    """Sparse microbatches: rollouts in sorted order, each group's forest (its distinct prefixes)
    within the budget unless it is one rollout, and greedy: the next group's first rollout did not fit."""
    from megatron_dta.engine.plan import split_by_budget

    groups = split_by_budget([np.asarray(s) for s in seqs], budget)
    assert [i for g in groups for i in g] == sorted(range(len(seqs)), key=lambda i: seqs[i])
    for g, nxt in itertools.zip_longest(groups, groups[1:]):
        assert len(g) == 1 or len(distinct_prefixes([seqs[i] for i in g])) <= budget
        if nxt is not None:
            assert len(distinct_prefixes([seqs[i] for i in g + nxt[:1]])) > budget


@pytest.mark.parametrize(
    "seqs",
    [
        [[7]],
        [[1, 2, 3], [1, 2, 3], [1, 2, 3]],  # exact duplicates end at one node
        [[1, 2, 3, 4], [1, 2], [1, 2, 3]],  # prefixes of another sequence
        [[3, 1], [1, 1], [2, 1], [0]],  # diverging at the first token: four roots
        [[0, 1], [0, 2], [0, 3], [0, 1, 0], [0, 1, 1]],  # single-token nodes
    ],
    ids=["single_token", "duplicates", "prefixes", "several_roots", "single_token_nodes"],
)
def test_forest_edge_cases(seqs):
    check_packed(check_forest(seqs), seqs)


def test_known_shape():
    forest = PrefixForest([np.array(s) for s in ([5, 6, 7, 8], [5, 6, 9], [5, 6], [4])])
    table = [(n.parent, n.offset, n.tokens.tolist(), n.sequences, n.ends) for n in forest.nodes]
    assert table == [
        (-1, 0, [4], [3], [3]),
        (-1, 0, [5, 6], [0, 1, 2], [2]),
        (1, 2, [7, 8], [0], [0]),
        (1, 2, [9], [1], [1]),
    ]
    assert forest.dfs_out.tolist() == [1, 4, 3, 4]


def test_deep_chain_has_no_recursion_limit():
    """3000 rollouts, each the previous plus one token: a chain of 3000 single-token nodes."""
    n = 3000
    base = np.random.default_rng(0).integers(0, 5, n)
    forest = PrefixForest([base[: i + 1] for i in reversed(range(n))])  # sorting must reorder them
    assert forest.stats() == {
        "sequences": n,
        "total_tokens": n * (n + 1) // 2,
        "unique_tokens": n,
        "sharing_ratio": (n + 1) / 2,
        "nodes": n,
        "max_depth": n,
        "trees": 1,
        "max_path_tokens": n,
    }
    assert all(node.parent == node.id - 1 and node.ends == [n - 1 - node.id] for node in forest.nodes)
    assert forest.paths[0] == list(range(n))
    assert np.array_equal(forest.reconstruct(0), base)
    assert forest.dfs_out.tolist() == [n] * n
    packed = forest.packed()
    assert np.array_equal(packed.position_ids, np.arange(n)) and np.array_equal(packed.input_ids, base)


def test_empty_forest_packs_to_empty_arrays():
    forest = PrefixForest([])
    assert forest.nodes == [] and forest.roots == [] and forest.dfs_out.tolist() == []
    packed = forest.packed()
    for name in ("input_ids", "position_ids", "node_of_token", "node_start", "dfs_out"):
        array = getattr(packed, name)
        assert array.dtype == np.int64 and array.shape == (0,), name
    assert packed.dense_mask().shape == (0, 0)


def test_empty_sequence_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        PrefixForest([np.array([1]), np.array([], dtype=np.int64)])


# ---- synthetic workloads ----------------------------------------------------------------------------
def forest_of(rollouts) -> PrefixForest:
    return PrefixForest([r.input_ids for r in rollouts])


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_is_deterministic_per_seed(name):
    def snapshot(seed):
        return [
            (r.input_ids.tolist(), r.loss_mask.tolist(), r.advantages.tolist(), r.group)
            for r in make_workload(name, 1000, seed=seed)
        ]

    assert snapshot(1) == snapshot(1)
    assert snapshot(1) != snapshot(2)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_is_valid_rollout_format(name):
    vocab = 1000
    rollouts = make_workload(name, vocab, seed=0)
    for r in rollouts:
        back = parse_rollout(r.to_json(), vocab)
        assert np.array_equal(back.input_ids, r.input_ids) and np.array_equal(back.loss_mask, r.loss_mask)
        assert np.array_equal(back.advantages, r.advantages) and back.group == r.group is not None
        assert np.all(r.advantages == r.advantages[0]), "one advantage per rollout"
        # Generated tokens come last in every workload: the mask is a non-empty run of 1s at the end.
        first = int(np.argmax(r.loss_mask))
        assert first > 0 and np.array_equal(r.loss_mask, np.arange(len(r)) >= first)


def test_unknown_workload_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: demo, fanout, grpo, long_paths, mixed, multi_turn"):
        make_workload("grpo2", 1000)


def test_overrides_and_bad_sizes():
    assert len(make_workload("fanout", 100, num_completions=3)) == 3
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        make_workload("grpo", 100, group_size=0)


@pytest.mark.parametrize("seed", range(5))
def test_demo_size_and_sharing(seed):
    stats = forest_of(make_workload("demo", 32000, seed=seed)).stats()
    assert 24 <= stats["sequences"] <= 44
    assert 6_000 <= stats["total_tokens"] <= 11_000
    assert 6.0 <= stats["sharing_ratio"] <= 8.0  # the documented range
    assert stats["max_path_tokens"] < 500


def test_multi_turn_structure():
    rollouts = make_workload("multi_turn", 32000, seed=0)
    forest = forest_of(rollouts)
    assert forest.stats()["trees"] == 1 and forest.nodes[0].length >= 1024  # one system prompt for all
    assert 5 <= forest.sharing_ratio <= 10  # the defaults' documented ratio
    assert len({r.input_ids.tobytes() for r in rollouts}) == len(rollouts), "no duplicate rollouts"


def test_mixed_has_a_tree_bigger_than_a_ranks_share():
    forest = forest_of(make_workload("mixed", 32000, seed=0))
    lengths = np.array([n.length for n in forest.nodes])
    tree_tokens = [lengths[r : forest.dfs_out[r]].sum() for r in forest.roots]
    assert max(tree_tokens) > forest.unique_tokens / 8 and len(tree_tokens) > 50


def test_long_paths_and_fanout_shapes():
    rollouts = make_workload("long_paths", 32000, seed=0)
    assert all(np.array_equal(r.input_ids[:3072], rollouts[0].input_ids[:3072]) for r in rollouts)
    assert all(r.loss_mask[:3072].sum() == 0 and 0.9 * 5120 <= len(r) - 3072 <= 1.1 * 5120 for r in rollouts)
    p, c, n = 256, 100, 5
    fan = forest_of(make_workload("fanout", 32000, completion_len=c, num_completions=n))
    assert fan.sharing_ratio == pytest.approx((p + c) * n / (p + c * n))


def test_grpo_groups_share_their_prompt():
    rollouts = make_workload("grpo", 32000, seed=0, num_prompts=3, group_size=4, prompt_len=50)
    assert [r.group for r in rollouts] == [0] * 4 + [1] * 4 + [2] * 4
    forest = forest_of(rollouts)
    assert len(forest.roots) == 3 and all(forest.nodes[r].length == 50 for r in forest.roots)
