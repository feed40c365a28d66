"""MoE routing under any execution order: expert choice (top-k or replayed), load, and the
per-rollout load-balancing loss, exact in dense, sparse and dta modes.

The load-balancing loss (docs/moe.md) is defined per rollout r and MoE layer l over the rollout's
tokens (n_r of them, every position), and averaged over the R rollouts of the global batch and the
M MoE layers:

    L_aux = c / (R M) * sum_r sum_l E * sum_e f[r,l,e] * P[r,l,e],
    f[r,l,e] = #{t in r: e in top_k_l(t)} / (n_r K)  (no gradient),  P[r,l,e] = sum_{t in r} p_l(t)_e / n_r.

It is linear in the router probabilities p, with coefficient
``dL/dp_l(t)_e = c E / (M K) * sum_{r contains t} count[r,l,e] / (R n_r^2)``. A token shared by k
rollouts is computed once but its coefficient sums the k rollouts' terms (the multiplicity
weight), so the value and every gradient equal the dense computation. The coefficient needs the
counts of whole rollouts: in the DFS a unit's backward runs after the forward of every unit of
every rollout through it (ancestors before it, descendants before its backward), so the counts
are complete exactly when needed; no pre-pass. Counts are taken once per unit, on its first
forward (a recomputed unit routes the same tokens the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_dta.errors import UserError
from megatron_dta.forest import common_prefix_length
from megatron_dta.model.moe import top_k_route


@dataclass
class MoEState:
    """One run's routing state: counts per (rollout, MoE layer, expert), tokens per expert."""

    num_experts: int
    top_k: int
    coef: float  # c E / (M K)
    weight_R: torch.Tensor  # [R] float64: 1 / (R_global n_r^2)
    counts_RME: torch.Tensor  # [R, M, E] float64
    load_ME: torch.Tensor  # [M, E] float64: tokens computed (unique) per expert
    routes_NMK: torch.Tensor | None = None  # replayed expert ids per flat token, or None

    @classmethod
    def create(cls, cfg, lengths: list[int], num_rollouts: int | None, routes, device) -> MoEState:
        """``num_rollouts``: R of the global batch (all DP ranks and microbatches); default this batch's."""
        M, E, K = len(cfg.moe_layers), cfg.num_experts, cfg.num_experts_per_tok
        R = num_rollouts or len(lengths)
        n = torch.tensor(lengths, dtype=torch.float64, device=device)
        return cls(
            E,
            K,
            cfg.router_aux_loss_coef * E / (M * K),
            1.0 / (R * n * n),
            torch.zeros(len(lengths), M, E, dtype=torch.float64, device=device),
            torch.zeros(M, E, dtype=torch.float64, device=device),
            routes,
        )

    def stats(self) -> dict[str, torch.Tensor]:
        """Tokens per expert of each MoE layer in this run: max and mean over experts."""
        out = {}
        for m in range(self.load_ME.shape[0]):
            out[f"moe_load_max.{m}"] = self.load_ME[m].max()
            out[f"moe_load_mean.{m}"] = self.load_ME[m].mean()
        return out


@dataclass
class UnitRouter:
    """The routing of one unit's forward: what each MoE layer chose and its probabilities."""

    state: MoEState
    tok_row: torch.Tensor  # [P] (row, rollout) pairs: every (rollout, position) of the unit once
    tok_seq: torch.Tensor  # [P]
    replay_TMK: torch.Tensor | None
    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    experts: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_unit(cls, state: MoEState, unit, device) -> UnitRouter:
        row, seq = unit.tok_row.to(device), unit.tok_seq.to(device)
        replay = None
        if state.routes_NMK is not None:
            flat = state.routes_NMK[unit.tok_flat.to(device)]  # [P, M, K]
            replay = flat.new_empty((unit.num_tokens, *flat.shape[1:]))
            replay[row] = flat  # rollouts sharing a token carry the same routes (checked at load)
        return cls(state, row, seq, replay)

    def route(self, moe_index: int, probs_TE: torch.Tensor, top_k: int) -> torch.Tensor:
        experts_TK = (
            top_k_route(probs_TE, top_k) if self.replay_TMK is None else self.replay_TMK[:, moe_index]
        )
        self.probs[moe_index], self.experts[moe_index] = probs_TE, experts_TK
        return experts_TK

    def count(self) -> None:
        """Add this unit's routes to the per-rollout counts and the per-expert load."""
        s = self.state
        for m, experts_TK in self.experts.items():
            idx_PK = experts_TK[self.tok_row]
            seq_PK = self.tok_seq[:, None].expand_as(idx_PK)
            ones = torch.ones(idx_PK.shape, dtype=torch.float64, device=idx_PK.device)
            s.counts_RME.index_put_((seq_PK, torch.full_like(idx_PK, m), idx_PK), ones, accumulate=True)
            s.load_ME[m].index_add_(0, experts_TK.reshape(-1), ones.new_ones(experts_TK.numel()))

    def aux_roots(self):
        """(probs tensors, their loss coefficients, the aux loss value of this unit's tokens)."""
        s = self.state
        tensors, grads, value = [], [], torch.zeros((), dtype=torch.float64, device=s.counts_RME.device)
        if s.coef == 0:
            return tensors, grads, value
        w_P = s.weight_R[self.tok_seq][:, None]
        for m, probs_TE in self.probs.items():
            coef_TE = torch.zeros(probs_TE.shape, dtype=torch.float64, device=probs_TE.device)
            coef_TE.index_add_(0, self.tok_row, w_P * s.counts_RME[self.tok_seq, m])
            coef_TE *= s.coef
            value = value + (probs_TE.detach().double() * coef_TE).sum()
            if probs_TE.requires_grad:
                tensors.append(probs_TE)
                grads.append(coef_TE.to(probs_TE.dtype))
        return tensors, grads, value


