"""Balancer plans against recounts from scratch, the NNLS fit against known coefficients, and
tools/balance.py end to end.

Every recount builds a PrefixForest of a microbatch's rollouts directly, sharing no code with the
balancer's DFS-order arithmetic.
"""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dta.balancer import (
    FEATURES,
    Assignment,
    CostModel,
    Layout,
    balance,
    nnls,
    round_robin,
    token_count_greedy,
)
from megatron_dta.balancer.refine import cut_moves, move_or_swap_moves, shift_moves
from megatron_dta.forest import PrefixForest
from megatron_dta.rollouts import write_rollouts
from megatron_dta.synthetic import make_workload

ROOT = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=120, deadline=None)
PLANNERS = {"balance": balance, "round_robin": round_robin, "token_count_greedy": token_count_greedy}


@st.composite
def batches(draw) -> list[list[int]]:
    """A few trees: each a random prompt, then rollouts that extend a random earlier rollout of the
    tree (or the prompt) at a random point, over a small alphabet; duplicates and prefixes included."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        tree = [draw(st.lists(st.integers(0, 5), min_size=1, max_size=6))]
        for _ in range(draw(st.integers(0, 8))):
            base = tree[draw(st.integers(0, len(tree) - 1))]
            cut = draw(st.integers(1, len(base)))
            tree.append(base[:cut] + draw(st.lists(st.integers(0, 5), max_size=8)))
        out += tree
    return draw(st.permutations(out))


def forest_of(seqs) -> PrefixForest:
    return PrefixForest([np.array(s) for s in seqs])


def check_plan(plan, seqs, ranks, max_tokens, model):
    """The partition invariants, recounted from the plan alone."""
    k = plan.num_microbatches
    assert k >= 1 and len(plan.microbatches) == ranks * k
    assert [(mb.rank, mb.index) for mb in plan.microbatches] == [
        (r, i) for r in range(ranks) for i in range(k)
    ]
    assert Counter(i for mb in plan.microbatches for i in mb.sequences) == Counter(range(len(seqs)))
    tokens = [forest_of([seqs[i] for i in mb.sequences]).unique_tokens for mb in plan.microbatches]
    assert plan.microbatch_tokens == tokens
    assert plan.duplicated_tokens == sum(tokens) - forest_of(seqs).unique_tokens
    if max_tokens is not None and max(map(len, seqs)) <= max_tokens:
        assert max(tokens) <= max_tokens
    # With no per-node term every feature the planner adds up is exact, so rank costs are too.
    if model.per_node == 0:
        costs = [
            sum(
                model.predict(forest_of([seqs[i] for i in mb.sequences]))
                for mb in plan.microbatches[r * k : (r + 1) * k]
            )
            for r in range(ranks)
        ]
        np.testing.assert_allclose(plan.rank_costs, costs, rtol=1e-9)  # float sums in another order
    assert plan.imbalance >= plan.lower_bound - 1e-9
    assert 0 <= plan.duplication_lower_bound


@PROPERTY
@given(
    seqs=batches(),
    ranks=st.integers(1, 9),
    max_tokens=st.one_of(st.none(), st.integers(4, 40)),
    planner=st.sampled_from(sorted(PLANNERS)),
    exact_model=st.booleans(),
)
def test_plan_invariants(seqs, ranks, max_tokens, planner, exact_model):
    model = CostModel(per_node=0.0) if exact_model else CostModel()
    plan = PLANNERS[planner](forest_of(seqs), ranks, max_tokens, model)
    check_plan(plan, seqs, ranks, max_tokens, model)


@PROPERTY
@given(seqs=batches(), data=st.data())
def test_layout_features_match_the_forest_of_any_subset(seqs, data):
    """Tokens, attention pairs and rollouts of any set of rollouts are exact; nodes are the whole
    batch's nodes on their paths (at least as many as their own trie has)."""
    forest = forest_of(seqs)
    layout = Layout(forest, CostModel())
    positions = np.array(sorted(data.draw(st.sets(st.integers(0, len(seqs) - 1), min_size=1))))
    members = layout.order[positions]
    got = layout.features(positions)
    want = CostModel.features(forest_of([seqs[i] for i in members]))
    assert got[[0, 1, 3, 4]].tolist() == want[[0, 1, 3, 4]].tolist()
    assert got[2] == len({n for i in members for n in forest.paths[i]}) >= want[2]


def fewest_pieces(layout, a, b, max_cost, max_tokens) -> int:
    """Brute force over contiguous splits: a piece fits the limits or is a single rollout."""
    best = [0] + [10**9] * (b - a)
    for e in range(a + 1, b + 1):
        for c in range(a, e):
            if e - c == 1 or (layout.cost(c, e) <= max_cost and layout.tokens(c, e) <= max_tokens):
                best[e - a] = min(best[e - a], best[c - a] + 1)
    return best[-1]


