"""DFS pipeline parallelism: layer stages that each walk the same DTA traversal of a microbatch.

Every stage holds a contiguous slice of layers (``Transformer(..., stage=...)``) and runs the DTA
executor's DFS over the microbatch's plan: the same units, in the same order, with the same
keep-or-recompute decisions (they depend only on the plan and the token budget). A stage keeps the
K/V stacks and K/V gradient stacks of its own layers; only hidden states cross stages:

    forward of unit u on stage s:  recv hidden_in [T, H] from s-1 (stage 0 embeds the ids),
                                   run the stage's layers, isend hidden_out to s+1
                                   (the last stage computes the unit's logprobs and loss)
    backward of unit u on stage s: recv d hidden_out [T, H] from s+1 (the last stage: its loss),
                                   backward with the children's dK/dV of its own layers,
                                   isend d hidden_in to s-1

Several microbatches are in flight (``microbatches_in_flight``, default twice the number of
stages: one DFS path holds far fewer activations than 1F1B's whole microbatch, and a microbatch's
own DFS leaves gaps while a leaf's gradient travels back, which other microbatches fill; see
docs/pipeline.md): each has its own DFS run (K/V stacks, kept activations), and every stage
interleaves the runs' events. The interleaving is a static schedule (``dfs_schedule``): a list
scheduling of all stages' events, costed by tokens, that every rank computes identically from the
microbatches' plans. Each stage executes its own events in that order; while stage 0 waits for a
leaf's gradient to come back up the pipeline it runs another microbatch's forward, so the bubble
shrinks with the number of microbatches as in Megatron's schedules, and memory is bounded by the
paths in flight (per run: its kept path and its stacks), not by whole trees.

Invariant (deadlock freedom): every message an event waits for was sent by an event committed
earlier in the simulated schedule, and each stage executes its events in commit order; so the
earliest blocked event would wait on a completed one, and none blocks forever, whatever the real
durations. On each link between neighbours both ends issue their operations, both directions, in
one order, the commit order of the sending events (``_Link``: receives are posted before any later
send, or when needed, and held until their event runs): gloo and NCCL match point-to-point
messages between two ranks in issue order, and NCCL also runs them in that order on the pair's
one stream, so the two ends never wait on each other's later operation. A unit that is not kept
saves its received hidden_in and is recomputed from it for its backward, without communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_dta.engine import Engine, EngineConfig, StepResult
from megatron_dta.engine.context_parallel import CPExecutor
from megatron_dta.engine.executor import ChunkKV, Executor
from megatron_dta.engine.plan import Unit
from megatron_dta.grads import grad_of
from megatron_dta.parallel import ParallelLayout, all_reduce_over


@dataclass
class Schedule:
    """Per stage, the order of its events as (microbatch, event index), and the simulated timeline."""

    orders: list[list[tuple[int, int]]]
    makespan: float  # simulated, in cost units
    busy: float  # sum of event costs over all stages
    peak_kept_tokens: list[int]  # per stage: max tokens whose forward ran and backward has not
    peak_in_flight: list[int]  # per stage: max microbatches started and not finished
    commits: list[tuple[int, int, int]]  # every (stage, microbatch, event) in commit order

    @property
    def bubble(self) -> float:
        return 1.0 - self.busy / (len(self.orders) * self.makespan) if self.makespan else 0.0


def event_tokens(events: list[tuple[Unit, bool]]) -> list[tuple[bool, int]]:
    """A plan's events (``Plan.events``) as ``dfs_schedule`` takes them: (is_backward, tokens)."""
    return [(backward, unit.num_tokens) for unit, backward in events]


