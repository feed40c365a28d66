"""Step time, communication and memory of one layout, from the plan's real units and schedule.

``Workload`` runs the project's own code on the step's global batch: the balancer splits it over
the data-parallel ranks (``balancer.balance``, as ``train.local_microbatches`` does), each
microbatch is planned in the engine's mode (``engine.plan.build_plan``) and reduced to its event
sequence (``Plan.events``) with the executor's keep-or-recompute rule replayed on it. ``predict``
prices every event on every pipeline stage with a ``HardwareProfile`` (work in ``Work`` units),
adds the tensor-parallel all-reduces and pipeline sends of that event, runs the DFS pipeline
schedule (``pipeline.dfs_schedule``) over the microbatches for the bubble and the in-flight
activation peak, and adds the data-parallel gradient reduction and the optimizer step.

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
            (backward, backward and not keep[id(unit)], T, pairs, unit.prefix_len, len(unit.pair_target))
        )
    a = np.array(rows, dtype=np.int64).reshape(-1, 6)
    return Events(
        a[:, 0].astype(bool),
        a[:, 1].astype(bool),
        a[:, 2],
        a[:, 3],
        a[:, 4],
        a[:, 5],
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

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def _work(ev: Events, s: RankShape):
    """(linear FLOPs, attention FLOPs, memory-bound bytes, kernel calls) of each event on stage ``s``
    (arrays [E]): forward 1x, backward 2x matmuls and 2.5x attention, plus the recomputed forward."""
    b, L = s.dtype_bytes, s.layers
    lin = 2.0 * ev.tokens * s.linear_weights + 2.0 * ev.head * s.head_rows * s.hidden
    attn = 4.0 * ev.pairs * s.q_heads * s.head_dim * L
    qkv = (s.q_heads + 2 * s.kv_heads) * s.head_dim
    # norms, residuals, rotary, SiLU: a few reads and writes of each [T, H], [T, F], [T, qkv];
    # the prefix K/V is concatenated in front of the unit's own (read and written) every layer;
    # the LM head writes and re-reads its [rows, V_local] logits in float32
    mem = ev.tokens * L * b * (8.0 * s.hidden + 6.0 * s.ffn + 4.0 * qkv)
    mem = mem + ev.prefix * L * 4.0 * s.kv_heads * s.head_dim * b + ev.head * s.head_rows * 12.0
    calls = np.full(len(ev.tokens), L + int(s.is_last), dtype=np.float64)
    fwd = np.stack([lin, attn, mem, calls])
    bwd = fwd * np.array([2.0, 2.5, 2.0, 1.0])[:, None] + fwd * ev.recompute
    return np.where(ev.backward, bwd, fwd)


def work(ev: Events, s: RankShape) -> np.ndarray:
    """[4] total work of a microbatch on stage ``s``, in the order ``HardwareProfile.seconds`` takes."""
    return _work(ev, s).sum(axis=1)


def _ring(size: float, n: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``size`` bytes over ``n`` ranks."""
    return 2.0 * (n - 1) / n * size


@dataclass
class RankCost:
    seconds: np.ndarray  # [E] per event on this stage (compute + its TP all-reduces + its send)
    flops: float  # linear + attention, recomputation excluded (useful work)
    tp_bytes: float
    pp_bytes: float


def event_costs(ev: Events, s: RankShape, layout: Layout, hw: HardwareProfile) -> RankCost:
    w = _work(ev, s)
    useful = _work(Events(**{**ev.__dict__, "recompute": np.zeros_like(ev.recompute)}), s)
    seconds = hw.seconds(*w)
    tp_bytes = pp_bytes = 0.0
    H, b = s.hidden, s.dtype_bytes
    if layout.tp > 1:
        # two [T, H] all-reduces per layer forward (attention and MLP outputs), two backward (the
        # inputs of qkv and gate_up), one more backward for the LM head input; a recompute
        # repeats the forward's
        n = 2 * s.layers * (1 + ev.backward + ev.recompute) + (s.is_last & ev.backward)
        wire = n * _ring(ev.tokens * H * b, layout.tp)
        seconds = seconds + wire / hw.link_bytes_per_s(layout.tp) + n * hw.collective_latency_s
        tp_bytes = float(wire.sum())
    if layout.pp > 1:
        # a forward sends [T, H] on (not from the last stage), a backward its gradient back
        # (not from the first)
        sends = np.where(ev.backward, not s.is_first, not s.is_last)
        wire = sends * ev.tokens * H * b
        seconds = (
            seconds + wire / hw.link_bytes_per_s(layout.tp * layout.dp + 1) + sends * hw.collective_latency_s
        )
        pp_bytes = float(wire.sum())
    return RankCost(seconds, float(useful[0].sum() + useful[1].sum()), tp_bytes, pp_bytes)


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
    memory: dict = field(default_factory=dict)  # {(tp_rank, pp_rank, dp_rank): {term: bytes}}


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


