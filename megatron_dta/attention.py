"""Attention backends, and the one place that picks one.

Every execution mode describes a chunk of work the same way: keys are ``[prefix ; own]`` where the
``P`` prefix keys (ancestors' K/V in DTA) are visible to every query, and own key ``k`` is visible
to own query ``q`` iff ``k <= q`` and k's segment is an ancestor-or-self of q's segment
(``seg_in[k] <= seg_in[q] < seg_out[k]``, segments numbered in DFS pre-order). One segment and no
prefix is plain causal attention; a prefix makes it causal aligned to the bottom right.

Backends (the config key ``engine.attention``), all exact up to their precision's round-off:
- ``sdpa``: torch scaled_dot_product_attention with a [T, P + T] boolean mask; the reference.
- ``cascade``: the prefix attended once by all queries (no mask) and the own keys causally per
  sibling segment (under the own mask where segments nest; on CUDA always, via flex), merged with
  their log-sum-exp: the siblings of a node share one prefix pass.
- ``flex``: torch flex attention with a BlockMask built from the O(T) segment description, lengths
  padded to power-of-two buckets so that a handful of compiled kernels serve every chunk.
  Compiled on CUDA; on CPU torch runs flex forward-only (no backward), so there it serves
  no-grad passes and tests of the mask.
- ``te``: Transformer Engine DotProductAttention, ``thd`` layout, one varlen call per unit with
  bottom-right causal masks. ``flash``: flash-attn's varlen function (causal is bottom-right
  aligned since flash-attn 2.1). Both see a unit's sibling segments as separate sequences whose
  keys are ``[prefix ; own tokens]`` (the prefix rows are repeated in the packed K/V). A spec in
  which one segment is another's ancestor (a sparse tree) is not a set of varlen sequences: for
  it they call flex on CUDA and sdpa elsewhere.
- ``auto``: sdpa on CPU. On CUDA, per unit: flex for units of several segments longer than
  ``AUTO_FLEX_MIN_TOKENS`` (packed sparse microbatches), where its block sparsity wins and sdpa
  would read a [T, P + T] mask; sdpa (its fused flash / memory-efficient kernels) for the rest:
  rollouts, DTA chunks and sibling units. Measured on an H200 (bf16, fwd+bwd): a 16K tree unit
  flex 7.3 ms vs sdpa 13.9 ms (0.29 vs 1.06 GiB); 8 chunks of a 16K path sdpa 11.1 vs flex 15.3 ms;
  a 2048-token sibling unit under an 8K prefix sdpa 1.7 vs flex 2.2 ms; a causal 16K rollout
  sdpa 4.2 vs flex 10.5 ms. te and flash are not picked by auto: not measured yet.

Legend: T queries (own tokens), S = P + T keys, N query heads, K kv heads (GQA), D head dim.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megatron_dta.errors import ConfigError, UserError


class AttentionBackendUnavailable(UserError):
    """The configured attention backend cannot run here; the message says what is missing."""


@dataclass
class AttnSpec:
    prefix_len: int
    own_len: int
    seg_in: torch.Tensor | None = None  # [T] int64; None: all own tokens in one segment (causal)
    seg_out: torch.Tensor | None = None  # [T] int64
    cache: dict = field(default_factory=dict, repr=False)  # per-backend prepared masks, built once per chunk

    def own_mask(self, device, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[T, T] bool visibility among own tokens; [R, T] for the own queries ``rows`` only (context
        parallelism: a rank's share of the unit's queries)."""
        idx = torch.arange(self.own_len, device=device)
        q = idx if rows is None else rows.to(device)
        causal = idx[None, :] <= q[:, None]
        if self.seg_in is None:
            return causal
        s_in, s_out = self.seg_in.to(device), self.seg_out.to(device)
        q_in = s_in[q]
        return causal & (s_in[None, :] <= q_in[:, None]) & (q_in[:, None] < s_out[None, :])

    def full_mask(self, device, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[T, P + T] bool visibility of all keys ([R, P + T] for the own queries ``rows``)."""
        own = self.own_mask(device, rows)
        if not self.prefix_len:
            return own
        return torch.cat([own.new_ones(own.shape[0], self.prefix_len), own], dim=1)

    def sibling_runs(self) -> list[int] | None:
        """Lengths of the own segments if none is another's ancestor (each is then a causal
        sequence over ``[prefix ; itself]``), else None."""
        if "runs" not in self.cache:
            runs = [self.own_len]
            if self.seg_in is not None:
                s_in, s_out = self.seg_in.cpu(), self.seg_out.cpu()
                flat = bool((s_out == s_in + 1).all()) and bool((s_in[1:] >= s_in[:-1]).all())
                runs = torch.unique_consecutive(s_in, return_counts=True)[1].tolist() if flat else None
            self.cache["runs"] = runs
        return self.cache["runs"]


# ---- sdpa ------------------------------------------------------------------------------------
def sdpa_attention(q_TND, k_SKD, v_SKD, spec: AttnSpec):
    """torch scaled_dot_product_attention: the exact reference on CPU and GPU."""
    causal = spec.prefix_len == 0 and spec.seg_in is None
    mask = None
    if not causal:
        mask = spec.cache.get("sdpa")
        if mask is None:
            mask = spec.cache["sdpa"] = spec.full_mask(q_TND.device)
    return masked_attention(q_TND, k_SKD, v_SKD, mask)


def masked_attention(q_TND, k_SKD, v_SKD, mask_TS: torch.Tensor | None):
    """torch scaled_dot_product_attention under a [T, S] boolean mask (None: causal, S = T)."""
    causal, mask = mask_TS is None, mask_TS
    # [1, heads, tokens, D]: CUDA's fused kernels take 4-D inputs only (3-D runs the O(T x S) math path)
    q, k, v = (t.transpose(0, 1)[None] for t in (q_TND, k_SKD, v_SKD))
    gqa = k.shape[1] != q.shape[1]
    # Expand kv heads unless a fused GQA kernel exists: the masked CUDA kernel has none, and on CPU
    # the flash backward with enable_gqa is ~15x slower than on expanded heads (measured, torch 2.13).
    if gqa and (mask is not None or not q.is_cuda):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)[
        0
    ].transpose(0, 1)


# ---- cascade ---------------------------------------------------------------------------------
def _merge(o1, lse1, o2, lse2):
    """Softmax over the union of two disjoint key sets from each part's output and log-sum-exp
    (``lse`` has ``o``'s shape without the last dim). Returns (output in o1's dtype, lse)."""
    cdtype = torch.promote_types(o1.dtype, torch.float32)
    lse1, lse2 = lse1.to(cdtype), lse2.to(cdtype)
    lse = torch.logaddexp(lse1, lse2)
    out = o1.to(cdtype) * torch.exp(lse1 - lse)[..., None] + o2.to(cdtype) * torch.exp(lse2 - lse)[..., None]
    return out.to(o1.dtype), lse


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _CascadeCPU(torch.autograd.Function):
    """Prefix and own parts with torch's fused CPU kernel, which returns the log-sum-exp but gives
    it no gradient. The backward therefore runs each part's kernel backward with the *merged*
    output and log-sum-exp: P = exp(S - lse) and rowsum(dO * O) are then the full softmax's, so
    the parts' gradients add up to the exact gradient (the identity ring attention relies on).
    Own keys: one causal call per sibling segment (``spans``), or one call under ``bias`` [T, T]
    when segments nest."""

    @staticmethod
    def forward(ctx, q_1NTD, k_1KSD, v_1KSD, prefix_len, spans, bias_TT):
        P = prefix_len
        o1, l1 = _flash_cpu(q_1NTD, k_1KSD[:, :, :P], v_1KSD[:, :, :P])
        k_own, v_own = k_1KSD[:, :, P:], v_1KSD[:, :, P:]
        if spans is None:
            o2, l2 = _flash_cpu(q_1NTD, k_own, v_own, attn_mask=bias_TT)
        else:
            parts = [
                _flash_cpu(q_1NTD[:, :, a:b], k_own[:, :, a:b], v_own[:, :, a:b], is_causal=True)
                for a, b in spans
            ]
            o2, l2 = torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)
        out, lse = _merge(o1, l1, o2, l2)
        ctx.save_for_backward(q_1NTD, k_1KSD, v_1KSD, out, lse, bias_TT)
        ctx.prefix_len, ctx.spans = P, spans
        return out

    @staticmethod
    def backward(ctx, dout_1NTD):
        q, k, v, out, lse, bias = ctx.saved_tensors
        P, spans, dout = ctx.prefix_len, ctx.spans, dout_1NTD.contiguous()
        dq, dk1, dv1 = _flash_cpu_backward(dout, q, k[:, :, :P], v[:, :, :P], out, lse, 0.0, False)
        k_own, v_own = k[:, :, P:], v[:, :, P:]
        if spans is None:
            dq2, dk2, dv2 = _flash_cpu_backward(dout, q, k_own, v_own, out, lse, 0.0, False, attn_mask=bias)
        else:
            parts = [
                _flash_cpu_backward(
                    *(t[:, :, a:b].contiguous() for t in (dout, q, k_own, v_own, out, lse)), 0.0, True
                )
                for a, b in spans
            ]
            dq2, dk2, dv2 = (torch.cat(g, 2) for g in zip(*parts))
        return dq + dq2, torch.cat([dk1, dk2], 2), torch.cat([dv1, dv2], 2), None, None, None


def cascade_attention(q_TND, k_SKD, v_SKD, spec: AttnSpec):
    """Prefix once for all queries (no mask) + own keys under the own mask, merged by log-sum-exp."""
    P = spec.prefix_len
    if P == 0:  # nothing to cascade
        return (flex_attention if q_TND.is_cuda else sdpa_attention)(q_TND, k_SKD, v_SKD, spec)
    if q_TND.is_cuda:
        key = ("cascade", q_TND.device)
        if key not in spec.cache:
            T = spec.own_len
            spec.cache[key] = (
                _flex_mask(P, T, 0, None, None, q_TND.device),
                _flex_mask(0, T, T, spec.seg_in, spec.seg_out, q_TND.device),
            )
        pre, own = spec.cache[key]
        o1, l1 = _flex_call(q_TND, k_SKD[:P], v_SKD[:P], pre, lse=True)
        o2, l2 = _flex_call(q_TND, k_SKD[P:], v_SKD[P:], own, lse=True)
        return _merge(o1, l1, o2, l2)[0]
    runs, spans, bias = spec.sibling_runs(), None, None
    if runs is not None:
        ends = torch.tensor(runs).cumsum(0).tolist()
        spans = list(zip([0, *ends[:-1]], ends))
    else:
        key = ("cascade", q_TND.dtype)
        if key not in spec.cache:
            mask = spec.own_mask(q_TND.device)
            spec.cache[key] = torch.zeros(mask.shape, dtype=q_TND.dtype).masked_fill_(~mask, float("-inf"))
        bias = spec.cache[key]
    q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (q_TND, k_SKD, v_SKD))  # [1, heads, tokens, D]
    return _CascadeCPU.apply(q, k, v, P, spans, bias)[0].transpose(0, 1)


# ---- flex ------------------------------------------------------------------------------------
_BLOCK = 128  # flex attention's sparse block size
FLEX_DYNAMIC = True  # one compiled kernel over all buckets (dynamic shapes) on CUDA


def _bucket(n: int) -> int:
    return max(_BLOCK, 1 << (n - 1).bit_length())


def _visible(qi, ki, meta, seg_in, seg_out):
    """The AttnSpec rule in tensor ops, for broadcast index grids or flex's per-element mask_mod.

    ``meta`` = [prefix keys, queries, own keys]; rows/keys past those counts are padding."""
    j = (ki - meta[0]).clamp(min=0)
    own = (ki >= meta[0]) & (j < meta[2]) & (j <= qi) & (seg_in[j] <= seg_in[qi]) & (seg_in[qi] < seg_out[j])
    return ((ki < meta[0]) | own) & (qi < meta[1])


@dataclass
class _FlexMask:
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    q_len: int  # padded
    kv_len: int  # padded


def _ordered_blocks(flags_QK):
    """[q blocks, kv blocks] bool -> (counts [1, 1, Q], kv block indices [1, 1, Q, K]), int32."""
    counts = flags_QK.sum(-1, dtype=torch.int32)
    order = torch.argsort((~flags_QK).to(torch.int32), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def _flex_mask(P: int, T: int, n_own: int, seg_in, seg_out, device) -> _FlexMask:
    """BlockMask of T queries over P prefix keys then ``n_own`` own keys (0 or T).

    Block flags are evaluated in row tiles of at most 2^26 elements: never a [T, S] mask at once."""
    from torch.nn.attention.flex_attention import BlockMask

    Tq, S = _bucket(T), _bucket(P + n_own)
    L = max(Tq, S)
    s_in = torch.zeros(L, dtype=torch.long, device=device)
    s_out = torch.ones(L, dtype=torch.long, device=device)
    if seg_in is not None:
        s_in[:T], s_out[:T] = seg_in, seg_out
    meta = torch.tensor([P, T, n_own], device=device)

    def mask_mod(b, h, qi, ki):
        return _visible(qi, ki, meta, s_in, s_out)

    nk = S // _BLOCK
    partial = torch.empty(Tq // _BLOCK, nk, dtype=torch.bool, device=device)
    full = torch.empty_like(partial)
    rows = max(_BLOCK, (1 << 26) // S // _BLOCK * _BLOCK)
    ki = torch.arange(S, device=device)
    for a in range(0, Tq, rows):
        qi = torch.arange(a, min(Tq, a + rows), device=device)
        vis = _visible(qi[:, None], ki[None, :], meta, s_in, s_out).view(-1, _BLOCK, nk, _BLOCK)
        some, every = vis.any(3).any(1), vis.all(3).all(1)
        full[a // _BLOCK : a // _BLOCK + len(some)] = every
        partial[a // _BLOCK : a // _BLOCK + len(some)] = some & ~every
    bm = BlockMask.from_kv_blocks(
        *_ordered_blocks(partial),
        *_ordered_blocks(full),
        BLOCK_SIZE=_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(Tq, S),
    )
    return _FlexMask(bm, Tq, S)


_FLEX_FN: dict = {}


def _flex_fn(device_type: str):
    if device_type not in _FLEX_FN:
        from torch.nn.attention.flex_attention import flex_attention

        if device_type == "cuda":  # uncompiled, flex runs its dense reference implementation
            _FLEX_FN[device_type] = torch.compile(flex_attention, dynamic=FLEX_DYNAMIC)
        else:
            # CPU: eager on purpose (inductor's CPU flex kernel is float32/bf16 forward-only and
            # fails to build with dynamic shapes in torch 2.13), so silence its "unfused" warning
            def eager(*args, **kw):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                    return flex_attention(*args, **kw)

            _FLEX_FN[device_type] = eager
    return _FLEX_FN[device_type]


def _flex_call(q_TND, k_SKD, v_SKD, fm: _FlexMask, lse: bool = False):
    """Flex attention on lengths padded to ``fm``'s buckets; returns [T, N, D] (and lse [T, N])."""
    T = q_TND.shape[0]
    if (
        q_TND.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q_TND, k_SKD, v_SKD))
    ):
        raise AttentionBackendUnavailable(
            "engine.attention 'flex' has no backward on CPU (torch's CPU flex attention is inference-only); "
            "set engine.attention=sdpa or engine.attention=cascade on CPU"
        )

    def padded(x, n):  # [tokens, heads, D] -> [1, heads, n, D]
        return F.pad(x, (0, 0, 0, 0, 0, n - x.shape[0])).transpose(0, 1)[None]

    q, k, v = padded(q_TND, fm.q_len), padded(k_SKD, fm.kv_len), padded(v_SKD, fm.kv_len)
    fn = _flex_fn(q.device.type)
    if not lse:
        return fn(q, k, v, block_mask=fm.block_mask, enable_gqa=True)[0, :, :T].transpose(0, 1)
    out, lse_1NT = _flex_with_lse(fn, q, k, v, fm.block_mask)
    return out[0, :, :T].transpose(0, 1), lse_1NT[0, :, :T].transpose(0, 1)


