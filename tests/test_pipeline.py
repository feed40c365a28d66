"""The DFS pipeline schedule (torchrun, gloo) equals the single-process step in float64:
logprobs, loss and every gradient, through tools/dump_step.py --pp. Covers chunked nodes,
several microbatches, recompute, tied embeddings split over stages, TP=2 x PP=2, CP=2 x PP=2 and the forest
shapes of the synthetic workloads; every run has a timeout that fails loudly on a deadlock."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import make_hf_model

from megatron_dta.devtools.parity import SAME_OPS_FLOAT64, compare
from megatron_dta.pipeline import dfs_schedule, event_tokens
from megatron_dta.rollouts import make_rollout, write_rollouts
from megatron_dta.synthetic import WORKLOADS, multi_turn, tree_search

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
VOCAB = 96
TIMEOUT_S = 240  # a deadlocked pipeline hangs in recv: fail loudly instead of hanging the suite


def forest(rng, trees=2):
    """Trees with a shared prompt, branching turns and leaves of mixed lengths."""
    out = []
    for _ in range(trees):
        prompt = rng.integers(0, VOCAB, 11).tolist()
        for _ in range(2):
            turn = prompt + rng.integers(0, VOCAB, 6).tolist()
            out += [
                make_rollout(turn + rng.integers(0, VOCAB, 2 + 3 * j).tolist(), advantages=rng.normal())
                for j in range(2)
            ]
    out.append(make_rollout(rng.integers(0, VOCAB, 9).tolist(), advantages=1.0))  # a lone chain
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    for kind in ("qwen3", "qwen2"):  # qwen2: tied embeddings split over the first and last stage
        make_hf_model(kind, seed=3, vocab=VOCAB, layers=4).save_pretrained(tmp / kind)
    write_rollouts(tmp / "rollouts.jsonl", forest(np.random.default_rng(1)))
    # the generator's deep search trees and multi-turn forests (shared system prompt, branch points)
    shapes = tree_search(
        vocab_size=VOCAB, seed=2, num_roots=2, depth=3, branching=3, segment_len=4, prompt_len=6
    ) + multi_turn(
        vocab_size=VOCAB,
        seed=2,
        num_tasks=2,
        trajectories_per_task=3,
        turns=3,
        system_len=8,
        task_len=4,
        turn_len=3,
        obs_len=4,
    )
    write_rollouts(tmp / "shapes.jsonl", shapes)
    return tmp


def run(cmd: list[str]) -> None:
    """Run ``cmd`` from the repository root; fail loudly on an error or on a deadlock's timeout."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {TIMEOUT_S}s (pipeline deadlock?)\n{exc.stdout}\n{exc.stderr}"
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dump(tmp, kind, name, *extra, nproc=1, rollouts="rollouts.jsonl"):
    out = tmp / f"{kind}_{name}.pt"
    if out.exists():  # the same reference serves several tests
        return torch.load(out, weights_only=False)
    cmd = [sys.executable] if nproc == 1 else [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [
        str(ROOT / "tools/dump_step.py"),
        "--hf-checkpoint",
        str(tmp / kind),
        "--rollouts",
        str(tmp / rollouts),
        "--dtype",
        "float64",
        "--mode",
        "dta",
        "--out",
        str(out),
        *extra,
    ]
    run(cmd)
    return torch.load(out, weights_only=False)


def assert_equal(got, want):
    """Same order of float64 operations per unit; only the reduction order of summed grads
    differs (tied embedding: two stages' sums): SAME_OPS_FLOAT64."""
    assert compare(got, want, SAME_OPS_FLOAT64) == []


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_pp2_equals_pp1_with_chunked_nodes_and_microbatches(setup, kind):
    ref = dump(setup, kind, "pp1", "--block-size", "4")
    pp2 = dump(setup, kind, "pp2", "--block-size", "4", "--pp", "2", "--microbatches", "3", nproc=2)
    assert_equal(pp2, ref)
    assert all(g.abs().sum() > 0 for g in pp2["grads"].values())  # every stage's grads arrived
    if kind == "qwen2":  # TP=2 x PP=2 on 4 processes, tied embedding's two halves on two stages
        assert_equal(dump(setup, kind, "tp2pp2", "--block-size", "4", "--pp", "2", "--tp", "2", nproc=4), ref)


@pytest.mark.slow
def test_pp2_with_recompute_on_generator_forests(setup):
    """Budget 0: every parent unit is recomputed from its saved input hidden on each stage; all
    three microbatches in flight at once, their events interleaved on both stages."""
    ref = dump(setup, "qwen3", "shapes_pp1", "--block-size", "5", rollouts="shapes.jsonl")
    pp2 = dump(
        setup,
        "qwen3",
        "shapes_pp2",
        "--block-size",
        "5",
        "--pp",
        "2",
        "--microbatches",
        "3",
        "--microbatches-in-flight",
        "3",
        "--activation-budget",
        "0",
        nproc=2,
        rollouts="shapes.jsonl",
    )
    assert_equal(pp2, ref)


@pytest.mark.slow
def test_cp2_x_pp2_equals_one_process(setup):
    """CP=2 x PP=2 on 4 processes: each CP rank sends its rows of every unit to the same CP rank of
    the next stage. Units of one token (a CP rank without rows of a unit sends nothing), every parent
    recomputed from its saved rows (budget 0), three microbatches interleaved, the tied embedding's
    halves on two stages."""
    ref = dump(setup, "qwen2", "block1_pp1", "--block-size", "1")
    extra = ["--block-size", "1", "--activation-budget", "0", "--microbatches", "3"]
    assert_equal(dump(setup, "qwen2", "cp2pp2", *extra, "--cp", "2", "--pp", "2", nproc=4), ref)


SCHEDULE_API = """
import sys, torch
from megatron_dta.engine import EngineConfig
from megatron_dta.losses import PolicyLoss
from megatron_dta.model.hf import gather_hf, load_hf_checkpoint
from megatron_dta.parallel import ParallelLayout
from megatron_dta.pipeline import forward_backward_pipelining_dfs
from megatron_dta.rollouts import load_rollouts
ckpt, rollouts_path, out = sys.argv[1:4]
layout = ParallelLayout.create(pp=2)
assert (layout.prev_rank, layout.next_rank) == [(None, 1), (0, None)][layout.rank]  # the layout's neighbours
model, _ = load_hf_checkpoint(ckpt, layout, torch.float64)
rollouts = load_rollouts(rollouts_path)
halves = [rollouts[:4], rollouts[4:]]
loss = PolicyLoss()
den = loss.local_denominator(rollouts)
step = lambda it, _m: (next(it), loss, den)
cfg = EngineConfig(block_size=4)
res = forward_backward_pipelining_dfs(forward_step_func=step, data_iterator=iter(halves), model=model,
                                      num_microbatches=2, layout=layout, engine_config=cfg, forward_only=True)
assert all(p.grad is None for p in model.parameters())
logprobs = [lp for r in res for lp in r.logprobs]
for half in halves:  # gradient accumulation over two calls, as a train loop with two global batches
    forward_backward_pipelining_dfs(forward_step_func=step, data_iterator=iter([half]), model=[model],
                                    num_microbatches=1, layout=layout, engine_config=cfg)
grads = gather_hf(model, "grad", layout.tp_group, layout.pp_group)
if model.is_last:
    torch.save({"logprobs": logprobs, "grads": grads}, out)
"""


@pytest.mark.slow
def test_schedule_api_forward_only_and_accumulation_equal_pp1(setup):
    """Called directly: the logprob pass leaves no grads and gives the single-process logprobs;
    two calls accumulate the grads of one (the tied embedding summed once per call)."""
    ref = dump(setup, "qwen2", "pp1", "--block-size", "4")
    (setup / "schedule_api.py").write_text(SCHEDULE_API)
    api = setup / "schedule_api.pt"
    run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(setup / "schedule_api.py"),
            str(setup / "qwen2"),
            str(setup / "rollouts.jsonl"),
            str(api),
        ]
    )
    # the logprob pass has no loss: the dump's logprobs and the accumulated grads are compared
    assert_equal(torch.load(api, weights_only=False), {"logprobs": ref["logprobs"], "grads": ref["grads"]})


