"""DTA, sparse and dense equal HF transformers' dense forward/backward, in float64, to round-off.

Reference: HF transformers (patched to stay float64, proven against a naive forward) running each
rollout alone. Tolerances are ``megatron_dta.devtools.parity``'s: FLOAT64 (logprobs 1e-10 absolute,
gradients 1e-9 relative) and FLOAT32 (1e-4), each with its reason there.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import MODEL_KINDS, float64_hf, hf_dense_step, hf_logprobs_of, make_hf_model, naive_logprobs

from megatron_dta.attention import AttnSpec, sdpa_attention
from megatron_dta.devtools.parity import FLOAT32, FLOAT64, compare
from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.model.hf import gather_hf, load_hf_checkpoint
from megatron_dta.rollouts import make_rollout

VOCAB = 96


@pytest.fixture(scope="module")
def hf_and_ours(single_process_world, tmp_path_factory):
    """``get(kind, dtype)``: (HF reference model, our model loaded from its checkpoint), each built
    once per module (the hypothesis tests call it for every example)."""

    @functools.cache
    def saved(kind: str):
        hf = make_hf_model(kind, seed=MODEL_KINDS.index(kind), vocab=VOCAB)
        path = tmp_path_factory.mktemp(f"hf-{kind}")
        hf.save_pretrained(path)
        return hf, path

    @functools.cache
    def get(kind: str, dtype=torch.float64):
        hf, path = saved(kind)
        return hf, load_hf_checkpoint(path, single_process_world, dtype)[0]

    return get


@st.composite
def rollout_batches(draw, max_rollouts=9, max_len=24):
    """Forests with duplicates, prefixes of other rollouts, several roots, single-token nodes,
    all-zero masks, per-token and scalar advantages, and off-policy old logprobs."""
    n = draw(st.integers(1, max_rollouts))
    seqs: list[list[int]] = []
    tok = st.integers(0, VOCAB - 1)
    for _ in range(n):
        if seqs and draw(st.booleans()):
            base = draw(st.sampled_from(seqs))
            cut = draw(st.integers(1, len(base)))
            seq = base[:cut] + draw(st.lists(tok, max_size=max_len - cut))
        else:
            seq = draw(st.lists(tok, min_size=1, max_size=max_len))
        seqs.append(seq)
    rollouts = []
    for s in seqs:
        mask_kind = draw(st.sampled_from(["ones", "zeros", "random"]))
        mask = {"ones": [1] * len(s), "zeros": [0] * len(s)}.get(mask_kind) or draw(
            st.lists(st.integers(0, 1), min_size=len(s), max_size=len(s))
        )
        per_token = draw(st.booleans())
        adv = (
            draw(st.lists(st.floats(-2, 2), min_size=len(s), max_size=len(s)))
            if per_token
            else draw(st.floats(-2, 2))
        )
        old = None
        if draw(st.booleans()):
            old = draw(st.lists(st.floats(-6, -0.5), min_size=len(s), max_size=len(s)))
        rollouts.append(make_rollout(s, mask, adv, old_logprobs=old))
    return rollouts


def run_ours(model, rollouts, mode, block_size=2048, budget=1 << 20):
    """(parity dump, StepResult) of one forward+backward of ``model``."""
    model.zero_grad(set_to_none=True)
    eng = Engine(model, EngineConfig(mode=mode, block_size=block_size, activation_budget_tokens=budget))
    res = eng.forward_backward(rollouts)
    return {"logprobs": res.logprobs, "loss": res.loss, "grads": gather_hf(model, "grad")}, res


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_patched_reference_matches_naive_float64_forward(kind, hf_and_ours):
    hf, _ = hf_and_ours(kind)
    ids = np.random.default_rng(1).integers(0, VOCAB, 17)
    with torch.no_grad(), float64_hf():
        patched = hf_logprobs_of(hf, ids).numpy()
    np.testing.assert_allclose(patched, naive_logprobs(hf.state_dict(), hf.config, ids), rtol=0, atol=1e-12)
    with torch.no_grad():  # unpatched HF is float32-limited: the reason for the patch
        assert np.abs(hf_logprobs_of(hf, ids).numpy() - patched).max() > 1e-12


@pytest.mark.parametrize("kind", MODEL_KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rollouts=rollout_batches(),
    block=st.sampled_from([1, 2, 3, 7, 2048]),
    budget=st.sampled_from([0, 6, 1 << 20]),
)
def test_all_modes_equal_hf_dense_float64(kind, rollouts, block, budget, hf_and_ours):
    hf, ours = hf_and_ours(kind)
    ref = hf_dense_step(hf, rollouts)
    for mode in ("dense", "sparse", "dta"):
        assert compare(run_ours(ours, rollouts, mode, block_size=block, budget=budget)[0], ref, FLOAT64) == []


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_float32_within_1e4(kind, hf_and_ours):
    hf, ours32 = hf_and_ours(kind, torch.float32)
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, VOCAB, 20).tolist()
    rollouts = [
        make_rollout(prompt + rng.integers(0, VOCAB, 6 + i).tolist(), advantages=rng.normal())
        for i in range(6)
    ]
    ref = hf_dense_step(hf, rollouts)
    for mode in ("dense", "sparse", "dta"):
        assert compare(run_ours(ours32, rollouts, mode, block_size=8)[0], ref, FLOAT32) == []


def test_deep_chain_no_recursion_limit(hf_and_ours):
    """1,200 nested rollouts = a chain of 1,200 one-token nodes (DFS depth 1,200 > Python's limit).

    All rollouts are prefixes of the longest, so their logprobs are prefixes of its logprobs and the
    loss is a count-weighted sum over one sequence: the reference is a single HF forward/backward.
    """
    hf, ours = hf_and_ours("qwen3")
    n = 1200
    ids = np.random.default_rng(3).integers(0, VOCAB, n)
    rollouts = [make_rollout(ids[:k], advantages=1.0 + 0.001 * k) for k in range(1, n + 1)]
    dump, res = run_ours(ours, rollouts, "dta", block_size=2048, budget=64)
    assert res.plan.extra["nodes"] == n

    hf.zero_grad(set_to_none=True)
    with float64_hf():
        lp = hf_logprobs_of(hf, ids)
        # position j is in rollouts k >= j+1, each weight 1/total with advantage A_k; on-policy
        # ratio = 1 so the term is -A_k * exp(lp - lp.detach())
        total = sum(k - 1 for k in range(1, n + 1))
        adv_sum = torch.tensor(
            [sum(1.0 + 0.001 * k for k in range(j + 1, n + 1)) for j in range(n)], dtype=torch.float64
        )
        loss = (-(adv_sum * torch.exp(lp - lp.detach()))[1:]).sum() / total
        loss.backward()
    want = {
        "logprobs": [lp.detach().numpy()[:k] for k in range(1, n + 1)],
        "loss": loss.detach(),
        "grads": {name: p.grad for name, p in hf.named_parameters()},
    }
    assert compare(dump, want, FLOAT64) == []


def test_bottom_right_causal_alignment():
    """Queries shorter than keys: query i sees prefix keys and own keys <= i (bottom-right)."""
    torch.manual_seed(0)
    P, T, D = 5, 3, 8
    q = torch.randn(T, 4, D, dtype=torch.float64)
    k = torch.randn(P + T, 2, D, dtype=torch.float64)
    v = torch.randn(P + T, 2, D, dtype=torch.float64)
    out = sdpa_attention(q, k, v, AttnSpec(P, T))
    for i in range(T):
        for h in range(4):
            kh = h // 2
            s = (k[: P + i + 1, kh] @ q[i, h]) / math.sqrt(D)
            want = torch.softmax(s, 0) @ v[: P + i + 1, kh]
            torch.testing.assert_close(out[i, h], want, rtol=0, atol=1e-14)
    # top-left alignment would let query 0 see only key 0: make sure we differ from it
    top_left = torch.softmax((k[:1, 0] @ q[0, 0]) / math.sqrt(D), 0) @ v[:1, 0]
    assert (out[0, 0] - top_left).abs().max() > 1e-3


def test_logprobs_forward_only_matches_training_pass(hf_and_ours):
    _, ours = hf_and_ours("llama")
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, VOCAB, 10).tolist()
    rollouts = [make_rollout(prompt + rng.integers(0, VOCAB, 4).tolist()) for _ in range(5)]
    _, train = run_ours(ours, rollouts, "dta", block_size=4)
    fwd = Engine(ours, EngineConfig(mode="dta", block_size=4)).logprobs(rollouts)
    for a, b in zip(fwd.logprobs, train.logprobs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