def _flex_with_lse(fn, q, k, v, block_mask):
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the older keyword
        return fn(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True)
    out, aux = fn(q, k, v, block_mask=block_mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_attention(q_TND, k_SKD, v_SKD, spec: AttnSpec):
    """Flex attention with the spec's BlockMask (built once per unit, reused by every layer)."""
    key = ("flex", q_TND.device)
    if key not in spec.cache:
        T = spec.own_len
        spec.cache[key] = _flex_mask(spec.prefix_len, T, T, spec.seg_in, spec.seg_out, q_TND.device)
    return _flex_call(q_TND, k_SKD, v_SKD, spec.cache[key])


# ---- varlen (te, flash) ----------------------------------------------------------------------
@dataclass
class _Varlen:
    cu_q: torch.Tensor  # [sequences + 1] int32
    cu_kv: torch.Tensor
    max_q: int
    max_kv: int
    kv_rows: torch.Tensor | None  # rows of [prefix ; own] gathered into the packed K/V; None: all in order


def _varlen(spec: AttnSpec, device) -> _Varlen | None:
    """Each sibling segment as one causal (bottom-right) sequence over [prefix ; its tokens]."""
    key = ("varlen", device)
    if key not in spec.cache:
        runs, P = spec.sibling_runs(), spec.prefix_len
        lay = None
        if runs is not None:
            lens_q = torch.tensor(runs)
            lens_kv = lens_q + P
            starts = torch.cumsum(lens_q, 0) - lens_q
            rows = None
            if len(runs) > 1 and P:
                prefix = torch.arange(P)
                rows = torch.cat(
                    [torch.cat([prefix, P + s + torch.arange(n)]) for s, n in zip(starts.tolist(), runs)]
                )
                rows = rows.to(device)
            cu = lambda lens: F.pad(torch.cumsum(lens, 0), (1, 0)).to(device=device, dtype=torch.int32)
            lay = _Varlen(cu(lens_q), cu(lens_kv), max(runs), max(runs) + P, rows)
        spec.cache[key] = lay
    return spec.cache[key]


def _tree_fallback(q_TND, k_SKD, v_SKD, spec):
    """For specs that are not a set of varlen sequences: flex on CUDA (no dense mask), else sdpa."""
    fn = flex_attention if q_TND.device.type == "cuda" else sdpa_attention
    return fn(q_TND, k_SKD, v_SKD, spec)


def _import(module: str, backend: str, what: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 (Transformer Engine raises RuntimeError, not ImportError, without CUDA)
        raise AttentionBackendUnavailable(
            f"engine.attention '{backend}' needs {what}, but importing {module} failed "
            f"({type(e).__name__}: {e}). Install it on a CUDA machine, or set engine.attention "
            f"to sdpa, cascade or flex."
        ) from None


_TE_MODULES: dict = {}


def te_attention(q_TND, k_SKD, v_SKD, spec: AttnSpec):
    """Transformer Engine DotProductAttention, thd layout, padding_causal_bottom_right."""
    lay = _varlen(spec, q_TND.device)
    if lay is None:
        return _tree_fallback(q_TND, k_SKD, v_SKD, spec)
    T, N, D = q_TND.shape
    key = (N, k_SKD.shape[1], D)
    if key not in _TE_MODULES:
        te = _import("transformer_engine.pytorch", "te", "NVIDIA Transformer Engine")
        _TE_MODULES[key] = te.DotProductAttention(
            N,
            D,
            num_gqa_groups=k_SKD.shape[1],
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type="padding_causal_bottom_right",
        )
    if lay.kv_rows is not None:
        k_SKD, v_SKD = k_SKD[lay.kv_rows], v_SKD[lay.kv_rows]
    out = _TE_MODULES[key](
        q_TND.contiguous(),
        k_SKD.contiguous(),
        v_SKD.contiguous(),
        cu_seqlens_q=lay.cu_q,
        cu_seqlens_kv=lay.cu_kv,
        max_seqlen_q=lay.max_q,
        max_seqlen_kv=lay.max_kv,
        qkv_format="thd",
        attn_mask_type="padding_causal_bottom_right",
    )
    return out.view(T, N, D)


def flash_attention(q_TND, k_SKD, v_SKD, spec: AttnSpec):
    """flash-attn's varlen kernel; ``causal=True`` is bottom-right aligned in flash-attn >= 2.1."""
    lay = _varlen(spec, q_TND.device)
    if lay is None:
        return _tree_fallback(q_TND, k_SKD, v_SKD, spec)
    if q_TND.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendUnavailable(
            f"engine.attention 'flash' runs float16/bfloat16 only, the model is {q_TND.dtype}; "
            "set engine.attention to sdpa, cascade or flex"
        )
    fa = _import("flash_attn", "flash", "flash-attn >= 2.1")
    if lay.kv_rows is not None:
        k_SKD, v_SKD = k_SKD[lay.kv_rows], v_SKD[lay.kv_rows]
    return fa.flash_attn_varlen_func(
        q_TND,
        k_SKD,
        v_SKD,
        lay.cu_q,
        lay.cu_kv,
        lay.max_q,
        lay.max_kv,
        dropout_p=0.0,
        softmax_scale=1 / math.sqrt(q_TND.shape[-1]),
        causal=True,
    )


# ---- selection -------------------------------------------------------------------------------
AUTO_FLEX_MIN_TOKENS = 2048


def auto_cuda_attention(q_TND, k_SKD, v_SKD, spec: AttnSpec):
    """CUDA ``auto``: flex for long multi-segment units, sdpa for the rest (see the module docstring)."""
    use_flex = spec.seg_in is not None and spec.own_len > AUTO_FLEX_MIN_TOKENS
    return (flex_attention if use_flex else sdpa_attention)(q_TND, k_SKD, v_SKD, spec)


BACKENDS = {
    "sdpa": sdpa_attention,
    "cascade": cascade_attention,
    "flex": flex_attention,
    "te": te_attention,
    "flash": flash_attention,
}


def _check_available(name: str, device_type: str) -> None:
    """Raise AttentionBackendUnavailable naming what is missing for ``name`` on ``device_type``."""
    if name not in ("te", "flash"):
        return
    if device_type != "cuda":
        raise AttentionBackendUnavailable(
            f"engine.attention '{name}' runs on CUDA only (device is {device_type}); "
            "set engine.attention to sdpa or cascade"
        )
    if name == "te":
        _import("transformer_engine.pytorch", "te", "NVIDIA Transformer Engine")
    else:
        fa = _import("flash_attn", "flash", "flash-attn >= 2.1")
        major, minor = (int(x) for x in fa.__version__.split(".")[:2])
        if (major, minor) < (2, 1):
            raise AttentionBackendUnavailable(
                f"engine.attention 'flash' needs flash-attn >= 2.1 "
                f"(bottom-right causal), found {fa.__version__}"
            )


def get_attention_backend(name: str = "auto", device: str = "cpu"):
    """The attention function named by ``engine.attention``; ``auto`` picks the fastest exact one."""
    device_type = torch.device(device).type
    if name == "auto":
        return auto_cuda_attention if device_type == "cuda" else sdpa_attention
    if name not in BACKENDS:
        raise ConfigError(f"engine.attention '{name}' is unknown; choose one of {['auto', *BACKENDS]}")
    _check_available(name, device_type)
    return BACKENDS[name]