def routes_table(rollouts) -> torch.Tensor | None:
    """Flat [N, M, K] replayed routes of the batch (rollouts concatenated), or None without replay."""
    if rollouts[0].routed_experts is None:
        return None
    return torch.from_numpy(np.concatenate([r.routed_experts for r in rollouts]).astype(np.int64))


def check_routes(rollouts, cfg) -> None:
    """Replayed routes fit the model (MoE layers, top-k, expert ids) and are in all rollouts or none."""
    have = [r.routed_experts is not None for r in rollouts]
    if any(have) and not all(have):
        i = have.index(not have[0])
        raise UserError(
            f"{_where(rollouts, i)}: field 'routed_experts': routing replay needs routes in every rollout of "
            "the batch or in none"
        )
    M, K, E = len(cfg.moe_layers), cfg.num_experts_per_tok, cfg.num_experts
    for i, r in enumerate(rollouts):
        if r.routed_experts is None:
            continue
        if r.routed_experts.shape[1:] != (M, K):
            raise UserError(
                f"{_where(rollouts, i)}: field 'routed_experts': {r.routed_experts.shape[1]} MoE layers x "
                f"{r.routed_experts.shape[2]} experts per token, but the model has {M} x {K}"
            )
        if r.routed_experts.max() >= E:
            j, m, _ = np.argwhere(r.routed_experts >= E)[0]
            raise UserError(
                f"{_where(rollouts, i)}: field 'routed_experts': expert id {r.routed_experts[j, m].max()} "
                f"at position {j}, MoE layer {m} is not below num_experts = {E}"
            )


def _where(rollouts, i: int) -> str:
    return rollouts[i].source or f"rollout {i}"


def find_route_conflict(rollouts):
    """The first (rollout a < rollout b, position, MoE layer) where two rollouts share the tokens up to
    and including ``position`` but replay different routes there; None if there is none. Neighbours
    in sorted order suffice: the common prefix of any two is that of every neighbour pair between."""
    seqs = [r.input_ids for r in rollouts]
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].tolist())
    for a, b in zip(order, order[1:]):
        n = common_prefix_length(seqs[a], seqs[b])
        differ_LM = (rollouts[a].routed_experts[:n] != rollouts[b].routed_experts[:n]).any(-1)
        if differ_LM.any():
            j, m = np.argwhere(differ_LM)[0]
            return min(a, b), max(a, b), int(j), int(m)
    return None


def refuse_route_conflicts(rollouts) -> None:
    hit = find_route_conflict(rollouts)
    if hit is not None:
        a, b, j, m = hit
        mine, theirs = rollouts[b].routed_experts[j, m].tolist(), rollouts[a].routed_experts[j, m].tolist()
        raise UserError(
            f"{_where(rollouts, b)}: field 'routed_experts': position {j}, MoE layer {m}: routes "
            f"{mine} differ from {theirs} in {_where(rollouts, a)}, which shares the tokens up to there; set "
            "engine.route_conflicts=split to give each its own copy from the first conflicting token"
        )


def route_keys(rollouts) -> tuple[list[np.ndarray], torch.Tensor]:
    """Sequences of (token, routes) keys, and the key -> token table: a prefix forest built on the
    keys shares a token only where the routes agree too, so it splits a node at the first token
    whose routes conflict (engine.route_conflicts=split)."""
    rows = np.concatenate(
        [np.column_stack([r.input_ids, r.routed_experts.reshape(len(r), -1)]) for r in rollouts]
    )
    uniq, keys = np.unique(rows, axis=0, return_inverse=True)
    splits = np.cumsum([len(r) for r in rollouts])[:-1]
    return np.split(keys.reshape(-1).astype(np.int64), splits), torch.from_numpy(uniq[:, 0].astype(np.int64))


def relabel_tokens(plan, key_to_token: torch.Tensor) -> None:
    """Turn a plan built on route keys back into token ids (inputs and targets)."""
    for unit, _ in plan.events(forward_only=True):
        unit.input_ids = key_to_token[unit.input_ids]
        unit.pair_target = key_to_token[unit.pair_target]
