"""A memory model of the executor's own allocations, and plans that fit a memory budget.

``engine.memory_budget_mib`` caps the step's memory rise above the resident model, its gradients
and the optimizer state. What the executor allocates on top of those (``executor.py``):
- the DFS K/V stacks and their gradient stacks, ``max_path`` positions per layer (``stacks``);
- per unit on the DFS path whose children run: its graph if kept (``graph``: everything its forward
  with grad leaves alive: saved activations, the LM head's kept logits, its recorded own K/V, the
  attention masks it prepared), else what its no-grad forward leaves alive (``hold``: own K/V,
  masks), plus the [T, K, D] float32 buffers its children's K/V gradients collect in (``dkv``);
- the running unit: its graph, plus a transient while its backward runs (``transient``).
``graph`` and ``hold`` are not derived from formulas but measured: ``MemoryModel.probe`` runs a few
tiny units of this very model, dtype, TP degree and attention backend through the executor and
counts the bytes of every tensor storage their forward leaves alive (``live_bytes``), then fits
``bytes = c0 + c1 T + c2 P + c3 T (P + T)`` (T own tokens, P prefix positions) per attention kind
(causal rows; masked: a prefix or a tree mask). The LM head's kept logits follow its own rule
(``lm_head.kept_logits``) and are added per unit rather than fitted.

``fit_plan`` turns a budget into a plan: dta halves its block size until one path fits, then keeps
the graphs of the units whose recompute costs most per byte while every point of the DFS stays
under the budget (``choose_kept``); sparse splits its microbatches; dense can only check.
A budget nothing fits is refused up front, naming the minimum.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from megatron_dta.engine.executor import ChunkKV
from megatron_dta.engine.plan import Plan, Unit, build_plan, seq_offsets_of
from megatron_dta.errors import ConfigError
from megatron_dta.losses import PolicyLoss
from megatron_dta.model.lm_head import kept_logits
from megatron_dta.rollouts import Rollout

MIN_BLOCK = 64  # dta halves its block size down to this before it refuses a budget
MiB = float(1 << 20)


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def live_bytes(exclude: set[int] = frozenset()) -> dict[int, int]:
    """{storage data_ptr: bytes} of every tensor alive as a Python object, minus ``exclude``.

    Tensors autograd saves are Python objects only while ``visible_saved()`` is active."""
    gc.collect()  # garbage in reference cycles is not memory the executor holds
    out = {}
    for obj in gc.get_objects():
        if type(obj) in _TENSOR_TYPES and obj.device.type != "meta" and obj.layout == torch.strided:
            s = obj.untyped_storage()
            if s.data_ptr() not in exclude and s.nbytes():
                out[s.data_ptr()] = s.nbytes()
    return out


def visible_saved():
    """Saved-tensor hooks that hand autograd a detached alias of each saved tensor (a Python
    object ``live_bytes`` sees, sharing the storage; the tensor itself would tie a saved output
    and its grad_fn into a reference cycle that outlives the graph)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t)


def _features(T: int, P: int) -> np.ndarray:
    return np.array([1.0, T, P, T * (P + T)])


