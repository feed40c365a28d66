"""Every distinct rank position of a layout, built as that rank builds it, on the meta device.

A world of N ranks is simulated in this one process with torch's fake process-group backend: for
each (tp_rank, pp_rank) the default group is created as global rank r of N, megatron-core's
``parallel_state`` builds its groups, and the rank's pipeline stage is built on the meta device
(no memory, no weights). Parameter shapes and counts therefore come from the model code itself,
and so do the activation bytes per token: a meta-device forward of the stage records what
autograd saves for backward. Under expert parallelism each (tp_rank, ep_rank, pp_rank) is built
(its experts are its own); context-parallel ranks hold their CP rank 0's shapes (replicas, like DP).
The simulated world itself is ``parallel.simulated_rank`` (only
parallel.py touches ``parallel_state``); a process that already runs torch.distributed cannot use it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from megatron_dta.errors import UserError
from megatron_dta.engine.executor import Executor
from megatron_dta.model.config import ModelConfig
from megatron_dta.model.moe import MoEMLP, top_k_route
from megatron_dta.model.transformer import Transformer
from megatron_dta.parallel import ParallelLayout, simulated_rank

PROBE_TOKENS = 64  # the activation probe's row lengths are T and 2T: their difference is per token


@dataclass
class RankShape:
    """What one (tp_rank, ep_rank, pp_rank) position holds and computes per token (DP and CP
    replicas share it)."""

    tp_rank: int
    pp_rank: int
    is_first: bool
    is_last: bool
    parameters: int  # HF parameters this position owns (not: vocab padding rows, a tied copy, the
    # replicas of TP-replicated norms on TP ranks > 0, of everything but the experts on EP ranks > 0)
    allocated: int  # parameter elements it allocates
    dtype_bytes: int
    layers: int  # layers of this stage
    linear_weights: int  # elements of the layers' linear weights (their matmul FLOPs are 2x per token)
    head_rows: int  # LM-head vocabulary rows on the last stage (0 elsewhere)
    hidden: int
    q_heads: int  # local
    kv_heads: int  # local
    head_dim: int
    ffn: int  # local
    activation_bytes_per_token: float  # saved for backward by one token's forward through the stage
    kv_stack_bytes_per_position: int  # the executor's K/V + K/V-gradient stacks, per path position
    ep_rank: int = 0
    moe_layers: int = 0  # MoE layers of this stage (one EP all-reduce each way per layer)
    expert_weights: float = 0.0  # expert weight elements one token passes through here on average:
    # top_k of num_experts experts are routed to, this rank holds num_experts / ep of them


def global_rank(
    tp_rank: int,
    pp_rank: int,
    dp_rank: int,
    tp: int,
    dp: int,
    cp_rank: int = 0,
    cp: int = 1,
    ep_rank: int = 0,
    ep: int = 1,
) -> int:
    """Megatron's rank order tp-cp-ep-dp-pp: tp varies fastest, pp slowest."""
    return tp_rank + tp * (cp_rank + cp * (ep_rank + ep * (dp_rank + dp * pp_rank)))


class _FlashProbe(torch.autograd.Function):
    """Attention as a fused GPU kernel saves it: q, k, v, the output and a float32 log-sum-exp per
    query and head (scores are recomputed in backward); shapes only, this runs on meta tensors."""

    @staticmethod
    def forward(ctx, q_TND, k_TKD, v_TKD):
        out_TND = torch.empty_like(q_TND)
        ctx.save_for_backward(
            q_TND, k_TKD, v_TKD, out_TND, q_TND.new_empty(q_TND.shape[:2], dtype=torch.float32)
        )
        return out_TND

    @staticmethod
    def backward(ctx, grad):  # never called: the probe only records what the forward saves
        raise NotImplementedError


class _ProbeKV:
    def attend(self, layer, q_TND, k_TKD, v_TKD):
        return _FlashProbe.apply(q_TND, k_TKD, v_TKD)

    def route(self, moe_index, probs_TE, top_k):
        return top_k_route(probs_TE, top_k)


def _balanced_experts(self: MoEMLP, x_TH, experts_TK, gates_TK):
    """``MoEMLP._experts`` under a balanced router (each expert gets T x top_k / num_experts
    tokens), shapes only: which tokens an expert gets is data, which meta tensors do not have."""
    T, K = experts_TK.shape
    n = T * K // self.router.shape[0]
    out_TH = x_TH * 0 + (gates_TK * 0).sum(-1, keepdim=True)
    tok = torch.arange(n, device=x_TH.device) % T
    for e in range(self.e_local):
        gate_NF, up_NF = F.linear(x_TH[tok], self.fc1[e]).chunk(2, dim=-1)
        y_NH = F.linear(F.silu(gate_NF) * up_NF, self.fc2[e])
        out_TH = out_TH.index_add(0, tok, y_NH * gates_TK[tok, 0, None])
    return out_TH


@contextlib.contextmanager
def _patched(cls, name: str, fn):
    old = getattr(cls, name)
    setattr(cls, name, fn)
    try:
        yield
    finally:
        setattr(cls, name, old)


