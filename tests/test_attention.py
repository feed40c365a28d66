"""Every attention backend equals a naive float64 softmax over an independently derived mask.

CPU: sdpa and cascade (outputs and q/k/v gradients) and flex (forward; torch's CPU flex has no
backward) in float64 to 1e-12 absolute (values and gradients are O(1); float64 round-off here is
~1e-15, any real error is >= 1e-3). The te/flash varlen packing is checked on CPU by replaying
its sequences through a per-sequence reference. GPU, float32 and bfloat16: each backend's error
against the float64 reference is at most twice the error of torch sdpa in the test's precision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import make_hf_model

from megatron_dta import attention as A
from megatron_dta.attention import AttentionBackendUnavailable, AttnSpec, get_attention_backend
from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.model.hf import gather_hf, load_hf_checkpoint
from megatron_dta.rollouts import make_rollout

HEADS = [(1, 1), (2, 1), (4, 2), (3, 3)]  # (query heads, kv heads)


# ---- structures and the independent reference ------------------------------------------------
@st.composite
def structures(draw, max_nodes=6, max_len=6, max_prefix=9):
    """(prefix length, segment lengths, parent per segment (-1 = root), kind), segments in DFS
    pre-order: a causal chunk, sibling segments (a DTA unit) or a forest (a sparse unit)."""
    kind = draw(st.sampled_from(["causal", "siblings", "tree"]))
    P = draw(st.integers(0, max_prefix))
    m = 1 if kind == "causal" else draw(st.integers(1, max_nodes))
    lengths = draw(
        st.lists(st.integers(1, 3 * max_len if kind == "causal" else max_len), min_size=m, max_size=m)
    )
    parent, path = [-1], [0]
    for i in range(1, m):
        depth = 0 if kind == "siblings" else draw(st.integers(0, len(path)))
        parent.append(path[depth - 1] if depth else -1)
        path = path[:depth] + [i]
    return P, lengths, parent, kind


def spec_of(P, lengths, parent, kind) -> AttnSpec:
    T = sum(lengths)
    if kind == "causal":
        return AttnSpec(P, T)
    m = len(lengths)
    size = [1] * m
    for i in reversed(range(m)):
        if parent[i] >= 0:
            size[parent[i]] += size[i]
    node = torch.repeat_interleave(torch.arange(m), torch.tensor(lengths))
    dfs_out = torch.arange(m) + torch.tensor(size)
    return AttnSpec(P, T, node, dfs_out[node])


def visibility(P, lengths, parent) -> torch.Tensor:
    """[T, P + T] from the parent links, by walking up: shares nothing with AttnSpec's rule."""
    node = np.repeat(np.arange(len(lengths)), lengths)
    T = len(node)
    vis = torch.zeros(T, P + T, dtype=torch.bool)
    vis[:, :P] = True
    for t in range(T):
        ancestors, a = set(), node[t]
        while a >= 0:
            ancestors.add(a)
            a = parent[a]
        for j in range(t + 1):
            vis[t, P + j] = node[j] in ancestors
    return vis


