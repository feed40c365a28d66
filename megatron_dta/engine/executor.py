"""Runs a Plan: forward, loss and backward of every unit, in DFS order for trees.

The DFS keeps, per layer, a K/V stack indexed by position id (the current root-to-leaf path) and a
gradient stack of the same shape. A unit reads its ancestors' K/V as leaves that require grad;
its own K/V goes onto the stack for its children; after all of its children ran their backward,
the gradients they left on the stack at its positions are injected into its own backward
together with its loss. A unit's graph is kept while the path's kept tokens fit
``activation_budget_tokens``; beyond that it runs without grad first (K/V only) and is recomputed
for its backward. Units without children run forward+backward at once. Traversal is an explicit
stack of generators: no recursion, so chains of thousands of nodes are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_dta.engine.plan import Plan, Unit


class ChunkKV:
    """KVContext of one unit: prefix K/V from the stack, own K/V recorded for the children."""

    def __init__(self, attention, spec, prefix_k=None, prefix_v=None, record: bool = False):
        self.attention, self.spec = attention, spec
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.record = record
        self.own_k, self.own_v = {}, {}

    def attend(self, layer, q_TND, k_TKD, v_TKD):
        if self.record:
            self.own_k[layer], self.own_v[layer] = k_TKD, v_TKD
        if self.prefix_k is not None:
            k_TKD = torch.cat([self.prefix_k[layer], k_TKD])  # [P + T, K, D]
            v_TKD = torch.cat([self.prefix_v[layer], v_TKD])
        return self.attention(q_TND, k_TKD, v_TKD, self.spec)


@dataclass
class StepOutput:
    loss: torch.Tensor  # 0-dim float64, sum over units
    logprobs: torch.Tensor  # flat float64 per token (seq_offset + position); entry 0 of each rollout = 0
    entropy: torch.Tensor  # flat float64
    stats: dict = field(default_factory=dict)
    recomputed_tokens: int = 0


class Executor:
    def __init__(self, model, attention, activation_budget_tokens: int = 1 << 20, device="cpu"):
        self.model, self.attention = model, attention
        self.budget = activation_budget_tokens
        self.device = device

    def _alloc_stacks(self, plan: Plan):
        m = self.model
        n_layers, k_local, d = len(m.layers), m.cfg.num_kv_heads // m.tp, m.cfg.head_dim  # this stage's layers
        shape = (max(plan.max_path, 1), k_local, d)
        # gradients of a prefix shared by k children are sums of k terms: accumulate them in at
        # least float32 (bf16 would round k times where dense rounds once)
        gdtype = torch.promote_types(m.dtype, torch.float32)

        def mk(dtype):
            return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]

        return mk(m.dtype), mk(m.dtype), mk(gdtype), mk(gdtype)

    def run(self, plan: Plan, table: dict, loss_fn=None, forward_only: bool = False) -> StepOutput:
        """Forward (+ backward unless ``forward_only``) of every unit; grads accumulate in params."""
        n_flat = len(table["mask"])
        # results accumulate on the device and come to the host once, at the end (no sync per unit)
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)
        out = StepOutput(zeros(), zeros(n_flat), zeros(n_flat))
        self._table = {k: v.to(self.device) for k, v in table.items()}
        self._loss_fn, self._out, self._forward_only = loss_fn, out, forward_only
        self._kept = 0
        self._stacks = self._alloc_stacks(plan) if plan.max_path else None
        for root in plan.roots:
            todo = [self._visit(root)]
            while todo:
                child = next(todo[-1], None)
                if child is None:
                    todo.pop()
                else:
                    todo.append(self._visit(child))
        self._stacks = None
        out.loss, out.logprobs, out.entropy = out.loss.cpu(), out.logprobs.cpu(), out.entropy.cpu()
        out.stats = {k: float(v) for k, v in out.stats.items()}
        return out

    # ---- one unit ---------------------------------------------------------------------------
    def _prefix_leaves(self, unit: Unit, grad: bool):
        if not unit.prefix_len:
            return None, None
        kst, vst, _, _ = self._stacks
        P = unit.prefix_len
        pk = [k[:P].detach().requires_grad_(grad) for k in kst]
        pv = [v[:P].detach().requires_grad_(grad) for v in vst]
        return pk, pv

    def _forward(self, unit: Unit, grad: bool, with_loss: bool, saved: ChunkKV | None = None):
        """``saved``: the context of the unit's first, no-grad pass when it is recomputed."""
        pk, pv = self._prefix_leaves(unit, grad)
        ctx = ChunkKV(self.attention, unit.spec, pk, pv, record=unit.has_children)
        loss = None
        with torch.set_grad_enabled(grad):
            hidden_TH = self._run_model(unit, ctx, saved)
            if with_loss and self._has_loss and len(unit.pair_target):
                loss = self._unit_loss(unit, hidden_TH)
        return ctx, loss, pk, pv

    # hooks a pipeline stage overrides (megatron_dta/pipeline.py)
    _has_loss = True  # this executor's model ends in the LM head

    def _run_model(self, unit: Unit, ctx: ChunkKV, saved: ChunkKV | None):
        dev = self.device
        return self.model(unit.input_ids.to(dev), unit.position_ids.to(dev), ctx)

    def _backward_roots(self, unit: Unit, ctx: ChunkKV, loss):
        """(tensors, grads) the unit's backward starts from, besides its own K/V."""
        if loss is not None and loss.requires_grad:
            return [loss], [torch.ones_like(loss)]
        return [], []

    def _after_backward(self, unit: Unit, ctx: ChunkKV) -> None:
        pass

    def _unit_loss(self, unit: Unit, hidden_TH):
        dev = self.device
        lp_P, ent_P = self.model.logprobs(hidden_TH[unit.pair_hidden.to(dev)], unit.pair_target.to(dev))
        ep, ef = unit.elem_pair.to(dev), unit.elem_flat.to(dev)
        lp_E, ent_E = lp_P[ep], ent_P[ep]
        self._out.logprobs[ef] = lp_E.detach().double()
        self._out.entropy[ef] = ent_E.detach().double()
        if self._forward_only or self._loss_fn is None:
            return None
        g = {k: v[ef] for k, v in self._table.items()}
        loss, stats = self._loss_fn.terms(lp_E, ent_E if self._loss_fn.needs_entropy else None, g)
        self._out.loss += loss.detach().double()
        for k, v in stats.items():
            self._out.stats[k] = self._out.stats.get(k, 0.0) + v.double()
        return loss

    def _push(self, ctx: ChunkKV, unit: Unit, seg: int):
        """Put segment ``seg`` and its in-unit ancestors' K/V on the stack at their positions and
        clear the gradients there; returns the (unit rows, stack positions) spans it covered."""
        kst, vst, gk, gv = self._stacks
        spans = []
        for a in unit.seg_chain[seg]:
            start, length = unit.seg_bounds[a]
            pos = unit.seg_pos[a]
            for layer in range(len(kst)):
                kst[layer][pos:pos + length] = ctx.own_k[layer][start:start + length].detach()
                vst[layer][pos:pos + length] = ctx.own_v[layer][start:start + length].detach()
                gk[layer][pos:pos + length].zero_()
                gv[layer][pos:pos + length].zero_()
            spans.append((slice(start, start + length), slice(pos, pos + length)))
        return spans

    def _visit(self, unit: Unit):
        if self._forward_only:
            with torch.no_grad():
                ctx, _, _, _ = self._forward(unit, grad=False, with_loss=True)
            for s, kids in enumerate(unit.children):
                if kids:
                    self._push(ctx, unit, s)
                    yield from kids
            unit.spec.cache.clear()
            return

        keep = not unit.has_children or self._kept + unit.num_tokens <= self.budget
        loss = pk = pv = None
        if keep:
            ctx, loss, pk, pv = self._forward(unit, grad=True, with_loss=True)
            self._kept += unit.num_tokens
        else:
            with torch.no_grad():
                ctx, _, _, _ = self._forward(unit, grad=False, with_loss=False)
        dkv = None
        if unit.has_children:
            _, _, gk, gv = self._stacks
            T = unit.num_tokens
            # [T, K, D] per layer; T (packed segments) may exceed the stack's path length
            dk = [g.new_zeros((T, *g.shape[1:])) for g in gk]
            dv = [g.new_zeros((T, *g.shape[1:])) for g in gv]
            for s, kids in enumerate(unit.children):
                if not kids:
                    continue
                spans = self._push(ctx, unit, s)
                yield from kids
                # children's prefix covered this segment and its in-unit ancestors: accumulate
                for rows, positions in spans:
                    for layer in range(len(gk)):
                        dk[layer][rows] += gk[layer][positions]
                        dv[layer][rows] += gv[layer][positions]
            dkv = (dk, dv)
        self._backward(unit, keep, ctx, loss, pk, pv, dkv)

    def _backward(self, unit, kept, ctx, loss, pk, pv, dkv):
        if not kept:
            ctx, loss, pk, pv = self._forward(unit, grad=True, with_loss=True, saved=ctx)
            self._out.recomputed_tokens += unit.num_tokens
        else:
            self._kept -= unit.num_tokens
        tensors, grads = self._backward_roots(unit, ctx, loss)
        self._autograd(tensors, grads, ctx, dkv)
        self._after_backward(unit, ctx)
        self._add_prefix_grads(unit, pk, pv)
        unit.spec.cache.clear()  # the unit is done: drop its prepared masks

    @staticmethod
    def _autograd(tensors, grads, ctx, dkv):
        """One backward of ``tensors`` (with ``grads``) and the children's dK/dV on the unit's own K/V."""
        if dkv is not None:
            for layer, (dk, dv) in enumerate(zip(*dkv)):
                k, v = ctx.own_k[layer], ctx.own_v[layer]
                tensors += [k, v]
                grads += [dk.to(k.dtype), dv.to(v.dtype)]
        if tensors:
            torch.autograd.backward(tensors, grads)

    def _add_prefix_grads(self, unit, pk, pv):
        """The grads this unit left on its ancestors' K/V go into the gradient stack."""
        if pk is not None:
            _, _, gk, gv = self._stacks
            P = unit.prefix_len
            for layer in range(len(gk)):
                if pk[layer].grad is not None:
                    gk[layer][:P] += pk[layer].grad
                if pv[layer].grad is not None:
                    gv[layer][:P] += pv[layer].grad
