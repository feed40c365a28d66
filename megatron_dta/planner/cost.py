"""Step time, communication and memory of one layout, from the plan's real units and schedule.

``Workload`` runs the project's own code on the step's global batch: the balancer splits it over
the data-parallel ranks (``balancer.balance``, as ``train.local_microbatches`` does), each
microbatch is planned in the engine's mode (``engine.plan.build_plan``) and reduced to its event
sequence (``Plan.events``) with the executor's keep-or-recompute rule replayed on it. ``predict``
prices every event on every pipeline stage with a ``HardwareProfile`` (work in ``Work`` units),
adds the tensor-, context- and expert-parallel all-reduces and pipeline sends of that event, runs
the DFS pipeline
schedule (``pipeline.dfs_schedule``) over the microbatches for the bubble and the in-flight
activation peak, and adds the data-parallel gradient reduction and the optimizer step.
Context parallelism (C ranks, engine/context_parallel.py): a rank computes ~1/C of every unit's rows
and causal pairs, keeps ~1/C of the path's stacks and kept activations, gathers a unit's [P + T]
K/V per layer (all-reduce) forward, again in the backward of a kept unit with children (which also
recomputes its attention) and all-reduces dK/dV. Expert parallelism: EP ranks share their tokens,
each runs its experts on the tokens routed to them (top_k / num_experts of them, balanced) and
all-reduces the MoE output per layer forward and its input gradient backward.

Legend: E events of a microbatch; per event ``tokens`` T, ``pairs`` (query, key) pairs attention
computes (dta, dense: a token at position p sees its path's p + 1 keys; sparse: the packed unit's
causal triangle), ``prefix`` ancestor positions
read from the K/V stack, ``head`` LM-head rows (log-probs computed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from megatron_dta.balancer import balance
from megatron_dta.engine.plan import build_plan, seq_offsets_of
from megatron_dta.pipeline import dfs_schedule
from megatron_dta.planner.hardware import HardwareProfile
from megatron_dta.planner.ranks import RankShape, global_rank

LM_HEAD_CHUNK = 1024  # model.logprobs' default chunk: the head's [chunk, V_local] buffers


@dataclass
class Events:
    """One microbatch's events in executor order (arrays [E])."""

    backward: np.ndarray  # bool
    recompute: np.ndarray  # bool: a backward that first re-runs its unit's forward (not kept)
    tokens: np.ndarray
    pairs: np.ndarray
    prefix: np.ndarray
    head: np.ndarray
    children: np.ndarray  # bool: the unit has children (a kept one waits for them)
    peak_path_tokens: int  # tokens whose graph is alive at once (kept path + the unit running)
    max_path: int  # positions of the K/V stacks (Plan.max_path)
    max_scores: int  # largest T x (P + T) of a unit: its attention scores where a kernel writes them
    computed_tokens: int


def summarize(plan, budget: int) -> Events:
    """The plan's events with the executor's rule: a unit with children keeps its graph while the
    path's kept tokens fit ``budget``, otherwise it runs without grad and is recomputed."""
    rows, keep, kept, peak = [], {}, 0, 0
    for unit, backward in plan.events():
        T = unit.num_tokens
        if not backward:
            keep[id(unit)] = not unit.has_children or kept + T <= budget
            if keep[id(unit)]:
                kept += T
            peak = max(peak, kept)
        elif keep[id(unit)]:
            kept -= T
        else:
            peak = max(peak, kept + T)
        # a token at position p attends to its path's p + 1 keys; a packed tree-mask unit (sparse)
        # costs its kernel the causal triangle of the packing, most of which the mask discards
        pairs = T * (T + 1) // 2 if plan.mode == "sparse" else int(unit.position_ids.sum()) + T
        rows.append(
            (
                backward,
                backward and not keep[id(unit)],
                T,
                pairs,
                unit.prefix_len,
                len(unit.pair_target),
                unit.has_children,
            )
        )
    a = np.array(rows, dtype=np.int64).reshape(-1, 7)
    return Events(
        a[:, 0].astype(bool),
        a[:, 1].astype(bool),
        a[:, 2],
        a[:, 3],
        a[:, 4],
        a[:, 5],
        a[:, 6].astype(bool),
        peak,
        plan.max_path,
        int((a[:, 2] * (a[:, 4] + a[:, 2])).max(initial=0)),
        plan.computed_tokens,
    )