def naive_attention(q_TND, k_SKD, v_SKD, vis_TS):
    """Explicit softmax, one head at a time; float64 in, float64 out, differentiable."""
    N, D = q_TND.shape[1], q_TND.shape[2]
    group = N // k_SKD.shape[1]
    heads = []
    for h in range(N):
        s = (q_TND[:, h] @ k_SKD[:, h // group].T) / math.sqrt(D)
        s = s.masked_fill(~vis_TS, float("-inf"))
        w = torch.exp(s - s.max(-1, keepdim=True).values)
        heads.append((w / w.sum(-1, keepdim=True)) @ v_SKD[:, h // group])
    return torch.stack(heads, 1)


def random_qkv(T, S, N, K, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return make(T, N, D), make(S, K, D), make(S, K, D), make(T, N, D)


def out_and_grads(fn, q, k, v, dout, *extra):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, *extra)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


# ---- CPU: exact in float64 --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "cascade"])
@settings(max_examples=60, deadline=None)
@given(
    structure=structures(),
    heads=st.sampled_from(HEADS),
    D=st.sampled_from([2, 5, 8]),
    seed=st.integers(0, 99),
)
def test_backend_equals_naive_float64_with_grads(backend, structure, heads, D, seed):
    P, lengths, parent, kind = structure
    spec = spec_of(*structure)
    q, k, v, dout = random_qkv(spec.own_len, P + spec.own_len, *heads, D, seed=seed)
    ref = out_and_grads(naive_attention, q, k, v, dout, visibility(P, lengths, parent))
    got = out_and_grads(get_attention_backend(backend, "cpu"), q, k, v, dout, spec)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert (a - b).abs().max().item() <= 1e-12, (
            f"{backend} {kind}: {name} off by {(a - b).abs().max():.2e}"
        )


@settings(max_examples=60, deadline=None)
@given(
    structure=structures(),
    heads=st.sampled_from(HEADS),
    D=st.sampled_from([2, 5, 8]),
    seed=st.integers(0, 99),
)
def test_flex_forward_equals_naive_float64_on_cpu(structure, heads, D, seed):
    P, lengths, parent, _ = structure
    spec = spec_of(*structure)
    q, k, v, _ = random_qkv(spec.own_len, P + spec.own_len, *heads, D, seed=seed)
    with torch.no_grad():
        got = get_attention_backend("flex", "cpu")(q, k, v, spec)
    ref = naive_attention(q, k, v, visibility(P, lengths, parent))
    assert (got - ref).abs().max().item() <= 1e-12


def _dense_blocks(counts, indices, n_kv):
    out = torch.zeros(counts.shape[-1], n_kv, dtype=torch.bool)
    for r, (c, idx) in enumerate(zip(counts[0, 0].tolist(), indices[0, 0])):
        out[r, idx[:c].long()] = True
    return out


@settings(max_examples=40, deadline=None)
@given(structure=structures(max_nodes=8, max_len=90, max_prefix=400))
def test_flex_block_mask_marks_exactly_the_partial_and_full_blocks(structure):
    """Eager flex ignores block sparsity, so the BlockMask's flags are checked on their own: a
    block is listed as full iff every pair in it is visible, as partial iff some but not all are."""
    P, lengths, parent, _ = structure
    spec = spec_of(*structure)
    T = spec.own_len
    fm = A._flex_mask(P, T, T, spec.seg_in, spec.seg_out, "cpu")
    bm = fm.block_mask
    vis = torch.zeros(fm.q_len, fm.kv_len, dtype=torch.bool)
    vis[:T, : P + T] = visibility(P, lengths, parent)
    blocks = vis.view(fm.q_len // 128, 128, fm.kv_len // 128, 128)
    every, some = blocks.all(3).all(1), blocks.any(3).any(1)
    n_kv = fm.kv_len // 128
    assert torch.equal(_dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, n_kv), every)
    assert torch.equal(_dense_blocks(bm.kv_num_blocks, bm.kv_indices, n_kv), some & ~every)


def test_flex_mask_buckets_are_powers_of_two():
    """Padding to power-of-two buckets (>= 128) bounds the compiled shapes: 5 query buckets up to a
    2048-token chunk, one key bucket per doubling of the path."""
    assert [A._bucket(n) for n in (1, 128, 129, 1000, 2048, 2049)] == [128, 128, 256, 1024, 2048, 4096]


def test_flex_backward_on_cpu_is_a_clear_error():
    spec = AttnSpec(3, 4)
    q, k, v, _ = random_qkv(4, 7, 2, 1, 4)
    with pytest.raises(AttentionBackendUnavailable, match="no backward on CPU"):
        A.flex_attention(q.requires_grad_(), k, v, spec)


@settings(max_examples=40, deadline=None)
@given(structure=structures(), heads=st.sampled_from(HEADS), seed=st.integers(0, 99))
def test_varlen_packing_of_te_and_flash(structure, heads, seed):
    """Replays the te/flash varlen call (cu_seqlens, packed K/V with the prefix repeated, causal
    bottom-right per sequence) with sdpa per sequence; tree specs report None (fallback)."""
    P, lengths, parent, kind = structure
    spec = spec_of(*structure)
    lay = A._varlen(spec, "cpu")
    if kind == "tree" and any(p >= 0 for p in parent):
        assert lay is None
        return
    T = spec.own_len
    q, k, v, _ = random_qkv(T, P + T, *heads, 4, seed=seed)
    kp, vp = (k, v) if lay.kv_rows is None else (k[lay.kv_rows], v[lay.kv_rows])
    assert lay.cu_q.dtype == lay.cu_kv.dtype == torch.int32
    assert lay.cu_q[-1] == T and lay.cu_kv[-1] == len(kp)
    outs = []
    for i in range(len(lay.cu_q) - 1):
        qa, qb, ka, kb = lay.cu_q[i], lay.cu_q[i + 1], lay.cu_kv[i], lay.cu_kv[i + 1]
        assert qb - qa <= lay.max_q and kb - ka <= lay.max_kv
        outs.append(
            A.sdpa_attention(q[qa:qb], kp[ka:kb], vp[ka:kb], AttnSpec(int(kb - ka - (qb - qa)), int(qb - qa)))
        )
    ref = naive_attention(q, k, v, visibility(P, lengths, parent))
    assert (torch.cat(outs) - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("backend", ["te", "flash"])
def test_te_and_flash_fall_back_for_tree_specs_without_importing(backend):
    spec = spec_of(2, [3, 2, 4], [-1, 0, 0], "tree")
    q, k, v, _ = random_qkv(9, 11, 4, 2, 4)
    assert torch.equal(A.BACKENDS[backend](q, k, v, spec), A.sdpa_attention(q, k, v, spec))


# ---- selection and errors ---------------------------------------------------------------------
@pytest.mark.parametrize("backend, what", [("te", "Transformer Engine"), ("flash", "flash-attn")])
def test_gpu_only_backends_raise_a_clear_error_here(backend, what):
    with pytest.raises(AttentionBackendUnavailable, match="runs on CUDA only"):
        get_attention_backend(backend)
    if backend == "te" and not torch.cuda.is_available():  # no TE here: the import error is named, unchained
        with pytest.raises(AttentionBackendUnavailable, match=what) as err:
            get_attention_backend(backend, "cuda")
        assert err.value.__suppress_context__


@pytest.mark.parametrize("backend, what", [("te", "Transformer Engine"), ("flash", "flash-attn")])
def test_missing_package_is_named(backend, what, monkeypatch):
    """TE without CUDA raises RuntimeError (not ImportError) on import: any failure is caught."""

    def broken(name, *a, **kw):
        raise RuntimeError("CUDA runtime not found")

    monkeypatch.setattr(A.importlib, "import_module", broken)
    with pytest.raises(AttentionBackendUnavailable, match=f"{what}.*RuntimeError: CUDA runtime not found"):
        get_attention_backend(backend, "cuda")


def test_auto_and_unknown():
    assert get_attention_backend("auto", "cpu") is A.sdpa_attention
    with pytest.raises(ValueError, match="choose one of"):
        get_attention_backend("xformers", "cpu")


# ---- engine: cascade and flex give sdpa's logprobs and gradients -------------------------------
VOCAB = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, single_process_world):
    hf = make_hf_model("qwen3", seed=5, vocab=VOCAB)
    path = tmp_path_factory.mktemp("attn") / "hf"
    hf.save_pretrained(path)
    return load_hf_checkpoint(path, single_process_world, torch.float64)[0]


def _rollouts():
    rng = np.random.default_rng(7)
    tok = lambda n: rng.integers(0, VOCAB, n).tolist()
    prompt, turn = tok(11), tok(5)
    seqs = [
        prompt + tok(6),
        prompt + turn + tok(4),
        prompt + turn + tok(7),
        prompt + turn,
        prompt + tok(3),
        tok(9),
    ]
    return [make_rollout(s, advantages=float(rng.normal())) for s in seqs]


def _run(model, mode, block, attention, forward_only=False):
    model.zero_grad(set_to_none=True)
    eng = Engine(model, EngineConfig(mode=mode, block_size=block, attention=attention))
    if forward_only:
        return eng.logprobs(_rollouts()), None
    return eng.forward_backward(_rollouts()), gather_hf(model, "grad")


@pytest.mark.parametrize(
    "mode, block", [("dense", 2048), ("sparse", 2048), ("dta", 2048), ("dta", 3), ("dta", 6)]
)
def test_engine_cascade_equals_sdpa(tiny_model, mode, block):
    """float64 end to end: logprobs 1e-12 absolute, gradients 1e-10 relative (round-off ~1e-15)."""
    ref, ref_g = _run(tiny_model, mode, block, "sdpa")
    got, got_g = _run(tiny_model, mode, block, "cascade")
    for a, b in zip(got.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    for name, g in ref_g.items():
        assert (got_g[name] - g).norm() <= 1e-10 * g.norm() + 1e-14, name


@pytest.mark.parametrize("mode, block", [("sparse", 2048), ("dta", 3)])
def test_engine_flex_logprobs_equal_sdpa_on_cpu(tiny_model, mode, block):
    """Forward only: flex has no CPU backward (see test_flex_backward_on_cpu_is_a_clear_error)."""
    ref, _ = _run(tiny_model, mode, block, "sdpa", forward_only=True)
    got, _ = _run(tiny_model, mode, block, "flex", forward_only=True)
    for a, b in zip(got.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


# ---- GPU: within twice torch's own error --------------------------------------------------------
GPU_CASES = {  # (prefix, segment lengths, parents, kind)
    "chunk": (700, [300], [-1], "causal"),  # a DTA chunk of a long node: bottom-right causal
    "siblings": (500, [90, 130, 70, 150], [-1, -1, -1, -1], "siblings"),  # one DTA unit of siblings
    "tree": (0, [120, 40, 60, 30, 80, 25, 50, 45], [-1, 0, 1, 1, 0, 4, -1, 6], "tree"),  # a sparse unit
    "causal": (0, [400], [-1], "causal"),  # a dense rollout
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU backend tests need a CUDA device")
@pytest.mark.parametrize("kind", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["flex", "cascade", "te", "flash"])
def test_gpu_backend_error_within_twice_torch(backend, dtype, kind):
    try:
        fn = get_attention_backend(backend, "cuda")
    except AttentionBackendUnavailable as e:
        pytest.skip(str(e))
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn runs float16/bfloat16 only")
    P, lengths, parent, _ = GPU_CASES[kind]
    T = sum(lengths)
    q, k, v, dout = random_qkv(T, P + T, 8, 2, 64, dtype=dtype, device="cuda", seed=1)
    vis = visibility(P, lengths, parent).cuda()
    ref = out_and_grads(naive_attention, q.double(), k.double(), v.double(), dout.double(), vis)
    torch_ = out_and_grads(A.sdpa_attention, q, k, v, dout, spec_of(*GPU_CASES[kind]))
    ours = out_and_grads(fn, q, k, v, dout, spec_of(*GPU_CASES[kind]))
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), ours, torch_, ref):
        err_ours, err_torch = (o.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        # The rule, no constant added. Known (docs/benchmarks.md): on an H200, flex and
        # cascade float32 dV in the tree case was 8.6 ulps of max|dV| against sdpa's 3.5 (2.5x); every
        # other float32 and all bfloat16 checks were within 2x. A mask or indexing error is O(1).
        assert err_ours <= 2 * err_torch, f"{backend} {kind} {name}: {err_ours:.3e} vs torch {err_torch:.3e}"