@PROPERTY
@given(seqs=batches(), data=st.data())
def test_cut_is_fewest_pieces_within_limits(seqs, data):
    layout = Layout(forest_of(seqs), CostModel())
    a, b = layout.trees[data.draw(st.integers(0, len(layout.trees) - 1))]
    max_tokens = data.draw(st.integers(1, 40))
    max_cost = layout.cost(a, b) * data.draw(st.floats(0.05, 1.5))
    pieces = layout.cut(a, b, max_cost, max_tokens)
    assert [p[0] for p in pieces] == [a] + [p[1] for p in pieces[:-1]] and pieces[-1][1] == b
    for c, e in pieces:
        assert e - c == 1 or (
            layout.cost(c, e) <= max_cost * (1 + 1e-12) and layout.tokens(c, e) <= max_tokens
        )
    assert len(pieces) == fewest_pieces(layout, a, b, max_cost, max_tokens)


def assignment_state(asg) -> tuple:
    return (
        list(asg.units),
        list(asg.owner),
        [sorted(on) for on in asg.on],
        dict(asg.at_start),
        dict(asg.at_end),
        asg.loads.tolist(),
    )


@settings(max_examples=40, deadline=None)  # each example tries every proposed move
@given(seqs=batches(), ranks=st.integers(2, 5), max_tokens=st.one_of(st.just(math.inf), st.integers(4, 40)))
def test_every_refinement_move_keeps_a_partition_and_undoes_exactly(seqs, ranks, max_tokens):
    """Each Shift, Swap and Cut the search proposes from an LPT placement changes the assignment,
    leaves every rollout on exactly one rank, and its undo restores the state it was proposed in."""
    layout = Layout(forest_of(seqs), CostModel())
    limit = float(layout.cum_cost[-1]) / ranks
    asg = Assignment(layout, [p for a, b in layout.trees for p in layout.cut(a, b, limit)], ranks, max_tokens)
    asg.lpt(asg.cost)
    r = int(np.argmax(asg.loads))
    moves = shift_moves(asg, r)
    for s in range(ranks):
        if s != r:
            moves += move_or_swap_moves(asg, r, s) + cut_moves(asg, r, s, asg.loads.mean())
    before = assignment_state(asg)
    for move in moves:
        other = move.apply(asg)
        assert other != r and assignment_state(asg) != before
        held = sorted(p for on in asg.on for u in on for p in range(*asg.units[u]))
        assert held == list(range(len(seqs)))
        move.undo(asg)
        asg.exact(*range(ranks))
        assert assignment_state(asg) == before


def test_nnls_recovers_known_coefficients():
    """Noise-free times from real microbatch features give back the coefficients, zeros included."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(40):
        rollouts = make_workload(
            "tree_search",
            1000,
            seed,
            num_roots=1,
            depth=int(rng.integers(1, 4)),
            segment_len=int(rng.integers(16, 400)),
            prompt_len=int(rng.integers(8, 2000)),
        )
        rows.append(CostModel.features(PrefixForest([r.input_ids for r in rollouts])))
    features = np.array(rows)
    truth = CostModel(per_token=3e-5, attention=4e-9, per_node=0.0, per_leaf=2e-4, constant=7e-3)
    model, error = CostModel.fit(features, truth.predict(features))
    assert error < 1e-9
    np.testing.assert_allclose(model.coefficients, truth.coefficients, rtol=1e-6, atol=1e-12)
    noisy = truth.predict(features) * rng.uniform(0.95, 1.05, len(features))
    model, error = CostModel.fit(features, noisy)
    assert 0.005 < error < 0.05 and model.fit_error == error  # about the 2.9% rms noise put in


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_nnls_satisfies_kkt(seed):
    """x >= 0, the gradient vanishes on positive coefficients and points outwards on zero ones."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rng.integers(3, 12), rng.integers(1, 6)))
    b = rng.normal(size=len(a))
    x = nnls(a, b)
    grad = a.T @ (b - a @ x)
    scale = np.abs(a).sum() * (np.abs(b).sum() + 1)
    assert np.all(x >= 0)
    assert np.all(np.abs(grad[x > 0]) <= 1e-9 * scale)
    assert np.all(grad[x == 0] <= 1e-9 * scale)


def test_cost_model_file_round_trip_and_errors(tmp_path):
    model = CostModel(
        per_token=1e-5, attention=3e-9, per_node=0.0, per_leaf=1e-4, constant=2e-3, fit_error=0.03
    )
    model.save(tmp_path / "cost.json")
    assert CostModel.load(tmp_path / "cost.json") == model
    (tmp_path / "bad.json").write_text(json.dumps({"per_token": 1e-5, "per_tokens": 1}))
    with pytest.raises(ValueError, match="keys among"):
        CostModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="attention must be a finite number >= 0"):
        CostModel(attention=-1.0)
    assert len(FEATURES) == len(model.coefficients)


