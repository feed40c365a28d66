"""Every distinct rank position of a layout, built as that rank builds it, on the meta device.

A world of N ranks is simulated in this one process with torch's fake process-group backend: for
each (tp_rank, pp_rank) the default group is created as global rank r of N, megatron-core's
``parallel_state`` builds its groups, and the rank's pipeline stage is built on the meta device
(no memory, no weights). Parameter shapes and counts therefore come from the model code itself,
and so do the activation bytes per token: a meta-device forward of the stage records what
autograd saves for backward. The simulated world itself is ``parallel.simulated_rank`` (only
parallel.py touches ``parallel_state``); a process that already runs torch.distributed cannot use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from megatron_dta.errors import UserError
from megatron_dta.engine.executor import Executor
from megatron_dta.model.config import ModelConfig
from megatron_dta.model.transformer import Transformer
from megatron_dta.parallel import ParallelLayout, simulated_rank

PROBE_TOKENS = 64  # the activation probe's row lengths are T and 2T: their difference is per token


@dataclass
class RankShape:
    """What one (tp_rank, pp_rank) position holds and computes per token (D: dp replicas share it)."""

    tp_rank: int
    pp_rank: int
    is_first: bool
    is_last: bool
    parameters: int  # HF parameters this position owns (not: vocab padding rows, a tied copy, the
    # replicas of TP-replicated norms on TP ranks > 0)
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


def global_rank(tp_rank: int, pp_rank: int, dp_rank: int, tp: int, dp: int) -> int:
    """Megatron's rank order tp-cp-ep-dp-pp (cp = ep = 1): tp varies fastest, pp slowest."""
    return tp_rank + tp * (dp_rank + dp * pp_rank)


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
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
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
        if name.startswith(("embed.", "lm_head.")):
            if name.startswith("lm_head.") and tied_copy:
                continue  # the embedding's copy on the last stage: the first stage owns it
            # rows past the real vocabulary are megatron's padding, not model parameters
            parameters += max(0, min(p.shape[0], cfg.vocab_size - model.vocab_start)) * H
        else:
            parameters += p.numel()
    layer = model.layers[0]
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
        linear_weights=sum(
            m.weight.numel()
            for block in model.layers
            for m in (block.qkv, block.o_proj, block.gate_up, block.down)
        ),
        head_rows=0 if head is None else head.shape[0],
        hidden=H,
        q_heads=layer.n_local,
        kv_heads=layer.k_local,
        head_dim=layer.d,
        ffn=layer.down.weight.shape[1],
        activation_bytes_per_token=act
        if act is not None
        else (_saved_bytes(model, 2 * PROBE_TOKENS) - _saved_bytes(model, PROBE_TOKENS)) / PROBE_TOKENS,
        kv_stack_bytes_per_position=sum(t.numel() * t.element_size() for group in stacks for t in group),
    )


def rank_shapes(
    cfg: ModelConfig, tp: int, pp: int, world: int, dtype: torch.dtype
) -> dict[tuple[int, int], RankShape]:
    """{(tp_rank, pp_rank): RankShape} of every position of the layout, each built as global rank
    (tp_rank, dp_rank 0, pp_rank) of ``world`` builds it; DP replicas hold the same shapes."""
    if world % (tp * pp):
        raise UserError(
            f"world size {world} is not divisible by tp x pp = {tp} x {pp}: change --world-size, "
            "parallel.tp or parallel.pp"
        )
    dp = world // (tp * pp)
    shapes = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            with simulated_rank(global_rank(tp_rank, pp_rank, 0, tp, dp), world, tp, pp) as layout:
                assert (layout.tp_rank, layout.pp_rank, layout.dp_rank) == (tp_rank, pp_rank, 0), "rank order"
                with torch.device("meta"):
                    model = Transformer(cfg, layout, dtype=dtype)
                first = shapes.get((0, pp_rank))
                act = None if first is None else first.activation_bytes_per_token
                shapes[tp_rank, pp_rank] = _shape_of(model, cfg, layout, act)
    return shapes