def dfs_schedule(events: list[list[tuple[bool, int]]], stages: int, in_flight: int) -> Schedule:
    """List-schedule the events of every microbatch on ``stages`` stages.

    ``events[j]`` are microbatch j's (is_backward, tokens) in DFS order (``Plan.events``); a forward
    costs its tokens, a backward twice that. Event i of microbatch j on stage s follows event i-1 of
    j on s, and the same event on s-1 (forward) or s+1 (backward). Stage s starts microbatches in
    order, at most ``in_flight`` at a time. Each commit takes the stage whose next event can start
    earliest; a stage prefers, at equal start, a backward (it frees memory, as in 1F1B), then the
    older microbatch. Deterministic: every rank computes the same schedule.
    """
    m, p = len(events), stages
    done = [[[None] * len(ev) for ev in events] for _ in range(p)]  # finish time per stage, event
    nxt = [[0] * m for _ in range(p)]
    active = [[] for _ in range(p)]  # microbatches started and not finished, per stage
    started = [0] * p
    free = [0.0] * p
    orders = [[] for _ in range(p)]
    commits = []
    kept, peak_kept, peak_flight = [0] * p, [0] * p, [0] * p
    busy = 0.0

    def best_of(s):
        """(start, stage, forward?, microbatch), i of stage s's best next event, or None."""
        best = None
        for j in active[s] + ([started[s]] if started[s] < m and len(active[s]) < in_flight else []):
            i = nxt[s][j]
            backward = events[j][i][0]
            t, nb = free[s], s + 1 if backward else s - 1
            if 0 <= nb < p:
                if done[nb][j][i] is None:
                    continue
                t = max(t, done[nb][j][i])
            key = (t, s, not backward, j)  # earliest start, then stage, backward, older
            if best is None or key < best[0]:
                best = (key, i)
        return best

    # a commit on stage s changes only the candidates of s and of one neighbour: cache the rest
    cache = [best_of(s) for s in range(p)]
    for _ in range(p * sum(len(ev) for ev in events)):
        best = min((c for c in cache if c is not None), default=None)
        assert best is not None, "schedule stalled: no event can start"
        ((t, s, _, j), i) = best
        backward, tokens = events[j][i]
        cost = (2.0 if backward else 1.0) * tokens
        done[s][j][i] = free[s] = t + cost
        busy += cost
        orders[s].append((j, i))
        commits.append((s, j, i))
        if i == 0:
            active[s].append(j)
            started[s] += 1
            peak_flight[s] = max(peak_flight[s], len(active[s]))
        nxt[s][j] = i + 1
        if i + 1 == len(events[j]):
            active[s].remove(j)
        kept[s] += -tokens if backward else tokens
        peak_kept[s] = max(peak_kept[s], kept[s])
        for n in (s, s - 1 if backward else s + 1):  # a forward readies s+1's, a backward s-1's
            if 0 <= n < p:
                cache[n] = best_of(n)
    return Schedule(orders, max(free) if events else 0.0, busy, peak_kept, peak_flight, commits)


def link_order(schedule: Schedule, backward: list[list[bool]], upper: int) -> list[tuple[tuple, int]]:
    """(event key, sending stage) of every message between stages ``upper`` and ``upper + 1``, in the
    link's order: forwards sent down by ``upper``, gradients sent up by ``upper + 1``, by commit.
    ``backward[j][i]``: whether event i of microbatch j is a backward."""
    return [
        ((j, i), st)
        for st, j, i in schedule.commits
        if (st == upper and not backward[j][i]) or (st == upper + 1 and backward[j][i])
    ]


class _Link:
    """The messages between this stage and one neighbour, both directions, in the link's order:
    the commit order of the events that send them. Both ends issue their operations in that order
    (a receive is posted before any later send, else when its event needs it), as NCCL requires of
    two ranks sharing a communicator; received tensors wait in ``posted`` until their event runs."""

    def __init__(self, peer: int, seq: list, shape_of, dtype, device):
        self.peer, self.seq, self.shape_of, self.dtype, self.device = peer, seq, shape_of, dtype, device
        self.pos, self.posted = 0, {}

    def _post_receives(self, key, through: bool) -> None:
        """Post the receives before ``key``'s place in the link (and ``key``'s own if ``through``).
        This stage's earlier sends were issued already: its events run in commit order."""
        while self.pos < len(self.seq):
            k, incoming = self.seq[self.pos]
            if k == key and not through:
                return
            assert incoming, "this stage skipped one of its sends"
            buf = torch.empty(self.shape_of(k), dtype=self.dtype, device=self.device)
            self.posted[k] = (buf, dist.irecv(buf, self.peer))
            self.pos += 1
            if k == key:
                return

    def recv(self, key) -> torch.Tensor:
        if key not in self.posted:
            self._post_receives(key, through=True)
        buf, work = self.posted.pop(key)
        work.wait()
        return buf

    def send(self, key, t: torch.Tensor):
        self._post_receives(key, through=False)
        assert self.seq[self.pos] == (key, False), "send out of the link's order"
        self.pos += 1
        return dist.isend(t, self.peer)


