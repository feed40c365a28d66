"""Runs a Plan: forward, loss and backward of every unit, in DFS order for trees.

The DFS keeps, per layer, a K/V stack indexed by position id (the current root-to-leaf path) and a
gradient stack of the same shape. A unit reads its ancestors' K/V as leaves that require grad;
its own K/V goes onto the stack for its children; after all of its children ran their backward,
the gradients they left on the stack at its positions are injected into its own backward
together with its loss. A unit's graph is kept while the path's kept tokens fit
``activation_budget_tokens`` (or as the plan chose under ``engine.memory_budget_mib``); beyond
that it runs without grad first (K/V only) and is recomputed for its backward. Units without
children run forward+backward at once. Traversal is an explicit stack of generators: no
recursion, so chains of thousands of nodes are fine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_dta.engine.plan import Plan, Unit
from megatron_dta.engine.routing import MoEState, UnitRouter
from megatron_dta.model.moe import top_k_route


class _GatherRows(torch.autograd.Function):
    """``x_TH[index_P]`` whose backward sums each row's gradients in at least float32: a fork's last
    row predicts the first token of every child (one pair per child), and a bfloat16 index backward
    would round that sum once per child, where dense, one pair per rollout, never sums."""

    @staticmethod
    def forward(ctx, x_TH, index_P):
        ctx.save_for_backward(index_P)
        ctx.rows = x_TH.shape[0]
        return x_TH[index_P]

    @staticmethod
    def backward(ctx, grad_PH):
        (index_P,) = ctx.saved_tensors
        acc_TH = grad_PH.new_zeros(
            (ctx.rows, *grad_PH.shape[1:]), dtype=torch.promote_types(grad_PH.dtype, torch.float32)
        )
        return acc_TH.index_add_(0, index_P, grad_PH.to(acc_TH.dtype)).to(grad_PH.dtype), None


class ChunkKV:
    """KVContext of one unit: prefix K/V from the stack, own K/V recorded for the children."""

    def __init__(self, attention, spec, prefix_k=None, prefix_v=None, record: bool = False, router=None):
        self.attention, self.spec = attention, spec
        self.prefix_k, self.prefix_v = prefix_k, prefix_v
        self.record = record
        self.own_k, self.own_v = {}, {}
        self.router = router  # UnitRouter of an MoE model

    def route(self, moe_index, probs_TE, top_k):
        if self.router is None:
            return top_k_route(probs_TE, top_k)
        return self.router.route(moe_index, probs_TE, top_k)

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


@dataclass
class Run:
    """The state of one plan's traversal; several runs may be alive at once (pipeline stages
    interleave microbatches), each with its own stacks and results."""

    plan: Plan
    table: dict
    loss_fn: object
    forward_only: bool
    out: StepOutput
    kept: int = 0  # tokens whose graph is kept on this run's DFS path
    stacks: tuple | None = None
    events: object = None  # generator: each next() performs one event and yields (unit, is_backward)
    moe: MoEState | None = None  # routing counts of an MoE model (engine/routing.py)


class Executor:
    def __init__(self, model, attention, activation_budget_tokens: int = 1 << 20, device="cpu"):
        self.model, self.attention = model, attention
        self.budget = activation_budget_tokens
        self.device = device

    def _alloc_stacks(self, plan: Plan):
        m = self.model
        n_layers, k_local, d = (
            len(m.layers),
            m.cfg.num_kv_heads // m.tp,
            m.cfg.head_dim,
        )  # this stage's layers
        shape = (max(plan.max_path, 1), k_local, d)
        # gradients of a prefix shared by k children are sums of k terms: accumulate them in at
        # least float32 (bf16 would round k times where dense rounds once)
        gdtype = torch.promote_types(m.dtype, torch.float32)

        def mk(dtype):
            return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]

        return mk(m.dtype), mk(m.dtype), mk(gdtype), mk(gdtype)

    def start(
        self, plan: Plan, table: dict, loss_fn=None, forward_only: bool = False, moe: MoEState | None = None
    ) -> Run:
        """A run of the plan: forward (+ backward unless ``forward_only``) of every unit, gradients
        accumulating in the parameters. Its ``events`` perform the plan's events
        (``plan.events(forward_only)``) one per ``next()``; nothing is computed or allocated before
        the first; ``finish`` returns the results once they are exhausted."""
        n_flat = len(table["mask"])
        # results accumulate on the device and come to the host once, in finish (no sync per unit)
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)
        r = Run(
            plan,
            {k: v.to(self.device) for k, v in table.items()},
            loss_fn,
            forward_only,
            StepOutput(zeros(), zeros(n_flat), zeros(n_flat)),
            moe=moe,
        )
        r.events = self._traverse(r)
        return r

    def finish(self, r: Run) -> StepOutput:
        out = r.out
        out.loss, out.logprobs, out.entropy = out.loss.cpu(), out.logprobs.cpu(), out.entropy.cpu()
        if r.moe is not None:
            out.stats.update(r.moe.stats())
        out.stats = {k: float(v) for k, v in out.stats.items()}
        return out

    def _traverse(self, r: Run):
        """DFS over the plan's units as an explicit stack of generators (no recursion): a unit's
        generator yields its child units to descend into, and (unit, is_backward) after each event."""
        r.stacks = self._alloc_stacks(r.plan) if r.plan.max_path else None
        for root in r.plan.roots:
            todo = [self._visit(r, root)]
            while todo:
                item = next(todo[-1], None)
                if item is None:
                    todo.pop()
                elif isinstance(item, Unit):
                    todo.append(self._visit(r, item))
                else:
                    yield item
        r.stacks = None

    # ---- one unit ---------------------------------------------------------------------------
    def _prefix_leaves(self, r: Run, unit: Unit, grad: bool):
        if not unit.prefix_len:
            return None, None
        kst, vst, _, _ = r.stacks
        P = unit.prefix_len
        pk = [k[:P].detach().requires_grad_(grad) for k in kst]
        pv = [v[:P].detach().requires_grad_(grad) for v in vst]
        return pk, pv

    def _forward(self, r: Run, unit: Unit, grad: bool, with_loss: bool, saved: ChunkKV | None = None):
        """``saved``: the context of the unit's first, no-grad pass when it is recomputed."""
        pk, pv = self._prefix_leaves(r, unit, grad)
        router = None if r.moe is None else UnitRouter.of_unit(r.moe, unit, self.device)
        ctx = self._context(unit, pk, pv, router)
        loss = None
        with torch.set_grad_enabled(grad):
            hidden_TH = self._run_model(unit, ctx, saved)
            if with_loss and self._has_loss and len(unit.pair_target):
                loss = self._unit_loss(r, unit, hidden_TH)
        if router is not None and saved is None:  # a recomputation routes the same tokens again
            router.count()
        return ctx, loss, pk, pv

    # hooks a pipeline stage overrides (megatron_dta/pipeline.py), and context parallelism
    # (megatron_dta/engine/context_parallel.py)
    _has_loss = True  # this executor's model ends in the LM head

    def _context(self, unit: Unit, pk, pv, router=None) -> ChunkKV:
        return ChunkKV(self.attention, unit.spec, pk, pv, record=unit.has_children, router=router)

    def _own_rows(self, unit: Unit) -> int:
        """Rows of ``unit`` this rank runs through the model."""
        return unit.num_tokens

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

    def _unit_loss(self, r: Run, unit: Unit, hidden_TH):
        dev = self.device
        hidden_PH = _GatherRows.apply(hidden_TH, unit.pair_hidden.to(dev))
        lp_P, ent_P = self.model.logprobs(hidden_PH, unit.pair_target.to(dev))
        ep, ef = unit.elem_pair.to(dev), unit.elem_flat.to(dev)
        lp_E, ent_E = lp_P[ep], ent_P[ep]
        r.out.logprobs[ef] = lp_E.detach().double()
        r.out.entropy[ef] = ent_E.detach().double()
        if r.forward_only or r.loss_fn is None:
            return None
        g = {k: v[ef] for k, v in r.table.items()}
        loss, stats = r.loss_fn.terms(lp_E, ent_E if r.loss_fn.needs_entropy else None, g)
        r.out.loss += loss.detach().double()
        for k, v in stats.items():
            r.out.stats[k] = r.out.stats.get(k, 0.0) + v.double()
        return loss

    def _chain(self, unit: Unit, seg: int):
        """(unit rows, stack positions) of segment ``seg`` and its in-unit ancestors: the positions
        are one contiguous span of the path; the rows are a slice when contiguous in the unit too."""
        chain = unit.seg_chain[seg]
        p0 = unit.seg_pos[chain[0]]
        spans = [unit.seg_bounds[a] for a in chain]
        n = sum(length for _, length in spans)
        assert unit.seg_pos[seg] + unit.seg_bounds[seg][1] == p0 + n, "in-unit ancestors must tile the path"
        if all(spans[i][0] + spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1)):
            rows = slice(spans[0][0], spans[0][0] + n)
        else:
            rows = torch.cat([torch.arange(a, a + length) for a, length in spans]).to(self.device)
        return rows, slice(p0, p0 + n)

    def _push(self, r: Run, ctx: ChunkKV, unit: Unit, seg: int):
        """Put segment ``seg`` and its in-unit ancestors' K/V on the stack at their positions (one
        copy per layer) and clear the gradients there; returns the (rows, positions) covered."""
        kst, vst, gk, gv = r.stacks
        rows, pos = self._chain(unit, seg)
        for layer in range(len(kst)):
            kst[layer][pos] = ctx.own_k[layer][rows].detach()
            vst[layer][pos] = ctx.own_v[layer][rows].detach()
            gk[layer][pos].zero_()
            gv[layer][pos].zero_()
        return rows, pos

    def _visit(self, r: Run, unit: Unit):
        """Generator of one unit: yields (unit, False) after its forward, its child units (the
        traversal descends into them), and (unit, True) after its backward."""
        if r.forward_only:
            with torch.no_grad():
                ctx, _, _, _ = self._forward(r, unit, grad=False, with_loss=True)
            yield unit, False
            for s, kids in enumerate(unit.children):
                if kids:
                    self._push(r, ctx, unit, s)
                    yield from kids
            unit.spec.cache.clear()
            return

        keep = not unit.has_children or self._keeps(r, unit)
        loss = pk = pv = None
        if keep:
            ctx, loss, pk, pv = self._forward(r, unit, grad=True, with_loss=True)
            r.kept += unit.num_tokens
        else:
            with torch.no_grad():
                ctx, _, _, _ = self._forward(r, unit, grad=False, with_loss=False)
            unit.spec.cache.clear()  # its masks ([T, P + T]) are rebuilt by the recompute, not held
        yield unit, False
        dkv = None
        if unit.has_children:
            _, _, gk, gv = r.stacks
            T = self._own_rows(unit)
            # [T, K, D] per layer; T (packed segments) may exceed the stack's path length
            dk = [g.new_zeros((T, *g.shape[1:])) for g in gk]
            dv = [g.new_zeros((T, *g.shape[1:])) for g in gv]
            for s, kids in enumerate(unit.children):
                if not kids:
                    continue
                rows, pos = self._push(r, ctx, unit, s)
                yield from kids
                # children's prefix covered this segment and its in-unit ancestors: accumulate
                for layer in range(len(gk)):
                    dk[layer][rows] += gk[layer][pos]
                    dv[layer][rows] += gv[layer][pos]
            dkv = (dk, dv)
        self._backward(r, unit, keep, ctx, loss, pk, pv, dkv)
        yield unit, True

    def _keeps(self, r: Run, unit: Unit) -> bool:
        """Whether a parent keeps its graph: as the plan chose under a memory budget
        (``engine/memory.py``), else while the path's kept tokens fit the token budget."""
        chosen = r.plan.extra.get("keep")
        if chosen is not None:
            return id(unit) in chosen
        return r.kept + unit.num_tokens <= self.budget

    def _backward(self, r: Run, unit, kept, ctx, loss, pk, pv, dkv):
        if not kept:
            ctx, loss, pk, pv = self._forward(r, unit, grad=True, with_loss=True, saved=ctx)
            r.out.recomputed_tokens += unit.num_tokens
        else:
            r.kept -= unit.num_tokens
        tensors, grads = self._backward_roots(unit, ctx, loss)
        if ctx.router is not None:
            self._add_aux_loss(r, ctx.router, tensors, grads)
        self._autograd(tensors, grads, ctx, dkv)
        self._after_backward(unit, ctx)
        self._add_prefix_grads(r, unit, pk, pv)
        unit.spec.cache.clear()  # the unit is done: drop its prepared masks

    @staticmethod
    def _add_aux_loss(r: Run, router: UnitRouter, tensors, grads) -> None:
        """The load-balancing loss of the unit's tokens joins its backward (engine/routing.py)."""
        aux_tensors, aux_grads, value = router.aux_roots()
        tensors += aux_tensors
        grads += aux_grads
        r.out.loss += value
        r.out.stats["aux_loss"] = r.out.stats.get("aux_loss", 0.0) + value

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

    def _add_prefix_grads(self, r: Run, unit, pk, pv):
        """The grads this unit left on its ancestors' K/V go into the gradient stack."""
        if pk is not None:
            _, _, gk, gv = r.stacks
            P = len(pk[0])  # the unit's prefix_len, or this rank's share of it (context parallelism)
            for layer in range(len(gk)):
                if pk[layer].grad is not None:
                    gk[layer][:P] += pk[layer].grad
                if pv[layer].grad is not None:
                    gv[layer][:P] += pv[layer].grad
