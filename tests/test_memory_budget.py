"""engine.memory_budget_mib: exact under tight budgets, a memory model that matches the executor's
real allocations, and budgets nothing fits refused up front.

Exactness reference: HF transformers in float64 (tests/reference.py), each rollout alone, with
``megatron_dta.devtools.parity``'s FLOAT64 tolerances. Allocation reference: the bytes of every
tensor storage alive in the process (``memory.live_bytes``, a gc scan, with autograd's saved
tensors made visible) after each forward event of a real run; the model fits its coefficients on
other, smaller units, so this checks its prediction, not its fit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import hf_dense_step, make_hf_model
from test_cli import run_main

from megatron_dta.devtools.parity import FLOAT64, compare
from megatron_dta.engine import Engine, EngineConfig, memory
from megatron_dta.errors import ConfigError
from megatron_dta.losses import PolicyLoss
from megatron_dta.model.hf import gather_hf, load_hf_checkpoint
from megatron_dta.rollouts import make_rollout

VOCAB = 96


@pytest.fixture(scope="module")
def hf_and_ours(single_process_world, tmp_path_factory):
    hf = make_hf_model("qwen3", seed=3, vocab=VOCAB)
    path = tmp_path_factory.mktemp("hf-qwen3")
    hf.save_pretrained(path)
    ours = load_hf_checkpoint(path, single_process_world, torch.float64)[0]
    _MODELS[id(ours)] = memory.MemoryModel.probe(Engine(ours).executor)  # probed once per module
    return hf, ours


_MODELS: dict = {}


def multi_turn_tree(seed: int = 0, tasks: int = 2) -> list:
    """A system prompt, two tasks, turns branching off earlier turns: parents with children at
    several depths (block 8 chunks them further)."""
    rng = np.random.default_rng(seed)
    tok = lambda n: rng.integers(0, VOCAB, n).tolist()
    system = tok(20)
    out = []
    for _ in range(tasks):
        task = system + tok(6)
        turn1 = task + tok(10)
        out += [make_rollout(turn1, advantages=rng.normal())]
        out += [make_rollout(turn1 + tok(8 + i), advantages=rng.normal()) for i in range(2)]
        out += [make_rollout(task + tok(12), advantages=rng.normal())]
    return out


def engine(model, budget, mode="dta", block=8) -> Engine:
    eng = Engine(model, EngineConfig(mode=mode, block_size=block, memory_budget_mib=budget))
    eng.memory = _MODELS.get(id(model))
    return eng


def unbudgeted_and_floor(model, rollouts, mode="dta") -> tuple[float, float]:
    """(MiB of the plan keeping every graph, MiB of the plan keeping none) at block size 8."""
    eng = engine(model, 1e6, mode)
    plan = eng.plan(rollouts)
    return plan.extra["planned_peak_bytes"] / memory.MiB, eng.memory.peak(plan, lambda u: False) / memory.MiB


def dump(model, eng: Engine, rollouts):
    model.zero_grad(set_to_none=True)
    res = eng.forward_backward(rollouts)
    return {"logprobs": res.logprobs, "loss": res.loss, "grads": gather_hf(model, "grad")}, res


def test_dta_exact_under_tight_budgets(hf_and_ours, monkeypatch):
    hf, ours = hf_and_ours
    rollouts = multi_turn_tree()
    ref = hf_dense_step(hf, rollouts)
    full, floor = unbudgeted_and_floor(ours, rollouts)
    assert floor < full  # the budgets below make the engine recompute
    for budget in (floor, (floor + full) / 2):
        got, res = dump(ours, engine(ours, budget), rollouts)
        assert res.recomputed_tokens > 0 and res.plan.extra["planned_peak_bytes"] <= budget * memory.MiB
        assert compare(got, ref, FLOAT64) == []
    # a budget below block 8's floor: the engine halves its blocks (down to MIN_BLOCK, lowered here)
    monkeypatch.setattr(memory, "MIN_BLOCK", 2)
    got, res = dump(ours, engine(ours, floor * 0.97), rollouts)
    assert res.plan.extra["block_size"] < 8 and compare(got, ref, FLOAT64) == []


def test_sparse_splits_microbatches_and_stays_exact(hf_and_ours):
    hf, ours = hf_and_ours
    rollouts = multi_turn_tree(1)
    full, _ = unbudgeted_and_floor(ours, rollouts, "sparse")
    got, res = dump(ours, engine(ours, full * 0.6, "sparse"), rollouts)
    assert res.plan.units > 1 and res.plan.extra["planned_peak_bytes"] <= full * 0.6 * memory.MiB
    assert compare(got, hf_dense_step(hf, rollouts), FLOAT64) == []


@pytest.mark.parametrize("mode", ["dta", "sparse"])
def test_memory_model_matches_live_tensor_bytes(hf_and_ours, mode):
    """After every forward event, the bytes of the executor's live tensors (stacks, the path's kept
    graphs or held K/V, children's gradient buffers, the unit's graph) are the model's to 1%."""
    _, ours = hf_and_ours
    rollouts = multi_turn_tree(2, tasks=1 if mode == "dta" else 2)  # a gc scan per event: few events
    full, floor = unbudgeted_and_floor(ours, rollouts, mode)
    eng = engine(ours, (floor + full) / 2 if mode == "dta" else full * 0.6, mode)
    loss = PolicyLoss()
    run = eng.start(rollouts, loss)
    keep = run.plan.extra["keep"]
    predicted = [
        held for _, back, held, _ in eng.memory.events(run.plan, lambda u: id(u) in keep) if not back
    ]
    measured = []
    with memory.visible_saved():
        before = set(memory.live_bytes())
        for unit, backward in run.events:
            if not backward:
                measured.append(sum(memory.live_bytes(before).values()))
    out = eng.finish(run)
    # 1%: the coefficients are a least-squares fit over probe units; masked units' fit is ~0.1% off
    np.testing.assert_allclose(measured, predicted, rtol=0.01)
    assert len(measured) >= 4 and (mode == "sparse" or (keep and out.recomputed_tokens > 0))


def test_budget_below_one_path_is_refused(hf_and_ours):
    _, ours = hf_and_ours
    rollouts = multi_turn_tree()
    with pytest.raises(ConfigError, match=r"memory_budget_mib=0.01 is below the [0-9.]+ MiB"):
        engine(ours, 0.01).forward_backward(rollouts)
    with pytest.raises(ConfigError, match=r"memory_budget_mib=0.01 is below"):
        engine(ours, 0.01, "dense").logprobs(rollouts)


def test_cli_refuses_too_small_budget_in_one_line(tmp_path, capsys):
    code, err = run_main(["train", f"checkpoint.run_dir={tmp_path}", "engine.memory_budget_mib=0.01"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "engine.memory_budget_mib=0.01 is below the" in err


def test_logprobs_under_budget_equal_reference(hf_and_ours):
    hf, ours = hf_and_ours
    rollouts = multi_turn_tree(3)
    _, floor = unbudgeted_and_floor(ours, rollouts)
    res = engine(ours, floor).logprobs(rollouts)
    ref = hf_dense_step(hf, rollouts)["logprobs"]
    for got, want in zip(res.logprobs, ref):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)  # FLOAT64's logprob tolerance
