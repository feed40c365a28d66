"""Qwen3-MoE's sparse block: a top-k softmax router and routed SwiGLU experts, split over EP x TP.

Experts are split over the expert-parallel group (rank ``e`` holds experts ``[e * E_local,
(e + 1) * E_local)``) and each expert's FFN over the TP group like the dense MLP (``fc1`` rows
[gate r; up r], ``fc2`` columns r): megatron-core's SequentialMLP parameter layout
(``linear_fc1`` [2F/tp, H], ``linear_fc2`` [H, F/tp] per local expert), stacked into one 3-D tensor
per layer. Tokens are the same on every rank of the TP and EP groups (EP shares its group's tokens
like TP does, see docs/moe.md): each rank computes its experts' partial outputs for the tokens
routed to them and one all-reduce over TP then EP sums them (identity backward), while the expert
input and the gates are identity forward and all-reduced in backward. So EP=1 and EP=e differ
only in the order of a sum.

The execution strategy owns routing decisions: the block hands the router probabilities to
``kv.route(moe_index, probs_TE, top_k)`` and gets the expert ids back (the top-k, or the replayed
routes of the rollouts), which also lets the engine record what the load-balancing loss needs.
Legend: T tokens, H hidden, E experts, K experts per token, F local expert ffn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def top_k_route(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The experts of the k largest probabilities [T, K] (HF's ``torch.topk`` order)."""
    return torch.topk(probs_TE, k, dim=-1).indices


def _tp_layers():
    from megatron.core.tensor_parallel import layers

    return layers


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


class _CopyToGroups(torch.autograd.Function):
    """Identity forward of (expert input, gates); backward all-reduces both grads (partial per rank)
    over each group, in one fixed order: two separate copies would leave their order to autograd,
    which differs between EP ranks (their expert graphs differ) and mismatches the collectives."""

    @staticmethod
    def forward(ctx, x_TH, gates_TK, groups):
        ctx.groups = groups
        return x_TH.view_as(x_TH), gates_TK.view_as(gates_TK)

    @staticmethod
    def backward(ctx, dx_TH, dgates_TK):
        dx_TH, dgates_TK = dx_TH.contiguous(), dgates_TK.contiguous()
        for g in ctx.groups:
            torch.distributed.all_reduce(dx_TH, group=g)
            torch.distributed.all_reduce(dgates_TK, group=g)
        return dx_TH, dgates_TK, None


def _reduce_from(x: torch.Tensor, groups) -> torch.Tensor:
    """All-reduce forward over each group (partial outputs); identity backward."""
    for g in groups:
        x = _mappings().reduce_from_tensor_model_parallel_region(x, group=g)
    return x


class MoEMLP(nn.Module):
    def __init__(self, cfg, moe_index: int, tp_group, ep_group, dtype, device):
        super().__init__()
        tp = tp_group.size()
        ep, ep_rank = (1, 0) if ep_group is None else (ep_group.size(), ep_group.rank())
        E, H, Fx = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.moe_index, self.top_k, self.norm_topk = moe_index, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.e_local = E // ep
        self.e_start = ep_rank * self.e_local
        self.groups = [g for g in (tp_group, ep_group) if g is not None and g.size() > 1]
        std = cfg.init_std
        empty = lambda *shape: nn.Parameter(torch.empty(shape, dtype=dtype, device=device).normal_(std=std))
        self.router = empty(E, H)  # replicated: HF mlp.gate.weight
        self.fc1 = empty(self.e_local, 2 * Fx // tp, H)  # [gate r; up r] per local expert
        self.fc2 = empty(self.e_local, H, Fx // tp)
        # megatron-core's marks: split over TP (the grad norm counts every TP rank's shard) and
        # expert-parallel (``allreduce=False``: the norm also sums them over the EP group)
        for p, dim in ((self.fc1, 1), (self.fc2, 2)):
            _tp_layers().set_tensor_model_parallel_attributes(p, True, dim, 1)
            p.allreduce = False

    def forward(self, x_TH: torch.Tensor, kv) -> torch.Tensor:
        # HF: logits in the model dtype, softmax in at least float32, gates back to the model dtype
        logits_TE = F.linear(x_TH, self.router)
        probs_TE = torch.softmax(logits_TE.to(torch.promote_types(x_TH.dtype, torch.float32)), dim=-1)
        experts_TK = kv.route(self.moe_index, probs_TE, self.top_k)
        gates_TK = probs_TE.gather(1, experts_TK)
        if self.norm_topk:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        x_TH, gates_TK = _CopyToGroups.apply(x_TH, gates_TK.to(x_TH.dtype), self.groups)
        return _reduce_from(self._experts(x_TH, experts_TK, gates_TK), self.groups)

    def _experts(self, x_TH, experts_TK, gates_TK):
        """This rank's partial output: its experts on the tokens routed to them, gate-weighted. It
        starts as 0 * (x, gates) rather than zeros so that every rank's backward reaches
        ``_CopyToGroups`` (its all-reduce), even a rank whose experts got no token."""
        out_TH = x_TH * 0 + (gates_TK * 0).sum(-1, keepdim=True)
        local_TK = experts_TK - self.e_start
        for e in range(self.e_local):
            tok, slot = torch.where(local_TK == e)
            if not len(tok):
                continue
            gate_NF, up_NF = F.linear(x_TH[tok], self.fc1[e]).chunk(2, dim=-1)
            y_NH = F.linear(F.silu(gate_NF) * up_NF, self.fc2[e])
            out_TH.index_add_(0, tok, y_NH * gates_TK[tok, slot, None])
        return out_TH
