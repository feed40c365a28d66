"""Context parallelism: C ranks (the layout's ``cp_group``) share every unit's tokens and every stack.

Each unit's own rows are split over the C ranks by the zig-zag of causal context parallelism
(``zigzag_rows``: 2C equal chunks, rank r takes chunks r and 2C-1-r, so every rank holds early and
late queries of the causal triangle); a unit shorter than 2C tokens leaves some ranks without rows,
and they still take part in every collective. A rank runs the model on its rows only: linear layers,
norms, the LM head and the loss see ~1/C of the tokens. Attention (``_GatherAttend``) all-gathers
the unit's keys, the ancestors' (prefix) K/V from the ranks that own them and the unit's own K/V,
attends its queries under its rows of the mask and, in a unit whose graph waits for its children,
drops the gathered copy: the backward gathers again and recomputes the attention of its queries.
Every K/V gradient is summed over the group, each rank keeping the gradients of the positions it
owns. So nothing of full path size is kept along the path: a kept unit saves this rank's queries and
K/V shards. Leaf units and recomputed ones, whose graph is freed right after their forward, keep
their gathered keys until their backward (no recompute).

The DFS stacks are sharded by position (``ShardedStacks``): a rank stores the K/V, and receives the
K/V gradients, of the path positions it computed. Its rows follow path order, so the positions below
p that it owns are its first rows and an ancestor prefix is a view, as in the unsharded executor.
The gathers are all-reduces of zero-padded buffers (x + 0 is exact), so every rank sees bit-equal
K/V; gradients and results are sums over ranks of disjoint parts, exact up to summation order.
Parameter gradients are partial sums per rank: the caller reduces them over DP x CP
(``ParallelLayout.grad_group``), as for data parallelism. Logprobs, entropy, loss and stats are
summed over the group in ``finish``, so every CP rank returns the whole unit's results.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from megatron_dta.attention import masked_attention
from megatron_dta.engine.executor import ChunkKV, Executor, Run, StepOutput
from megatron_dta.engine.plan import Plan, Unit


def zigzag_rows(num_tokens: int, cp: int, rank: int) -> np.ndarray:
    """Rows of a unit of ``num_tokens`` that CP rank ``rank`` of ``cp`` computes (sorted)."""
    bounds = [num_tokens * i // (2 * cp) for i in range(2 * cp + 1)]
    late = 2 * cp - 1 - rank
    return np.r_[bounds[rank] : bounds[rank + 1], bounds[late] : bounds[late + 1]].astype(np.int64)


class ShardedStacks:
    """This rank's share of the DFS stacks, per layer: K, V and their gradients [rows, K, D] for the
    path positions it computed. ``slot[pos]`` is the row of path position ``pos`` (-1: another
    rank's). Rows follow path order, so the positions below p owned here are rows [0, owned_below(p))."""

    def __init__(self, layers: int, tail: tuple, dtype, gdtype, max_path: int, cp: int, device):
        rows = -(-max_path // cp) + 1
        mk = lambda dt: [torch.zeros((rows, *tail), dtype=dt, device=device) for _ in range(layers)]
        self.k, self.v, self.gk, self.gv = mk(dtype), mk(dtype), mk(gdtype), mk(gdtype)
        self.slot = np.full(max_path, -1, dtype=np.int64)

    def __iter__(self):
        return iter((self.k, self.v, self.gk, self.gv))

    def owned_below(self, p: int) -> np.ndarray:
        """Path positions below ``p`` owned here, in row order."""
        return np.flatnonzero(self.slot[:p] >= 0)

    def claim(self, p0: int, n: int, owned: np.ndarray) -> torch.Tensor:
        """Rows for the chain at positions [p0, p0 + n), of which ``owned`` (bool [n]) are computed
        here; positions from p0 on belonged to the previous branch and are released."""
        first = int((self.slot[:p0] >= 0).sum())
        count = int(owned.sum())
        self.slot[p0 : p0 + n] = -1
        self.slot[p0 + np.flatnonzero(owned)] = np.arange(first, first + count)
        self._grow(first + count)
        return torch.arange(first, first + count, device=self.k[0].device)

    def _grow(self, rows: int) -> None:
        """Doubles the row capacity when a rank owns more than its even share (short units)."""
        have = self.k[0].shape[0]
        if rows <= have:
            return
        for stack in self:
            for i, t in enumerate(stack):
                stack[i] = torch.cat([t, t.new_zeros((max(rows, 2 * have) - have, *t.shape[1:]))])


def _gather(group, total: int, index: torch.Tensor, parts_2NKD: torch.Tensor) -> torch.Tensor:
    """[2, total, K, D]: every rank's rows ``parts`` at its ``index``, summed over ``group`` (each row
    has one owner and zeros elsewhere, so the sum is the exact value)."""
    buf = parts_2NKD.new_zeros((2, total, *parts_2NKD.shape[2:]))
    buf[:, index] = parts_2NKD
    dist.all_reduce(buf, group=group)
    return buf


class _GatherAttend(torch.autograd.Function):
    """This rank's queries over the unit's keys ``[prefix ; own]``, gathered from their owners. For a
    unit whose graph waits for its children it saves only local tensors, and the backward gathers
    again and recomputes; otherwise (``keep_gathered``: a leaf unit, a recomputed one) the graph
    lives only until the unit's backward, right after, and keeps the gathered keys."""

    @staticmethod
    def forward(ctx, q_TND, pk_PKD, pv_PKD, k_TKD, v_TKD, keys, keep_gathered: bool):
        ctx.save_for_backward(q_TND, k_TKD, v_TKD)
        # views of the stack shard, whose later rows the children overwrite (in place, so not
        # saved_tensors); the rows below the prefix stay as they are until this unit is done
        ctx.prefix, ctx.keys, ctx.graph = (pk_PKD, pv_PKD), keys, None
        kv_2SKD = keys.gather(pk_PKD, pv_PKD, k_TKD, v_TKD)
        if not keep_gathered:
            return keys.attend(q_TND, kv_2SKD)
        # the graph is freed as soon as the unit's backward ran: keep the gathered keys, no recompute
        ctx.graph = _CPContext.attention_graph(keys, q_TND, kv_2SKD)
        return ctx.graph[0].detach()

    @staticmethod
    def backward(ctx, dout_TND):
        q_TND, k_TKD, v_TKD = ctx.saved_tensors
        (pk_PKD, pv_PKD), keys = ctx.prefix, ctx.keys
        out, q, kv_2SKD = ctx.graph or _CPContext.attention_graph(
            keys, q_TND, keys.gather(pk_PKD, pv_PKD, k_TKD, v_TKD)
        )
        ctx.graph = None
        # no query rows here: the K/V gradient is zeros, which this rank adds to the others'
        dq_TND, dkv_2SKD = torch.autograd.grad(
            out, (q, kv_2SKD), dout_TND, allow_unused=True, materialize_grads=True
        )
        dist.all_reduce(dkv_2SKD, group=keys.group)
        mine = dkv_2SKD[:, keys.index].to(k_TKD.dtype)  # [2, P_local + T_local, K, D]
        nP = pk_PKD.shape[0]
        return dq_TND, mine[0, :nP], mine[1, :nP], mine[0, nP:], mine[1, nP:], None, None


@dataclasses.dataclass
class _Keys:
    """Which keys a CP rank's rows of one unit see and which it owns (no tensor of the graph: a
    Function's context that held the unit's context would keep the graph alive in a cycle)."""

    group: object
    spec: object  # the unit's AttnSpec
    rows: torch.Tensor  # this rank's query rows of the unit
    index: torch.Tensor  # positions in the gathered keys [prefix ; own] of this rank's K/V rows
    short_lived: bool  # the unit's graph is freed right after its backward (no children wait)

    def gather(self, pk_PKD, pv_PKD, k_TKD, v_TKD) -> torch.Tensor:
        parts = torch.stack([torch.cat([pk_PKD, k_TKD]), torch.cat([pv_PKD, v_TKD])]).detach()
        return _gather(self.group, self.spec.prefix_len + self.spec.own_len, self.index, parts)

    def attend(self, q_TND, kv_2SKD) -> torch.Tensor:
        if q_TND.shape[0] == 0:
            return q_TND.clone()
        mask = self.spec.full_mask(q_TND.device, self.rows)  # built per call: [rows, P + T] is not kept
        return masked_attention(q_TND, kv_2SKD[0], kv_2SKD[1], mask)


class _CPContext(ChunkKV):
    """KVContext of this rank's rows of one unit: prefix K/V shards from the sharded stack, own K/V
    recorded (this rank's rows) for the children."""

    def __init__(self, spec, pk, pv, record: bool, keys: _Keys):
        super().__init__(None, spec, pk, pv, record)
        self.keys = keys

    def attend(self, layer, q_TND, k_TKD, v_TKD):
        if self.record:
            self.own_k[layer], self.own_v[layer] = k_TKD, v_TKD
        pk = self.prefix_k[layer] if self.prefix_k is not None else k_TKD[:0]
        pv = self.prefix_v[layer] if self.prefix_v is not None else v_TKD[:0]
        keep = self.keys.short_lived and torch.is_grad_enabled()
        return _GatherAttend.apply(q_TND, pk, pv, k_TKD, v_TKD, self.keys, keep)

    @staticmethod
    def attention_graph(keys: _Keys, q_TND, kv_2SKD):
        """(output, query leaf, key leaf) of this rank's attention, with its autograd graph."""
        q, kv_2SKD = q_TND.detach().requires_grad_(), kv_2SKD.detach().requires_grad_()
        with torch.enable_grad():
            return keys.attend(q, kv_2SKD), q, kv_2SKD


class CPExecutor(Executor):
    """The DFS executor with every unit split over the ``group``'s ranks (module docstring)."""

    def __init__(self, model, activation_budget_tokens: int, device, group):
        # Executor's, by name: a pipeline stage under CP (pipeline.CPStageExecutor) puts the stage
        # executor, with another constructor, between this class and Executor
        Executor.__init__(self, model, None, activation_budget_tokens, device)
        self.group, self.cp, self.cp_rank = group, dist.get_world_size(group), dist.get_rank(group)
        self._views: dict[int, tuple[Unit, np.ndarray]] = {}

    def _rows(self, unit: Unit) -> np.ndarray:
        """This rank's rows of ``unit`` (or of its view): the zig-zag, its rank roles rotated by the
        unit's depth so that a chain of units shorter than 2C tokens spreads over the ranks too."""
        return zigzag_rows(unit.spec.own_len, self.cp, (self.cp_rank + unit.prefix_len) % self.cp)

    def _local(self, unit: Unit) -> tuple[Unit, np.ndarray]:
        """(this rank's view of ``unit``: its rows, pairs and loss elements; the rows)."""
        key = id(unit)
        if key not in self._views:
            rows = self._rows(unit)
            local = np.full(unit.num_tokens, -1, dtype=np.int64)
            local[rows] = np.arange(len(rows))
            pair_row = local[unit.pair_hidden.numpy()]
            keep = pair_row >= 0
            renumber = np.cumsum(keep) - 1
            elem_keep = keep[unit.elem_pair.numpy()]
            t = torch.from_numpy
            view = dataclasses.replace(
                unit,
                input_ids=unit.input_ids[t(rows)],
                position_ids=unit.position_ids[t(rows)],
                pair_hidden=t(pair_row[keep]),
                pair_target=unit.pair_target[t(keep)],
                elem_pair=t(renumber[unit.elem_pair.numpy()[elem_keep]]),
                elem_flat=unit.elem_flat[t(elem_keep)],
            )
            self._views[key] = (view, rows)
        return self._views[key]

    def _alloc_stacks(self, plan: Plan):
        m = self.model
        tail = (m.cfg.num_kv_heads // m.tp, m.cfg.head_dim)
        gdtype = torch.promote_types(m.dtype, torch.float32)  # as Executor._alloc_stacks
        return ShardedStacks(len(m.layers), tail, m.dtype, gdtype, plan.max_path, self.cp, self.device)

    def _prefix_leaves(self, r: Run, unit: Unit, grad: bool):
        if not unit.prefix_len:
            return None, None
        n = len(r.stacks.owned_below(unit.prefix_len))
        return (
            [k[:n].detach().requires_grad_(grad) for k in r.stacks.k],
            [v[:n].detach().requires_grad_(grad) for v in r.stacks.v],
        )

    def _forward(self, r: Run, unit: Unit, grad: bool, with_loss: bool, saved=None):
        # _context reads the stacks' ownership, and whether the graph waits for children: a kept
        # unit's does (recompute in the backward keeps it small); a leaf's or a recomputed one's not
        self._run, self._short_lived = r, saved is not None or not unit.has_children
        return super()._forward(r, self._local(unit)[0], grad, with_loss, saved)

    def _context(self, unit: Unit, pk, pv, router=None) -> _CPContext:
        assert router is None, "CP with an MoE model is refused by the config"
        rows = self._rows(unit)  # ``unit`` is this rank's view
        prefix = self._run.stacks.owned_below(unit.prefix_len) if unit.prefix_len else rows[:0]
        dev = lambda a: torch.from_numpy(a).to(self.device)
        index = dev(np.concatenate([prefix, unit.prefix_len + rows]))
        keys = _Keys(self.group, unit.spec, dev(rows), index, self._short_lived)
        return _CPContext(unit.spec, pk, pv, unit.has_children, keys)

    def _own_rows(self, unit: Unit) -> int:
        return len(self._local(unit)[1])

    def _run_model(self, unit: Unit, ctx, saved):
        ctx.hidden = super()._run_model(unit, ctx, saved)
        return ctx.hidden

    def _backward_roots(self, unit: Unit, ctx, loss):
        """Every rank runs every unit's backward, with or without loss rows here: the attention
        backward of each layer is a collective, and other ranks' queries saw this rank's K/V."""
        tensors, grads = super()._backward_roots(unit, ctx, loss)
        return [*tensors, ctx.hidden], [*grads, torch.zeros_like(ctx.hidden)]

    def _push(self, r: Run, ctx, unit: Unit, seg: int):
        """Put this rank's rows of segment ``seg`` and its in-unit ancestors on its stack shard;
        returns (its rows in the unit view, their stack rows)."""
        _, rows = self._local(unit)
        chain_rows, pos = self._chain(unit, seg)
        chain = np.arange(unit.num_tokens)[chain_rows if isinstance(chain_rows, slice) else chain_rows.cpu()]
        local = np.full(unit.num_tokens, -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        owned = local[chain] >= 0
        slots = r.stacks.claim(pos.start, pos.stop - pos.start, owned)
        view_rows = torch.from_numpy(local[chain][owned]).to(self.device)
        for layer in range(len(r.stacks.k)):
            r.stacks.k[layer][slots] = ctx.own_k[layer][view_rows].detach()
            r.stacks.v[layer][slots] = ctx.own_v[layer][view_rows].detach()
            r.stacks.gk[layer][slots] = 0
            r.stacks.gv[layer][slots] = 0
        return view_rows, slots

    def finish(self, r: Run) -> StepOutput:
        """Every CP rank's results summed: each (rollout, position) was computed on exactly one rank."""
        self._views.clear()
        out = r.out
        flat = torch.cat([out.loss.reshape(1), out.logprobs, out.entropy])
        dist.all_reduce(flat, group=self.group)
        n = len(out.logprobs)
        out.loss, out.logprobs, out.entropy = flat[0], flat[1 : 1 + n], flat[1 + n :]
        stats = [None] * self.cp
        dist.all_gather_object(stats, {k: float(v) for k, v in out.stats.items()}, group=self.group)
        out.stats = {k: sum(s.get(k, 0.0) for s in stats) for k in set().union(*stats)}
        return super().finish(r)