def predict(
    shapes: dict[tuple[int, int], RankShape],
    layout: Layout,
    hw: HardwareProfile,
    events: list[list[Events]],
    optimizer_backend: str = "torch",
    zero_stage: int = 1,
) -> Prediction:
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    compute, bubbles, flops = [], [], 0.0
    tp_bytes, pp_bytes = [0.0] * dp, [0.0] * dp
    memory: dict = {}
    for d, micro in enumerate(events):
        # one TP rank per stage suffices for time: TP ranks of a stage do the same work
        costs = [[event_costs(ev, shapes[0, p], layout, hw) for ev in micro] for p in range(pp)]
        flops += tp * sum(c.flops for stage in costs for c in stage)
        tp_bytes[d] = max((sum(c.tp_bytes for c in stage) for stage in costs), default=0.0)
        pp_bytes[d] = max((sum(c.pp_bytes for c in stage) for stage in costs), default=0.0)
        busy = [sum(float(c.seconds.sum()) for c in stage) for stage in costs]
        runs = [min(1, len(micro))] * pp
        bubble = 0.0
        if pp > 1 and micro:
            sched = dfs_schedule(
                [list(zip(ev.backward.tolist(), ev.tokens.tolist())) for ev in micro], pp, layout.in_flight
            )
            bubble, runs = sched.bubble, sched.peak_in_flight
        # each run in flight on a stage holds at most its own path's peak (the executor's budget
        # applies per run); the schedule's kept-token count ignores the budget's recomputation
        path_peak = max((ev.peak_path_tokens for ev in micro), default=0)
        kept = [runs[p] * path_peak for p in range(pp)]
        bubbles.append(bubble)
        compute.append(max(busy) / (1.0 - bubble) if busy else 0.0)
        max_path = max((ev.max_path for ev in micro), default=0)
        max_unit = max((int(ev.tokens.max(initial=0)) for ev in micro), default=0)
        max_scores = max((ev.max_scores for ev in micro), default=0)
        for (t, p), s in shapes.items():
            grads, state = _optimizer_bytes(s, optimizer_backend, zero_stage, dp)
            acts = kept[p] * s.activation_bytes_per_token
            if s.is_last:  # the fused head's float32 logits and exponentials of one chunk
                acts += 2 * min(LM_HEAD_CHUNK, max_unit) * s.head_rows * 4
            if hw.attention_scores_materialized:  # one layer's scores and probabilities, float32
                acts += 2 * max_scores * s.q_heads * 4
            memory[t, p, d] = {
                "weights": float(s.allocated * s.dtype_bytes),
                "grads": float(grads),
                "optimizer": float(state),
                "activations": float(acts),
                "kv_stacks": float(runs[p] * max_path * s.kv_stack_bytes_per_position),
            }
    # data parallel: the gradients cross the DP group once per step (all-reduce; reduce-scatter +
    # all-gather for the sharded optimizers), after the last backward
    s0 = max(shapes.values(), key=lambda s: s.allocated)
    grad_b = 4 if optimizer_backend == "megatron" else s0.dtype_bytes
    dp_wire = _ring(s0.allocated * grad_b, dp) if dp > 1 else 0.0
    dp_seconds = dp_wire / hw.link_bytes_per_s(tp * dp) + (
        2 * (dp - 1) * hw.collective_latency_s if dp > 1 else 0
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
        communication_bytes={"tp": max(tp_bytes), "cp": 0.0, "ep": 0.0, "pp": max(pp_bytes), "dp": dp_wire},
        memory=memory,
    )


def rank_entries(pred: Prediction, shapes, layout: Layout, hw: HardwareProfile) -> list[dict]:
    """The JSON ``ranks`` list: every global rank with its coordinates, parameters and memory."""
    out = []
    for (t, p, d), terms in pred.memory.items():
        total = sum(terms.values()) + hw.reserved_bytes
        out.append(
            {
                "rank": global_rank(t, p, d, layout.tp, layout.dp),
                "coords": {"tp": t, "cp": 0, "ep": 0, "pp": p, "dp": d},
                "parameters": shapes[t, p].parameters,
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