class StageExecutor(Executor):
    """The DTA executor on one pipeline stage: the traversal is inherited unchanged; the unit's
    forward and backward exchange hidden states with the neighbouring stages. ``key`` is the
    (microbatch, event) being executed; ``connect`` sets up the links to the neighbours for a schedule;
    the neighbours are ``layout``'s previous and next pipeline stages (global ranks, None at the ends)."""

    def __init__(self, model, attention, activation_budget_tokens: int, layout: ParallelLayout):
        super().__init__(model, attention, activation_budget_tokens, layout.device)
        self._neighbours(layout)

    def _neighbours(self, layout: ParallelLayout) -> None:
        self.prev, self.next = layout.prev_rank, layout.next_rank
        self._sends: list = []
        self._link: dict = {}
        self.key = None

    def connect(self, schedule: Schedule, events: list[list[tuple[Unit, bool]]]) -> None:
        """The links to the neighbours: forwards travel down (F events of the stage above), gradients
        up (B events of the stage below), each link in commit order."""
        s = self.model.stage[0]
        hidden = self.model.cfg.hidden_size
        rows = lambda key: self._own_rows(events[key[0]][key[1]][0])
        shape_of = lambda key: (rows(key), hidden)
        backward = [[b for _, b in ev] for ev in events]
        for peer, upper in ((self.prev, s - 1), (self.next, s)):  # link between stages upper, upper + 1
            if peer is not None:
                # a message without rows (a CP rank holds none of a short unit) is not sent: both
                # ends leave it out, their rows being the same (the same CP rank of the same unit)
                link = [(key, sender) for key, sender in link_order(schedule, backward, upper) if rows(key)]
                seq = [(key, sender != s) for key, sender in link]
                self._link[peer] = _Link(peer, seq, shape_of, self.model.dtype, self.device)

    def flush(self) -> None:
        """Wait for every send (their tensors are then free) and drop the links."""
        for work in self._sends:
            work.wait()
        self._sends, self._link = [], {}

    def _send(self, t_TH: torch.Tensor, dst: int) -> None:
        if not len(t_TH):
            return  # no rows here: not on the link (connect)
        # drop finished sends so that sent hidden states are freed along the DFS, not per microbatch
        self._sends = [w for w in self._sends if not w.is_completed()]
        self._sends.append(self._link[dst].send(self.key, t_TH.detach().contiguous()))

    def _recv(self, src: int, rows: int) -> torch.Tensor:
        """The [rows, H] message of the current event from ``src`` (``rows``: this rank's rows of
        the unit, all of them without context parallelism)."""
        if not rows:
            return torch.empty((0, self.model.cfg.hidden_size), dtype=self.model.dtype, device=self.device)
        buf_TH = self._link[src].recv(self.key)
        assert buf_TH.shape[0] == rows, "message does not belong to this unit"
        return buf_TH

    @property
    def _has_loss(self) -> bool:
        return self.model.is_last

    def _run_model(self, unit: Unit, ctx: ChunkKV, saved: ChunkKV | None):
        """This stage's layers on hidden_in from the previous stage (or, for a recomputed unit, the
        hidden_in its first pass kept); hidden_out goes to the next stage on the first pass only."""
        m = self.model
        if m.is_first:
            x_in, x = None, unit.input_ids.to(self.device)
        else:
            x_in = saved.x_in if saved is not None else self._recv(self.prev, unit.num_tokens)
            x = x_in.detach().requires_grad_(torch.is_grad_enabled())
        out_TH = m.forward_stage(x, unit.position_ids.to(self.device), ctx)
        ctx.x_in, ctx.out = (None if x_in is None else x), out_TH
        if saved is None and not m.is_last:
            self._send(out_TH, self.next)
        return out_TH

    def _backward_roots(self, unit: Unit, ctx: ChunkKV, loss):
        if self.model.is_last:
            return super()._backward_roots(unit, ctx, loss)
        return [ctx.out], [self._recv(self.next, len(ctx.out))]

    def _after_backward(self, unit: Unit, ctx: ChunkKV) -> None:
        if not self.model.is_first:  # a unit without loss or children still owes the previous stage a grad
            g = ctx.x_in.grad
            self._send(torch.zeros_like(ctx.x_in) if g is None else g, self.prev)


class CPStageExecutor(CPExecutor, StageExecutor):
    """A pipeline stage whose units are split over the layout's CP group (engine/context_parallel.py):
    each CP rank runs its rows of every unit through the stage's layers and exchanges their hidden
    states, and those rows' gradients, with the same CP rank of the neighbouring stages. Rows depend
    only on the unit and the CP rank, so both ends of a link agree on every message's shape; the CP
    collectives of a stage run in its event order, identical on its CP ranks."""

    def __init__(self, model, activation_budget_tokens: int, layout: ParallelLayout):
        CPExecutor.__init__(self, model, activation_budget_tokens, layout.device, layout.cp_group)
        self._neighbours(layout)


def _tied_weight(model):
    """This stage's half of a tied embedding split over the first and last stage, or None."""
    if not model.cfg.tie_embeddings or model.stage[1] == 1 or not (model.is_first or model.is_last):
        return None
    return model.embed.weight if model.is_first else model.lm_head.weight