def test_layers_must_split_evenly_over_stages(single_process_world):
    from megatron_dta.model.config import ModelConfig
    from megatron_dta.model.transformer import Transformer

    with pytest.raises(ValueError, match="parallel.pp=3 must divide model.num_layers"):
        Transformer(ModelConfig(num_layers=4), dataclasses.replace(single_process_world, pp=3))


def test_schedule_equals_1f1b_on_single_unit_microbatches():
    """Microbatches of one unit each are 1F1B's setting: the list schedule reaches its bubble
    (p-1)/(m+p-1) exactly (forward t, backward 2t), with at most p microbatches in flight."""
    for p in (2, 4):
        for m in (1, 2, 4, 8):
            sched = dfs_schedule([[(False, 5), (True, 5)]] * m, p, p)
            assert sched.bubble == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), (p, m)
            assert max(sched.peak_in_flight) == min(p, m)
    # a root of 4 tokens with two leaves of 3: kept tokens peak at root + one leaf
    events = [(False, 4), (False, 3), (True, 3), (False, 3), (True, 3), (True, 4)]
    assert dfs_schedule([events], 2, 2).peak_kept_tokens == [7, 7]


def issued_on_links(schedule, events, p, monkeypatch):
    """Each stage runs its order against real ``_Link`` objects whose point-to-point calls are
    recorded instead of sent: {(stage, peer): [(kind, key), ...]} in issue order."""
    from megatron_dta import pipeline

    calls, current = {}, {}

    class Done:
        def wait(self):
            pass

        def is_completed(self):
            return True

    def record(kind):
        def op(tensor, peer):  # a receive is for the message whose buffer was just shaped
            key = current["shaped"] if kind == "recv" else current["key"]
            calls.setdefault((current["stage"], peer), []).append((kind, key))
            return Done()

        return op

    def shape_of(key):
        current["shaped"] = key
        return (1,)

    monkeypatch.setattr(pipeline.dist, "irecv", record("recv"))
    monkeypatch.setattr(pipeline.dist, "isend", record("send"))
    backward = [[b for b, _ in ev] for ev in events]
    for s in range(p):
        links = {
            peer: pipeline._Link(
                peer,
                [(key, sender != s) for key, sender in pipeline.link_order(schedule, backward, min(s, peer))],
                shape_of,
                torch.float32,
                "cpu",
            )
            for peer in (s - 1, s + 1)
            if 0 <= peer < p
        }
        current["stage"] = s
        tensor = torch.zeros(1)
        for j, i in schedule.orders[s]:
            current["key"] = (j, i)
            src, dst = (s + 1, s - 1) if events[j][i][0] else (s - 1, s + 1)
            if src in links:
                links[src].recv((j, i))
            if dst in links:
                links[dst].send((j, i), tensor)
    return calls