def _probe_rollouts(kind: str, T: int, P: int, vocab: int) -> tuple[str, list[Rollout], int, int]:
    """(mode, rollouts, block size, pack tokens) whose plan's last root-first leaf unit has T own
    tokens, P prefix positions and attention ``kind``."""
    rng = np.random.default_rng(T * 1000 + P)
    tok = lambda n: rng.integers(1, vocab, n)
    ones = lambda n: Rollout(np.zeros(n, np.int64), np.r_[0, np.ones(n - 1, np.int8)], np.ones(n))

    def rollout(ids):
        r = ones(len(ids))
        r.input_ids = ids.astype(np.int64)
        return r

    if kind == "causal":
        return "dense", [rollout(tok(T))], T, T
    if P == 0:  # a sparse microbatch: two rollouts sharing T // 2 tokens, one tree-mask unit
        shared = tok(T // 2)
        half = T - len(shared)
        return (
            "sparse",
            [rollout(np.r_[shared, tok(half // 2 + half % 2)]), rollout(np.r_[shared, tok(half // 2)])],
            T,
            T,
        )
    # dta: a P-token root unit and one unit of two sibling segments under it
    prefix = tok(P)
    return "dta", [rollout(np.r_[prefix, tok(T // 2)]), rollout(np.r_[prefix, tok(T - T // 2)])], max(P, T), T


PROBES = {
    "causal": [(32, 0), (64, 0), (96, 0)],
    "masked": [(32, 0), (64, 0), (96, 0), (32, 32), (64, 32), (32, 96), (96, 64)],
}


@dataclass
class MemoryModel:
    """Bytes of the executor's allocations for one model (see the module docstring)."""

    stack_bytes_per_position: int  # K/V + K/V-gradient stacks, all layers
    dkv_bytes_per_token: int  # a parent's children-gradient buffers, all layers
    graph_coef: dict  # kind -> [4] coefficients of _features: a leaf unit's graph
    parent_coef: dict  # a parent's graph (it records its own K/V for its children)
    hold_coef: dict
    vocab_local: int
    head_dtype: torch.dtype  # the LM head computes in max(dtype, float32)
    device_type: str
    flops_per_token: float  # linear layers' multiply-adds x 2, for the recompute cost
    attn_flops_per_pair: float  # 4 x heads x head dim x layers per (query, key)
    layers: int
    loss_bytes_per_element: float = 0.0  # the loss terms' saved tensors per (rollout, position)

    @staticmethod
    def kind(unit: Unit) -> str:
        return "causal" if unit.prefix_len == 0 and unit.spec.seg_in is None else "masked"

    def _kept_logits_bytes(self, rows: int) -> int:
        keep_z, keep_e = kept_logits(rows, self.vocab_local, self.head_dtype, self.device_type)
        return (int(keep_z) + int(keep_e)) * rows * self.vocab_local * self.head_dtype.itemsize

    def stacks(self, max_path: int) -> float:
        return float(max(max_path, 1) * self.stack_bytes_per_position) if max_path else 0.0

    def graph(self, unit: Unit) -> float:
        if not unit.has_children and not len(unit.pair_target):
            return self.hold(unit)  # no loss, no children: nothing refers to its graph (masks stay)
        coef = (self.parent_coef if unit.has_children else self.graph_coef)[self.kind(unit)]
        f = _features(unit.num_tokens, unit.prefix_len)
        shared = (len(unit.elem_pair) - len(unit.pair_target)) * self.loss_bytes_per_element
        return float(f @ coef) + shared + self._kept_logits_bytes(len(unit.pair_target))

    def hold(self, unit: Unit) -> float:
        return float(_features(unit.num_tokens, unit.prefix_len) @ self.hold_coef[self.kind(unit)])

    def dkv(self, unit: Unit) -> float:
        return float(unit.num_tokens * self.dkv_bytes_per_token)

    def transient(self, unit: Unit) -> float:
        """Short-lived buffers of a forward or backward: about one layer's activations (the
        gradients a layer's backward produces before its saved tensors go) and the head's chunk
        buffers. An estimate, not measured: the benchmark checks the cap it implies."""
        f = _features(unit.num_tokens, unit.prefix_len)
        head = 2 * min(1024, max(len(unit.pair_target), 1)) * self.vocab_local * self.head_dtype.itemsize
        return float(f @ self.graph_coef[self.kind(unit)]) / max(self.layers, 1) + head

    def recompute_flops(self, unit: Unit) -> float:
        T, P = unit.num_tokens, unit.prefix_len
        return T * self.flops_per_token + self.attn_flops_per_pair * (T * P + T * (T + 1) / 2)

    # ---- a plan's peak --------------------------------------------------------------------------
    def peak(self, plan: Plan, kept: Callable[[Unit], bool], forward_only: bool = False) -> float:
        """Largest bytes alive at any event of the plan's traversal under the keep rule ``kept``."""
        return max((held + tr for _, _, held, tr in self.events(plan, kept, forward_only)), default=0.0)

    def events(self, plan: Plan, kept: Callable[[Unit], bool], forward_only: bool = False):
        """(unit, is_backward, bytes held, transient bytes) per event, in ``Plan.events`` order:
        what is alive right after the event (the K/V stacks, the path's parents, the unit's graph
        or hold) and the transient estimate of the event's own computation."""
        S = self.stacks(plan.max_path)
        todo = [(u, 0.0, False) for u in reversed(plan.roots)]  # (unit, bytes of the path, exit)
        while todo:
            u, path, leaving = todo.pop()
            if leaving:  # its backward (after a recompute when not kept): ``path`` includes it
                yield u, True, S + path, self.transient(u)
                continue
            keep = not forward_only and (not u.has_children or kept(u))
            now = self.graph(u) if keep else self.hold(u)
            yield u, False, S + path + now, self.transient(u)
            held = now + (self.dkv(u) if u.has_children and not forward_only else 0.0)
            if not forward_only:
                todo.append((u, path + held + (0.0 if keep else self.graph(u)), True))
            todo.extend((k, path + held, False) for kids in reversed(u.children) for k in reversed(kids))

    # ---- measured coefficients ----------------------------------------------------------------------
    @classmethod
    def probe(cls, executor) -> MemoryModel:
        """Measure ``graph`` and ``hold`` of tiny units of ``executor``'s model (see module docstring)."""
        m = executor.model
        stacks = executor._alloc_stacks(Plan("dta", [], 1, 0))
        per_pos = sum(t.numel() * t.element_size() for group in stacks for t in group)
        gsize = stacks[2][0].element_size()
        layer = m.layers[0]
        head_dtype = torch.promote_types(m.dtype, torch.float32)
        model = cls(
            stack_bytes_per_position=per_pos,
            dkv_bytes_per_token=2 * len(m.layers) * layer.k_local * layer.d * gsize,
            graph_coef={},
            parent_coef={},
            hold_coef={},
            vocab_local=m.output_weight().shape[0],
            head_dtype=head_dtype,
            device_type=torch.device(executor.device).type,
            flops_per_token=2.0
            * sum(mod.weight.numel() for b in m.layers for mod in (b.qkv, b.o_proj, b.gate_up, b.down)),
            attn_flops_per_pair=4.0 * layer.n_local * layer.d * len(m.layers),
            layers=len(m.layers),
        )
        for kind in ("masked", "causal"):  # masked first: its probes measure loss_bytes_per_element
            rows = np.array([model._measure(executor, kind, T, P) for T, P in PROBES[kind]], dtype=np.float64)
            X = np.stack([_features(T, P) for T, P in PROBES[kind]])
            # graphs: minus the loss terms of elements beyond one per pair (tokens shared by rollouts)
            X5 = np.c_[X, rows[:, 0]] if kind == "masked" else X
            y = rows[:, 1:3] - (0.0 if kind == "masked" else model.loss_bytes_per_element * rows[:, :1])
            graph = np.linalg.lstsq(X5, y, rcond=None)[0]  # [features, (leaf graph, parent graph)]
            if kind == "masked":
                model.loss_bytes_per_element = float(graph[4, 0])
            model.graph_coef[kind], model.parent_coef[kind] = graph[:4].T
            model.hold_coef[kind] = np.linalg.lstsq(X, rows[:, 3], rcond=None)[0]
        return model

    def _measure(self, executor, kind: str, T: int, P: int) -> tuple[int, float, float, float]:
        """(loss elements beyond one per pair, leaf graph minus kept logits, parent graph minus kept
        logits, hold bytes) of the probe
        unit (kind, T, P): one forward as ``Executor._forward`` runs it, the unit recording its own
        K/V as a parent does or not as a leaf."""
        mode, rollouts, block, pack = _probe_rollouts(kind, T, P, self.vocab_local)
        seqs = [r.input_ids for r in rollouts]
        plan = build_plan(mode, seqs, seq_offsets_of([len(s) for s in seqs]), block, None, pack)
        unit = plan.roots[-1]
        while unit.has_children:
            unit = next(k for kids in unit.children for k in kids)
        assert (unit.num_tokens, unit.prefix_len, self.kind(unit)) == (T, P, kind), "probe plan"
        loss = PolicyLoss()
        run = executor.start(plan, loss.token_table(rollouts), loss)
        run.stacks = executor._alloc_stacks(plan) if plan.max_path else None
        out = []
        for grad, record in ((True, False), (True, True), (False, True)):
            unit.spec.cache.clear()  # the masks a pass prepares are part of what it holds
            pk, pv = executor._prefix_leaves(run, unit, grad)
            ctx = ChunkKV(executor.attention, unit.spec, pk, pv, record=record)
            saved: dict[int, int] = {}
            with torch.set_grad_enabled(grad), _saved_into(saved):
                hidden_TH = executor._run_model(unit, ctx, None)
                lossv = executor._unit_loss(run, unit, hidden_TH) if grad else None
            if not grad:  # as the executor does after a no-grad forward
                unit.spec.cache.clear()
            tensors = [*ctx.own_k.values(), *ctx.own_v.values(), *_tensors_in(unit.spec.cache.values())]
            tensors += _ctx_tensors(lossv.grad_fn) if lossv is not None else []
            exclude = {t.untyped_storage().data_ptr() for t in (*(pk or []), *(pv or []))}
            out.append(_storage_bytes(saved, tensors, exclude | executor_params(executor)))
        unit.spec.cache.clear()
        kept = self._kept_logits_bytes(len(unit.pair_target))
        return len(unit.elem_pair) - len(unit.pair_target), out[0] - kept, out[1] - kept, out[2]


def executor_params(executor) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in executor.model.parameters()}


def _tensors_in(values) -> list[torch.Tensor]:
    """Tensors among ``values`` and in the lists, tuples and dicts among them (one level)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [t for t in v if isinstance(t, torch.Tensor)]
        elif isinstance(v, dict):
            out += [t for t in v.values() if isinstance(t, torch.Tensor)]
    return out


def _ctx_tensors(root) -> list[torch.Tensor]:
    """Tensors custom autograd functions keep on their ctx (not via save_for_backward), over the
    graph below ``root``: the LM head keeps its logits this way."""
    out, seen, todo = [], set(), [root]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        out += _tensors_in(getattr(node, "__dict__", {}).values())
        todo += [n for n, _ in node.next_functions]
    return out


class _saved_into:
    """Saved-tensor hooks recording {storage data_ptr: bytes} of every tensor autograd saves."""

    def __init__(self, into: dict):
        self.into = into
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        s = t.untyped_storage()
        self.into[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self.hooks.__enter__()

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def _storage_bytes(saved: dict, tensors, exclude: set[int]) -> int:
    sizes = dict(saved)
    for t in tensors:
        s = t.untyped_storage()
        sizes[s.data_ptr()] = s.nbytes()
    return sum(n for ptr, n in sizes.items() if ptr not in exclude)


# ---- what to keep ---------------------------------------------------------------------------------
def choose_kept(plan: Plan, mm: MemoryModel, budget: float) -> tuple[set[int], float]:
    """(ids of the parent units whose graph is kept, planned peak bytes).

    Greedy by recompute cost per byte kept: a parent joins when every event of its subtree (its
    own forward included) stays within ``budget`` with the graphs already chosen on its path. The
    subtree maxima ``M`` (largest bytes of any event below a unit, counting the kept graphs below
    it) are updated up the chain of parents as units join."""
    S, parent, base_f, base_b, extra, order = mm.stacks(plan.max_path), {}, {}, {}, {}, []
    todo = [(u, None, 0.0) for u in reversed(plan.roots)]
    while todo:  # the no-keep traversal: each event's bytes as MemoryModel.peak counts them
        u, par, path = todo.pop()
        parent[id(u)] = par
        if not u.has_children:
            base_f[id(u)], base_b[id(u)] = S + path + mm.graph(u) + mm.transient(u), 0.0
            continue
        hold, graph = mm.hold(u), mm.graph(u)
        base_f[id(u)] = S + path + hold + mm.transient(u)
        base_b[id(u)] = S + path + hold + mm.dkv(u) + graph + mm.transient(u)
        extra[id(u)] = graph - hold
        order.append(u)
        held = path + hold + mm.dkv(u)
        todo.extend((k, u, held) for kids in reversed(u.children) for k in reversed(kids))
    M = {}
    for u in reversed(order):  # children before parents (reverse DFS preorder)
        M[id(u)] = _subtree_max(u, base_f, base_b, M, 0.0)
    kept: set[int] = set()
    ranked = sorted(order, key=lambda u: -mm.recompute_flops(u) / max(extra[id(u)], 1.0))
    for u in ranked:
        trial = dict(M)
        node, x = u, extra[id(u)]
        chain_ok = True
        while node is not None:
            own = x if node is u else extra[id(node)] if id(node) in kept else 0.0
            trial[id(node)] = _subtree_max(node, base_f, base_b, trial, own)
            if parent[id(node)] is None and trial[id(node)] > budget:
                chain_ok = False
            node = parent[id(node)]
        if chain_ok:
            kept.add(id(u))
            M = trial
    roots_peak = [M.get(id(r), base_f[id(r)]) for r in plan.roots]
    return kept, max(roots_peak, default=S)


def _subtree_max(u: Unit, base_f: dict, base_b: dict, M: dict, own: float) -> float:
    """Largest bytes of the events of ``u``'s subtree, ``own`` (its kept graph's extra bytes)
    added to its forward and to its descendants' events."""
    if not u.has_children:
        return base_f[id(u)]
    below = max((M[id(k)] if k.has_children else base_f[id(k)]) for kids in u.children for k in kids)
    return max(base_f[id(u)] + own, base_b[id(u)], below + own)


# ---- plans under a budget -------------------------------------------------------------------------
def fit_plan(
    mm: MemoryModel, budget_mib: float, mode: str, sequences, block_size: int, max_tokens, pack_tokens
):
    """The plan of ``sequences`` in ``mode`` whose planned peak fits ``budget_mib``, with
    ``extra['keep']`` (dta: the parents whose graph is kept) and ``extra['planned_peak_bytes']``;
    ConfigError naming the smallest budget that would do when none fits."""
    budget = budget_mib * MiB
    offsets = seq_offsets_of([len(s) for s in sequences])
    if mode == "dta":
        return _fit_dta(mm, budget, budget_mib, sequences, offsets, block_size, pack_tokens)
    if mode == "sparse":
        return _fit_sparse(mm, budget, budget_mib, sequences, offsets, max_tokens)
    plan = build_plan("dense", sequences, offsets)
    return _accept(plan, *choose_kept(plan, mm, budget), budget, budget_mib, "its longest rollout")


def _accept(plan: Plan, kept: set, peak: float, budget: float, budget_mib: float, what: str) -> Plan:
    if peak > budget:
        raise ConfigError(
            f"engine.memory_budget_mib={budget_mib:g} is below the {peak / MiB:.1f} MiB that "
            f"engine.mode={plan.mode} needs at least for {what}: raise engine.memory_budget_mib"
        )
    plan.extra.update(keep=kept, planned_peak_bytes=int(peak), memory_budget_bytes=int(budget))
    return plan


def _fit_dta(mm, budget, budget_mib, sequences, offsets, block_size, pack_tokens):
    """Halve the block (and packing) size until nothing-kept fits, then keep what fits."""
    block, pack = block_size, pack_tokens or block_size
    while True:
        plan = build_plan("dta", sequences, offsets, block, None, pack)
        floor = mm.peak(plan, lambda u: False)
        if floor <= budget or block <= MIN_BLOCK:
            break
        block, pack = max(MIN_BLOCK, block // 2), max(MIN_BLOCK, pack // 2)
    if floor > budget:
        return _accept(
            plan,
            set(),
            floor,
            budget,
            budget_mib,
            f"the K/V stacks of its {plan.max_path}-token longest path and {block}-token units",
        )
    kept, peak = choose_kept(plan, mm, budget)
    plan.extra.update(block_size=block)
    return _accept(plan, kept, peak, budget, budget_mib, "")


def _fit_sparse(mm, budget, budget_mib, sequences, offsets, max_tokens):
    """Halve the microbatch token limit until every packed microbatch fits; a microbatch of one
    rollout cannot be split further."""
    limit = max_tokens or sum(len(s) for s in sequences)
    while True:
        plan = build_plan("sparse", sequences, offsets, max_tokens_per_microbatch=limit)
        kept, peak = choose_kept(plan, mm, budget)
        if peak <= budget or limit <= max(len(s) for s in sequences):
            break
        limit //= 2
    plan.extra.update(max_tokens_per_microbatch=limit)
    return _accept(plan, kept, peak, budget, budget_mib, "its microbatches of one rollout")