@pytest.mark.parametrize(
    "name, ranks, overrides",
    [
        ("grpo", 1024, {"num_prompts": 2048}),  # 16K rollouts over 1024 ranks
        ("mixed", 64, {"num_small": 1536}),  # 3 trees, each larger than two ranks' share
        ("mixed", 8, {}),
        ("tree_search", 64, {"num_roots": 128}),
        ("multi_turn", 8, {"num_tasks": 16}),  # one tree: the system prompt opens every rollout
    ],
)
def test_targets_on_synthetic_workloads(name, ranks, overrides):
    """The issue's targets where the batch allows them: imbalance <= 1.05, duplicated tokens <= 5%
    beyond what cutting the trees that must be cut costs, and better than both baselines' step."""
    forest = PrefixForest([r.input_ids for r in make_workload(name, 32000, 0, **overrides)])
    plan = balance(forest, ranks, 16384)
    assert plan.imbalance <= 1.05
    assert plan.duplicated_tokens - plan.duplication_lower_bound <= 0.05 * plan.unique_tokens
    for baseline in (round_robin, token_count_greedy):
        assert plan.rank_costs.max() <= baseline(forest, ranks, 16384).rank_costs.max() * (1 + 1e-9)


def test_every_rank_computes_the_same_plan():
    """Each DP rank plans for itself (train.py), so the plan must depend on the batch alone: not on
    the hash seed, nor on the CPU's BLAS kernels (OpenBLAS's Haswell and this machine's native
    kernels price this batch one ulp apart through ``@``), nor on the process."""
    rollouts = make_workload("multi_turn", 32000, 0, num_tasks=12)
    plans = [balance(rollouts, 6, 4096).to_json(), balance(list(rollouts), 6, 4096).to_json()]
    code = (
        "import json, sys; from megatron_dta.balancer import balance; "
        "from megatron_dta.synthetic import make_workload; "
        "print(json.dumps(balance(make_workload('multi_turn', 32000, 0, num_tasks=12), 6, 4096).to_json()))"
    )
    for blas in ({}, {"OPENBLAS_CORETYPE": "Haswell"}, {"OPENBLAS_CORETYPE": "Prescott"}):
        out = subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONHASHSEED": str(len(plans)), "PATH": "", **blas},
            timeout=120,
        )
        plans.append(json.loads(out.stdout))
    assert all(plan == plans[0] for plan in plans[1:])


def test_too_few_rollouts_give_empty_microbatches_only_where_unavoidable():
    seqs = [[1, 2, 3], [1, 2, 4], [5, 6]]
    plan = balance(forest_of(seqs), 5)
    check_plan(plan, seqs, 5, None, CostModel())
    assert sum(not mb.sequences for mb in plan.microbatches) == 2


def run_tool(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "balance.py"), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_balance_tool_writes_the_plan(tmp_path):
    rollouts = make_workload("mixed", 32000, 0, num_small=40)
    write_rollouts(tmp_path / "batch.jsonl", rollouts)
    out = tmp_path / "plan.json"
    result = run_tool(
        "--rollouts",
        tmp_path / "batch.jsonl",
        "--ranks",
        4,
        "--max-tokens-per-microbatch",
        8192,
        "--json",
        out,
    )
    assert result.returncode == 0, result.stderr
    assert "round_robin" in result.stdout and "token_count_greedy" in result.stdout
    plan = json.loads(out.read_text())
    assert set(plan) >= {"microbatches", "imbalance", "duplicated_tokens", "baselines"}
    assert set(plan["baselines"]) == {"round_robin", "token_count_greedy"}
    assert all(isinstance(v, float) and v >= 1.0 for v in plan["baselines"].values())
    mbs = plan["microbatches"]
    assert all(set(mb) == {"rank", "index", "sequences"} for mb in mbs)
    assert sorted(i for mb in mbs for i in mb["sequences"]) == list(range(len(rollouts)))
    assert all(mb["sequences"] == sorted(mb["sequences"]) for mb in mbs)
    per_rank = Counter(mb["rank"] for mb in mbs)
    assert sorted(per_rank) == [0, 1, 2, 3] and len(set(per_rank.values())) == 1
    seqs = [r.input_ids.tolist() for r in rollouts]
    recount = sum(
        forest_of([seqs[i] for i in mb["sequences"]]).unique_tokens for mb in mbs if mb["sequences"]
    )
    assert plan["duplicated_tokens"] == recount - forest_of(seqs).unique_tokens
    assert plan["imbalance"] >= 1.0


def test_balance_tool_rejects_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2], "loss_mask": [0, 1], "advantages": 1.0}\n{"input_ids": [1]}\n')
    result = run_tool("--rollouts", bad, "--ranks", 2, "--json", tmp_path / "out.json")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"{bad}:2: field 'loss_mask': missing required field"]
    assert not (tmp_path / "out.json").exists()