def test_link_ends_issue_the_same_sequence(monkeypatch):
    """On every link both ends issue their operations in one order (what NCCL needs of a pair that
    shares a communicator): the k-th call on one end is the k-th call's counterpart on the other,
    for the same message. A recorded receive is posted when issued, which may precede its event."""
    rng = np.random.default_rng(0)
    events = []
    for _ in range(5):  # random DFS shapes: a root, then children that are leaves or small subtrees
        ev = [(False, int(rng.integers(4, 40)))]
        for _ in range(int(rng.integers(1, 4))):
            kids = int(rng.integers(0, 3))
            ev.append((False, int(rng.integers(2, 20))))
            for _ in range(kids):
                t = int(rng.integers(1, 10))
                ev += [(False, t), (True, t)]
            ev.append((True, ev[-1 - 2 * kids][1]))
        ev.append((True, ev[0][1]))
        events.append(ev)
    for p in (2, 3, 4):
        for k in (1, 2, 2 * p):
            sched = dfs_schedule(events, p, k)
            calls = issued_on_links(sched, events, p, monkeypatch)
            for s in range(p - 1):
                down, up = calls[(s, s + 1)], calls[(s + 1, s)]
                assert len(down) == len(up) == sum(len(ev) for ev in events)
                assert [key for _, key in down] == [key for _, key in up]
                assert all(a != b for (a, _), (b, _) in zip(down, up))  # a send meets a receive


def replay(orders, events, in_flight):
    """Execute the per-stage orders as message-passing processes with buffered receives: a forward
    waits for the same event on the previous stage, a backward for the next stage's. Round-robin
    until nothing can move; returns how many events ran. Also checks each order's shape."""
    p = len(orders)
    for order in orders:
        assert sorted(order) == sorted((j, i) for j, ev in enumerate(events) for i in range(len(ev)))
        flight, seen = set(), {}
        for j, i in order:  # each microbatch in its own order; microbatches started in order
            assert seen.get(j, -1) == i - 1 and (i or j == 0 or (j - 1) in seen)
            seen[j] = i
            flight.add(j)
            assert len(flight) <= in_flight
            if i + 1 == len(events[j]):
                flight.remove(j)
    ran = [set() for _ in range(p)]
    pos, moved = [0] * p, True
    while moved:
        moved = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                j, i = orders[s][pos[s]]
                nb = s + 1 if events[j][i][0] else s - 1
                if 0 <= nb < p and (j, i) not in ran[nb]:
                    break
                ran[s].add((j, i))
                pos[s] += 1
                moved = True
    return sum(pos)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_schedule_is_deadlock_free_interleaved_and_bounded_by_paths_in_flight(workload):
    from megatron_dta.engine.plan import build_plan, seq_offsets_of
    from megatron_dta.synthetic import make_workload

    rollouts = make_workload(workload, vocab_size=1000, seed=0)
    trees: dict = {}
    for r in rollouts:
        trees.setdefault(r.group, []).append(r)
    plans = [
        build_plan("dta", [r.input_ids for r in t], seq_offsets_of([len(r) for r in t]), 256)
        for t in trees.values()
    ]
    events = [event_tokens(plan.events()) for plan in plans]
    path_peak = max(dfs_schedule([ev], 1, 1).peak_kept_tokens[0] for ev in events)  # one DFS alone
    for p in (2, 3, 4):
        for k in (1, 2, p):
            sched = dfs_schedule(events, p, k)
            assert replay(sched.orders, events, k) == p * sum(map(len, events)), (p, k)  # no deadlock
            assert max(sched.peak_in_flight) <= k
            assert max(sched.peak_kept_tokens) <= k * path_peak  # memory: paths in flight, not trees
        if len(events) > 1:
            one, several = dfs_schedule(events, p, 1), dfs_schedule(events, p, p)
            assert (
                sorted(several.orders[0]) != several.orders[0] or p == 1
            )  # stage 0 interleaves microbatches
            assert several.bubble < one.bubble