def _saved_bytes(model: Transformer, tokens: int) -> int:
    """Bytes autograd keeps for backward of one forward (+ LM head on the last stage) of ``tokens``."""
    params = {id(p) for p in model.parameters()}
    seen: dict[int, tuple[torch.Tensor, int]] = {}  # by storage owner; the tensor keeps the id alive

    def pack(t: torch.Tensor):
        owner = t if t._base is None else t._base
        if id(owner) not in params and id(owner) not in seen:
            seen[id(owner)] = (owner, owner.numel() * owner.element_size())
        return t

    H = model.cfg.hidden_size
    ids_T = torch.zeros(tokens, dtype=torch.long, device="meta")
    x = (
        ids_T
        if model.is_first
        else torch.empty(tokens, H, dtype=model.dtype, device="meta", requires_grad=True)
    )
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        _patched(MoEMLP, "_experts", _balanced_experts),
    ):
        hidden_TH = model.forward_stage(x, torch.arange(tokens, device="meta"), _ProbeKV())
        if model.is_last:
            model.logprobs(hidden_TH, ids_T)
    return sum(size for _, size in seen.values())


def _shape_of(model: Transformer, cfg: ModelConfig, layout: ParallelLayout, act: float | None) -> RankShape:
    """``act``: the activation bytes per token of another TP rank of the stage (the same local shapes)."""
    H = cfg.hidden_size
    head = model.output_weight() if model.is_last else None
    tied_copy = cfg.tie_embeddings and model.is_last and not model.is_first
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    parameters = 0
    for name, p in model.named_parameters():
        if not param_is_not_tensor_parallel_duplicate(p, layout.tp_group):
            continue  # a replicated parameter (the norms): TP rank 0 owns it
        if layout.ep_rank > 0 and getattr(p, "allreduce", True):
            continue  # not an expert: replicated over the EP group, EP rank 0 owns it
        if name.startswith(("embed.", "lm_head.")):
            if name.startswith("lm_head.") and tied_copy:
                continue  # the embedding's copy on the last stage: the first stage owns it
            # rows past the real vocabulary are megatron's padding, not model parameters
            parameters += max(0, min(p.shape[0], cfg.vocab_size - model.vocab_start)) * H
        else:
            parameters += p.numel()
    layer = model.layers[0]
    moes = [block.moe for block in model.layers if block.moe is not None]
    stacks = Executor(model, None, device="meta")._alloc_stacks(SimpleNamespace(max_path=1))
    return RankShape(
        tp_rank=layout.tp_rank,
        pp_rank=layout.pp_rank,
        is_first=model.is_first,
        is_last=model.is_last,
        parameters=parameters,
        allocated=sum(p.numel() for p in model.parameters()),
        dtype_bytes=torch.empty((), dtype=model.dtype).element_size(),
        layers=len(model.layers),
        linear_weights=sum(_dense_weights(block) for block in model.layers),
        head_rows=0 if head is None else head.shape[0],
        hidden=H,
        q_heads=layer.n_local,
        kv_heads=layer.k_local,
        head_dim=layer.d,
        ffn=layer.down.weight.shape[1] if layer.moe is None else layer.moe.fc2.shape[2],
        activation_bytes_per_token=act
        if act is not None
        else (_saved_bytes(model, 2 * PROBE_TOKENS) - _saved_bytes(model, PROBE_TOKENS)) / PROBE_TOKENS,
        kv_stack_bytes_per_position=sum(t.numel() * t.element_size() for group in stacks for t in group),
        ep_rank=layout.ep_rank,
        moe_layers=len(moes),
        expert_weights=sum(
            (m.fc1.numel() + m.fc2.numel()) * m.top_k / m.router.shape[0] for m in moes
        ),  # e_local experts of the rank, each routed top_k / num_experts of the tokens
    )


def _dense_weights(block) -> int:
    """Linear weight elements every token passes through in ``block`` (with the MoE router)."""
    mlp = (block.moe.router,) if block.moe is not None else (block.gate_up.weight, block.down.weight)
    return sum(w.numel() for w in (block.qkv.weight, block.o_proj.weight, *mlp))


def rank_shapes(
    cfg: ModelConfig, tp: int, pp: int, world: int, dtype: torch.dtype, cp: int = 1, ep: int = 1
) -> dict[tuple[int, int, int], RankShape]:
    """{(tp_rank, ep_rank, pp_rank): RankShape} of every position of the layout, each built as global
    rank (tp_rank, cp_rank 0, ep_rank, dp_rank 0, pp_rank) of ``world`` builds it; DP and CP
    replicas hold the same shapes."""
    if world % (tp * cp * ep * pp):
        raise UserError(
            f"world size {world} is not divisible by tp x cp x ep x pp = {tp} x {cp} x {ep} x {pp}: change "
            "--world-size, parallel.tp, parallel.cp, parallel.ep or parallel.pp"
        )
    dp = world // (tp * cp * ep * pp)
    shapes = {}
    for pp_rank in range(pp):
        for ep_rank in range(ep):
            for tp_rank in range(tp):
                rank = global_rank(tp_rank, pp_rank, 0, tp, dp, 0, cp, ep_rank, ep)
                with simulated_rank(rank, world, tp, pp, cp, ep) as layout:
                    coords = (layout.tp_rank, layout.ep_rank, layout.pp_rank, layout.dp_rank, layout.cp_rank)
                    assert coords == (tp_rank, ep_rank, pp_rank, 0, 0), "rank order"
                    with torch.device("meta"):
                        model = Transformer(cfg, layout, dtype=dtype)
                    first = shapes.get((0, 0, pp_rank))
                    act = None if first is None else first.activation_bytes_per_token
                    shapes[tp_rank, ep_rank, pp_rank] = _shape_of(model, cfg, layout, act)
    return shapes
