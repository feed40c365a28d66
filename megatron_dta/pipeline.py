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

Invariant (deadlock freedom): on every stage the point-to-point operations are issued in one
order, the DFS order of (forward u, backward u) events, so the k-th message each way between two
neighbouring stages is the same unit's on both ends. A unit that is not kept saves its received
hidden_in and is recomputed from it for its backward, without communication.

Microbatches run one after another (no microbatch interleaving yet): within one, stages overlap
along the DFS (stage s+1 works on unit u while stage s moves on to u's first child).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dta.engine import Engine, EngineConfig, StepResult
from megatron_dta.engine.executor import ChunkKV, Executor
from megatron_dta.engine.plan import Unit


def _ranks():
    """(prev, next) global ranks of this stage's pipeline neighbours; None at the ends."""
    from megatron.core import parallel_state as ps

    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    return (None if first else ps.get_pipeline_model_parallel_prev_rank(),
            None if last else ps.get_pipeline_model_parallel_next_rank())


class StageExecutor(Executor):
    """The DTA executor on one pipeline stage: the traversal is inherited unchanged; the unit's
    forward and backward exchange hidden states with the neighbouring stages."""

    def __init__(self, model, attention, activation_budget_tokens: int = 1 << 20, device="cpu"):
        super().__init__(model, attention, activation_budget_tokens, device)
        self.prev, self.next = _ranks()
        self._sends: list = []

    def run(self, plan, table, loss_fn=None, forward_only=False):
        try:
            return super().run(plan, table, loss_fn, forward_only)
        finally:  # hidden states were sent from tensors nobody reuses; wait so they can be freed
            for work in self._sends:
                work.wait()
            self._sends = []

    def _send(self, t: torch.Tensor, dst: int) -> None:
        # drop finished sends so that sent hidden states are freed along the DFS, not per microbatch
        self._sends = [w for w in self._sends if not w.is_completed()]
        self._sends.append(dist.isend(t.detach().contiguous(), dst))

    def _recv(self, unit: Unit, src: int) -> torch.Tensor:
        buf_TH = torch.empty((unit.num_tokens, self.model.cfg.hidden_size), dtype=self.model.dtype, device=self.device)
        dist.irecv(buf_TH, src).wait()
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
            x_in = saved.x_in if saved is not None else self._recv(unit, self.prev)
            x = x_in.detach().requires_grad_(torch.is_grad_enabled())
        out_TH = m.forward_stage(x, unit.position_ids.to(self.device), ctx)
        ctx.x_in, ctx.out = (None if x_in is None else x), out_TH
        if saved is None and not m.is_last:
            self._send(out_TH, self.next)
        return out_TH

    def _backward_roots(self, unit: Unit, ctx: ChunkKV, loss):
        if self.model.is_last:
            return super()._backward_roots(unit, ctx, loss)
        return [ctx.out], [self._recv(unit, self.next)]

    def _after_backward(self, unit: Unit, ctx: ChunkKV) -> None:
        if not self.model.is_first:  # a unit without loss or children still owes the previous stage a grad
            g = ctx.x_in.grad
            self._send(torch.zeros_like(ctx.x_in) if g is None else g, self.prev)


def _tied_weight(model):
    """This stage's half of a tied embedding split over the first and last stage, or None."""
    if not model.cfg.tie_embeddings or model.stage[1] == 1 or not (model.is_first or model.is_last):
        return None
    return model.embed.weight if model.is_first else model.lm_head.weight


def sync_tied_embedding_grads(model, before: torch.Tensor | None = None) -> None:
    """Sum what this step added to the grads of the tied embedding (first stage) and its copy
    (last stage's ``lm_head``); ``before`` is the grad at the step's start, so that gradient
    accumulation over several calls does not sum earlier calls' grads twice."""
    from megatron.core import parallel_state as ps

    w = _tied_weight(model)
    if w is None:
        return
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    delta = w.grad if before is None else w.grad - before
    dist.all_reduce(delta, group=ps.get_embedding_group())
    if before is not None:
        w.grad.copy_(before + delta)


def forward_backward_pipelining_dfs(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                    seq_length=None, micro_batch_size=None, decoder_seq_length=None,
                                    forward_only: bool = False, collect_non_loss_data: bool = False,
                                    first_val_step=None, engine_config: EngineConfig | None = None,
                                    device: str = "cpu") -> list[StepResult]:
    """Megatron's schedule signature over DFS units (``seq_length``, ``micro_batch_size``,
    ``decoder_seq_length``, ``collect_non_loss_data``, ``first_val_step`` are accepted for
    drop-in compatibility and ignored: units carry their own shapes).

    ``forward_step_func(data_iterator, model) -> (rollouts, loss, denominator)`` yields one
    microbatch (a list of rollouts: a tree or subtree), its ``PolicyLoss`` and the global loss
    normalizer. Gradients accumulate in ``model``'s parameters (tied embeddings summed across the
    first and last stage). Returns one ``StepResult`` per microbatch; logprobs, loss and stats are
    filled on the last stage only (zeros elsewhere), as in Megatron.
    """
    stage_model = model[0] if isinstance(model, (list, tuple)) else model
    engine = Engine(stage_model, engine_config or EngineConfig(), device)
    ex = engine.executor
    engine.executor = StageExecutor(stage_model, ex.attention, ex.budget, device)
    tied = _tied_weight(stage_model)
    before = None if tied is None or tied.grad is None else tied.grad.clone()
    results = []
    for _ in range(num_microbatches):
        rollouts, loss, denominator = forward_step_func(data_iterator, stage_model)
        if forward_only:
            results.append(engine.logprobs(rollouts))
        else:
            results.append(engine.forward_backward(rollouts, loss, denominator))
    if not forward_only:
        sync_tied_embedding_grads(stage_model, before)
    return results