def sync_tied_embedding_grads(model, group, before: torch.Tensor | None = None) -> None:
    """Sum what this step added to the grads of the tied embedding (first stage) and its copy
    (last stage's ``lm_head``) over ``group`` (the layout's ``embedding_group``); ``before`` is the
    grad at the step's start, so that gradient accumulation over several calls does not sum earlier
    calls' grads twice."""
    w = _tied_weight(model)
    if w is None:
        return
    if grad_of(w) is None:
        w.grad = torch.zeros_like(w)
    g = grad_of(w)  # the main grad while an optimizer accumulates
    delta = g if before is None else g - before
    dist.all_reduce(delta, group=group)
    if before is not None:
        g.copy_(before + delta)


def forward_backward_pipelining_dfs(
    *,
    forward_step_func,
    data_iterator,
    model,
    num_microbatches: int,
    seq_length=None,
    micro_batch_size=None,
    decoder_seq_length=None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step=None,
    layout: ParallelLayout,
    engine_config: EngineConfig | None = None,
    microbatches_in_flight: int | None = None,
) -> list[StepResult]:
    """Megatron's schedule signature over DFS units (``seq_length``, ``micro_batch_size``,
    ``decoder_seq_length``, ``collect_non_loss_data``, ``first_val_step`` are accepted for
    drop-in compatibility and ignored: units carry their own shapes). ``layout`` plays the part
    of megatron's ``pg_collection``: the pipeline neighbours, the tied embedding's group, the device.

    ``forward_step_func(data_iterator, model) -> (rollouts, loss, denominator[, num_rollouts])``
    yields one microbatch (a list of rollouts: a tree or subtree), its ``PolicyLoss``, the global
    loss normalizer and (MoE) the global batch's rollout count; it is called ``num_microbatches``
    times up front, since the schedule is computed from all the microbatches' plans.
    ``microbatches_in_flight`` (default: the layout's, else twice the number of stages) bounds the
    microbatches a stage has started and not finished. Gradients
    accumulate in ``model``'s parameters (tied embeddings summed across the first and last stage).
    Returns one ``StepResult`` per microbatch; logprobs, loss and stats are filled on the last stage
    only (zeros elsewhere), as in Megatron.
    """
    stage_model = model[0] if isinstance(model, (list, tuple)) else model
    stage, stages = stage_model.stage
    assert stage_model.stage == layout.stage, "the model was built for another pipeline stage"
    engine = Engine(stage_model, engine_config or EngineConfig(), layout.device, layout.cp_group)
    if layout.cp > 1:
        ex = CPStageExecutor(stage_model, engine.executor.budget, layout)
    else:
        ex = StageExecutor(stage_model, engine.executor.attention, engine.executor.budget, layout)
    engine.executor = ex
    tied = _tied_weight(stage_model)
    before = None if tied is None or grad_of(tied) is None else grad_of(tied).clone()

    runs = [
        engine.start(*forward_step_func(data_iterator, stage_model), forward_only=forward_only)
        for _ in range(num_microbatches)
    ]
    events = [run.plan.events(forward_only) for run in runs]
    in_flight = microbatches_in_flight or layout.microbatches_in_flight or 2 * stages
    schedule = dfs_schedule([event_tokens(ev) for ev in events], stages, in_flight)
    ex.connect(schedule, events)
    results: list = [None] * num_microbatches
    try:
        for j, i in schedule.orders[stage]:
            ex.key = (j, i)
            unit, backward = next(runs[j].events)
            assert unit is events[j][i][0] and backward == events[j][i][1], "executor left the schedule"
            if i + 1 == len(events[j]):
                next(runs[j].events, None)  # the run's trailing work: frees its stacks
                results[j] = engine.finish(runs[j])
    finally:
        ex.flush()
    if not forward_only:
        sync_tied_embedding_grads(stage_model, layout.embedding_group, before)
        _sum_aux_losses(stage_model, results, layout)
    return results


def _sum_aux_losses(model, results, layout) -> None:
    """Each stage computed the MoE load-balancing loss of its own layers: the last stage's results
    get the sum over stages (their gradients are already in each stage's parameters)."""
    if not model.cfg.num_experts:
        return
    own = torch.tensor([r.stats.get("aux_loss", 0.0) for r in results], dtype=torch.float64)
    total = all_reduce_over(own.clone(), layout.pp_group)
    if model.is_last:
        for r, mine, all_stages in zip(results, own.tolist(), total.tolist()):
            r.loss = r.loss + (all_stages - mine)
            r.stats["aux_loss"] = all_stages