class Workload:
    """The step's global batch; its balanced microbatches and their events, cached per setting so
    that several layouts and models can be priced on one batch."""

    def __init__(self, batch, cost_model):
        self.batch, self.cost_model = batch, cost_model
        self.total_tokens = sum(len(r) for r in batch)

    @functools.lru_cache(maxsize=16)  # noqa: B019 (a Workload lives as long as its caller's study)
    def split(self, dp: int, microbatch_tokens: int | None):
        """(BalancePlan, per DP rank its microbatches as rollout index lists, empty ones dropped)."""
        plan = balance(self.batch, dp, microbatch_tokens, self.cost_model)
        return plan, [[mb for mb in plan.for_rank(r) if mb] for r in range(dp)]

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def events(
        self, dp: int, microbatch_tokens, mode: str, block_size: int, pack_tokens, sparse_tokens, budget
    ):
        """Per DP rank, per microbatch: its ``Events`` in ``mode``."""
        out = []
        for micro in self.split(dp, microbatch_tokens)[1]:
            rank = []
            for mb in micro:
                seqs = [self.batch[i].input_ids for i in mb]
                plan = build_plan(
                    mode, seqs, seq_offsets_of([len(s) for s in seqs]), block_size, sparse_tokens, pack_tokens
                )
                rank.append(summarize(plan, budget))
            out.append(rank)
        return out


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    in_flight: int  # microbatches in flight per pipeline stage
    cp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.ep * self.pp * self.dp


def _work(ev: Events, s: RankShape, cp: int = 1):
    """(linear FLOPs, attention FLOPs, memory-bound bytes, kernel calls) of each event on stage ``s``
    (arrays [E]) on one of ``cp`` context-parallel ranks: forward 1x, backward 2x matmuls and 2.5x
    attention, plus the recomputed forward, plus under CP the attention a kept unit with children
    recomputes in its backward."""
    b, L = s.dtype_bytes, s.layers
    T = ev.tokens / cp  # the zig-zag gives each CP rank ~1/C of a unit's rows and causal pairs
    lin = 2.0 * T * (s.linear_weights + s.expert_weights) + 2.0 * ev.head / cp * s.head_rows * s.hidden
    attn = 4.0 * ev.pairs / cp * s.q_heads * s.head_dim * L
    qkv = (s.q_heads + 2 * s.kv_heads) * s.head_dim
    # norms, residuals, rotary, SiLU: a few reads and writes of each [T, H], [T, F], [T, qkv];
    # the prefix K/V is concatenated in front of the unit's own (read and written) every layer;
    # the LM head writes and re-reads its [rows, V_local] logits in float32
    mem = T * L * b * (8.0 * s.hidden + 6.0 * s.ffn + 4.0 * qkv)
    mem = mem + ev.prefix * L * 4.0 * s.kv_heads * s.head_dim * b + ev.head / cp * s.head_rows * 12.0
    calls = np.full(len(ev.tokens), L + int(s.is_last), dtype=np.float64)
    fwd = np.stack([lin, attn, mem, calls])
    bwd = fwd * np.array([2.0, 2.5, 2.0, 1.0])[:, None] + fwd * ev.recompute
    if cp > 1:
        bwd[1] += fwd[1] * (ev.children & ~ev.recompute)
    return np.where(ev.backward, bwd, fwd)


def work(ev: Events, s: RankShape, cp: int = 1) -> np.ndarray:
    """[4] total work of a microbatch on stage ``s``, in the order ``HardwareProfile.seconds`` takes."""
    return _work(ev, s, cp).sum(axis=1)


def _ring(size: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``size`` bytes over ``n`` ranks."""
    return 2.0 * (n - 1) / n * size


@dataclass
class RankCost:
    seconds: np.ndarray  # [E] per event on this stage (compute + its TP all-reduces + its send)
    flops: float  # linear + attention, recomputation excluded (useful work)
    tp_bytes: float
    pp_bytes: float
    expert_flops: float = 0.0  # the experts' part of ``flops`` (the rest is replicated over EP)
    cp_bytes: float = 0.0
    ep_bytes: float = 0.0


def _cp_gathers(ev: Events, s: RankShape, layout: Layout, hw: HardwareProfile):
    """(seconds [E], bytes) of the CP K/V all-reduces: per layer one [2, P + T] gather forward; in the
    backward the dK/dV all-reduce, the gather again for a kept unit with children, and a recomputed
    unit's forward gather."""
    n = s.layers * np.where(ev.backward, 1 + (ev.children & ~ev.recompute) + ev.recompute, 1)
    wire = n * _ring(2.0 * (ev.prefix + ev.tokens) * s.kv_heads * s.head_dim * s.dtype_bytes, layout.cp)
    span = layout.tp * layout.cp
    return wire / hw.link_bytes_per_s(span) + n * hw.collective_latency_s, float(wire.sum())


def _ep_reduces(ev: Events, s: RankShape, layout: Layout, hw: HardwareProfile):
    """(seconds [E], bytes) of the EP all-reduces: per MoE layer the [T, H] expert output forward,
    its input gradient backward (and the recomputed forward's)."""
    n = s.moe_layers * np.where(ev.backward, 1 + ev.recompute, 1)
    wire = n * _ring(ev.tokens * s.hidden * s.dtype_bytes, layout.ep)
    span = layout.tp * layout.cp * layout.ep
    return wire / hw.link_bytes_per_s(span) + n * hw.collective_latency_s, float(wire.sum())


def event_costs(ev: Events, s: RankShape, layout: Layout, hw: HardwareProfile) -> RankCost:
    cp = layout.cp
    w = _work(ev, s, cp)
    zero = np.zeros_like(ev.recompute)
    useful = _work(Events(**{**ev.__dict__, "recompute": zero, "children": zero}), s, cp)
    expert = 2.0 * ev.tokens / cp * s.expert_weights * np.where(ev.backward, 2.0, 1.0)
    seconds = hw.seconds(*w)
    tp_bytes = pp_bytes = cp_bytes = ep_bytes = 0.0
    H, b = s.hidden, s.dtype_bytes
    if cp > 1:
        extra, cp_bytes = _cp_gathers(ev, s, layout, hw)
        seconds = seconds + extra
    if layout.ep > 1 and s.moe_layers:
        extra, ep_bytes = _ep_reduces(ev, s, layout, hw)
        seconds = seconds + extra
    if layout.tp > 1:
        # two [T, H] all-reduces per layer forward (attention and MLP outputs), two backward (the
        # inputs of qkv and gate_up), one more backward for the LM head input; a recompute
        # repeats the forward's
        n = 2 * s.layers * np.where(ev.backward, 1 + ev.recompute, 1) + (s.is_last & ev.backward)
        wire = n * _ring(ev.tokens / cp * H * b, layout.tp)
        seconds = seconds + wire / hw.link_bytes_per_s(layout.tp) + n * hw.collective_latency_s
        tp_bytes = float(wire.sum())
    if layout.pp > 1:
        # a forward sends [T, H] on (not from the last stage), a backward its gradient back
        # (not from the first)
        sends = np.where(ev.backward, not s.is_first, not s.is_last)
        wire = sends * ev.tokens / cp * H * b
        span = layout.world // layout.pp + 1
        seconds = seconds + wire / hw.link_bytes_per_s(span) + sends * hw.collective_latency_s
        pp_bytes = float(wire.sum())
    flops = float(useful[0].sum() + useful[1].sum())
    return RankCost(seconds, flops, tp_bytes, pp_bytes, float(expert.sum()), cp_bytes, ep_bytes)


@dataclass
class Prediction:
    step_seconds: float
    compute_seconds: list[float]  # per DP rank, its pipeline's makespan
    dp_seconds: float
    optimizer_seconds: float
    bubble: float  # largest over DP ranks (0 without pipeline)
    imbalance: float  # slowest / mean DP rank compute
    flops: float  # useful FLOPs of the whole step, all ranks
    communication_bytes: dict  # per rank and step, the busiest rank of each dimension
    memory: dict = field(default_factory=dict)  # {(tp_rank, ep_rank, pp_rank, dp_rank): {term: bytes}}
    # (CP ranks of a position hold the same)


def _optimizer_bytes(s: RankShape, backend: str, zero_stage: int, dp: int) -> tuple[float, float]:
    """(grads, optimizer state) bytes of one rank under the optimizer backend."""
    n, b = s.allocated, s.dtype_bytes
    low = b < 4  # bf16 parameters get float32 master weights
    if backend == "torch":
        # main grads in promote(dtype, float32) (grads.MainGrads: each backward's p.grad lives only
        # until its hook adds it in); Adam moments (and masters) in float32 or the parameter dtype
        return n * max(4, b), n * (12 if low else 2 * b)
    state = n * (12 if low else 8) / dp
    if backend == "megatron":  # DDP buffers in float32, distributed optimizer shards state over DP
        return n * 4.0, state
    grads = n * b + (
        n * 4.0 / dp if zero_stage == 2 else n * 4.0
    )  # deepspeed: fp32 partition (ZeRO-2) or full
    return grads, state


@dataclass
class _Peaks:
    """What one DP rank's microbatches need at most at once, per stage (memory terms' inputs)."""

    runs: list  # [pp] runs in flight
    kept: list  # [pp] kept path tokens (all CP ranks together)
    max_path: int
    max_unit: int
    max_scores: int
    max_leaf_keys: int  # P + T of the longest unit that keeps its gathered keys (CP: no children)


def _peaks(micro: list[Events], runs: list) -> _Peaks:
    # each run in flight on a stage holds at most its own path's peak (the executor's budget
    # applies per run); the schedule's kept-token count ignores the budget's recomputation
    path_peak = max((ev.peak_path_tokens for ev in micro), default=0)
    return _Peaks(
        runs,
        [r * path_peak for r in runs],
        max((ev.max_path for ev in micro), default=0),
        max((int(ev.tokens.max(initial=0)) for ev in micro), default=0),
        max((ev.max_scores for ev in micro), default=0),
        max((int((ev.prefix + ev.tokens)[~ev.children].max(initial=0)) for ev in micro), default=0),
    )


def _rank_memory(s: RankShape, pk: _Peaks, layout: Layout, hw, backend: str, zero_stage: int) -> dict:
    """{term: bytes} of one rank of position ``s``, one of ``layout.cp`` CP ranks."""
    cp, p = layout.cp, s.pp_rank
    grads, state = _optimizer_bytes(s, backend, zero_stage, layout.dp)
    acts = pk.kept[p] / cp * s.activation_bytes_per_token
    if s.is_last:  # the fused head's float32 logits and exponentials of one chunk
        acts += 2 * min(LM_HEAD_CHUNK, -(-pk.max_unit // cp)) * s.head_rows * 4
    if hw.attention_scores_materialized:  # one layer's scores and probabilities, float32
        acts += 2 * pk.max_scores / cp * s.q_heads * 4
    rows = pk.max_path
    if cp > 1:
        # a leaf unit keeps every layer's gathered [2, P + T] K/V until its backward; the stack
        # shard holds ceil(path / C) + 1 rows (context_parallel.ShardedStacks)
        acts += pk.max_leaf_keys * s.layers * 2 * s.kv_heads * s.head_dim * s.dtype_bytes
        rows = -(-pk.max_path // cp) + 1 if pk.max_path else 0
    return {
        "weights": float(s.allocated * s.dtype_bytes),
        "grads": float(grads),
        "optimizer": float(state),
        "activations": float(acts),
        "kv_stacks": float(pk.runs[p] * rows * s.kv_stack_bytes_per_position),
    }


def predict(
    shapes: dict[tuple[int, int, int], RankShape],
    layout: Layout,
    hw: HardwareProfile,
    events: list[list[Events]],
    optimizer_backend: str = "torch",
    zero_stage: int = 1,
) -> Prediction:
    tp, pp, dp, cp, ep = layout.tp, layout.pp, layout.dp, layout.cp, layout.ep
    compute, bubbles, flops = [], [], 0.0
    sums = {dim: [0.0] * dp for dim in ("tp", "cp", "ep", "pp")}
    memory: dict = {}
    for d, micro in enumerate(events):
        # one TP (EP) rank per stage suffices for time: TP ranks of a stage do the same work, EP
        # ranks the same on average (balanced routing)
        costs = [[event_costs(ev, shapes[0, 0, p], layout, hw) for ev in micro] for p in range(pp)]
        # model FLOPs: TP x CP ranks split the work, EP ranks replicate all but their experts
        flops += tp * cp * sum(c.flops + (ep - 1) * c.expert_flops for stage in costs for c in stage)
        for dim in sums:
            sums[dim][d] = max(
                (sum(getattr(c, f"{dim}_bytes") for c in stage) for stage in costs), default=0.0
            )
        busy = [sum(float(c.seconds.sum()) for c in stage) for stage in costs]
        runs = [min(1, len(micro))] * pp
        bubble = 0.0
        if pp > 1 and micro:
            sched = dfs_schedule(
                [list(zip(ev.backward.tolist(), ev.tokens.tolist())) for ev in micro], pp, layout.in_flight
            )
            bubble, runs = sched.bubble, sched.peak_in_flight
        bubbles.append(bubble)
        compute.append(max(busy) / (1.0 - bubble) if busy else 0.0)
        pk = _peaks(micro, runs)
        for (t, e, p), s in shapes.items():
            memory[t, e, p, d] = _rank_memory(s, pk, layout, hw, optimizer_backend, zero_stage)
    # data parallel: the gradients cross the DP (x CP) group once per step (all-reduce; reduce-scatter
    # + all-gather for the sharded optimizers), after the last backward
    s0 = max(shapes.values(), key=lambda s: s.allocated)
    grad_b = 4 if optimizer_backend == "megatron" else s0.dtype_bytes
    group = dp * cp
    dp_wire = _ring(s0.allocated * grad_b, group) if group > 1 else 0.0
    dp_seconds = dp_wire / hw.link_bytes_per_s(layout.world // pp) + (
        2 * (group - 1) * hw.collective_latency_s if group > 1 else 0
    )
    # AdamW: read and write float32 master, two moments and the parameter, read the gradient
    shard = dp if optimizer_backend != "torch" else 1
    optimizer_seconds = s0.allocated / shard * 36 / hw.memory_bytes_per_s
    step = max(compute, default=0.0) + dp_seconds + optimizer_seconds
    mean = float(np.mean(compute)) if compute else 0.0
    return Prediction(
        step_seconds=step,
        compute_seconds=compute,
        dp_seconds=dp_seconds,
        optimizer_seconds=optimizer_seconds,
        bubble=max(bubbles, default=0.0),
        imbalance=max(compute) / mean if mean else 1.0,
        flops=flops,
        communication_bytes={**{dim: max(v) for dim, v in sums.items()}, "dp": dp_wire},
        memory=memory,
    )


def rank_entries(pred: Prediction, shapes, layout: Layout, hw: HardwareProfile) -> list[dict]:
    """The JSON ``ranks`` list: every global rank with its coordinates, parameters and memory."""
    out = []
    for (t, e, p, d), terms in pred.memory.items():
        total = sum(terms.values()) + hw.reserved_bytes
        for c in range(layout.cp):
            out.append(
                {
                    "rank": global_rank(t, p, d, layout.tp, layout.dp, c, layout.cp, e, layout.ep),
                    "coords": {"tp": t, "cp": c, "ep": e, "pp": p, "dp": d},
                    "parameters": shapes[t, e, p].parameters,  # CP ranks: replicas, as DP ranks
                    "memory_bytes": {
                        **{k: int(v) for k, v in terms.items()},
                        "reserved": int(hw.reserved_bytes),
                        "total": int(total),
                    },
                }
            )
    return sorted(out, key=lambda r: r["rank"])


def mfu(pred: Prediction, layout: Layout, hw: HardwareProfile) -> float:
    return pred.flops / (pred.step_seconds * layout.world * hw.peak_flops) if pred.step_seconds else math.nan
