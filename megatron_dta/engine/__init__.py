"""One engine API over the three execution modes (dense, sparse, dta).

``Engine.forward_backward(rollouts, loss)`` plans the batch for the chosen mode, runs every unit
and leaves the gradients of the loss in the model's parameters; ``Engine.logprobs(rollouts)`` is
the no-grad forward. Both return per-rollout, per-token float64 log-probabilities in the rollout
layout (entry 0 is 0.0). The result is the same in every mode up to float round-off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from megatron_dta.attention import BACKENDS, get_attention_backend
from megatron_dta.engine.context_parallel import CPExecutor
from megatron_dta.engine.executor import Executor, Run
from megatron_dta.engine.memory import MemoryModel, fit_plan
from megatron_dta.engine.plan import MODES, Plan, build_plan, seq_offsets_of
from megatron_dta.engine.routing import (
    MoEState,
    check_routes,
    refuse_route_conflicts,
    relabel_tokens,
    route_keys,
    routes_table,
)
from megatron_dta.errors import ConfigError, UserError
from megatron_dta.losses import PolicyLoss
from megatron_dta.rollouts import Rollout

ROUTE_CONFLICTS = ("refuse", "split")

__all__ = ["MODES", "Engine", "EngineConfig", "Plan", "StepResult"]


@dataclass
class EngineConfig:
    mode: str = field(
        default="dta",
        metadata={
            "help": (
                "dta: DFS over the prefix forest reusing ancestors' K/V; sparse: packed microbatches under "
                "a tree mask; dense: every rollout in full"
            )
        },
    )
    block_size: int = field(
        default=2048, metadata={"help": "dta: max tokens of one chunk of a long node (per-path chunks)"}
    )
    pack_tokens: int | None = field(
        default=None,
        metadata={"help": "dta: max tokens of sibling segments packed into one unit; null: block_size"},
    )
    activation_budget_tokens: int = field(
        default=1 << 20,
        metadata={
            "help": (
                "dta: tokens whose activations are kept on the DFS path; beyond that parents are recomputed"
            )
        },
    )
    max_tokens_per_microbatch: int | None = field(
        default=None, metadata={"help": "sparse: max unique tokens packed into one unit; null: no limit"}
    )
    memory_budget_mib: float | None = field(
        default=None,
        metadata={
            "help": (
                "cap on the step's memory rise above weights, grads and optimizer state: dta picks block "
                "size and what to recompute, sparse splits microbatches (engine/memory.py); null: no cap"
            )
        },
    )
    attention: str = field(
        default="auto",
        metadata={
            "help": (
                f"attention backend: auto, {', '.join(BACKENDS)} (megatron_dta/attention.py); auto: the "
                "fastest exact one"
            )
        },
    )

    route_conflicts: str = field(
        default="refuse",
        metadata={
            "help": (
                "MoE routing replay, rollouts sharing tokens with different routed_experts: refuse (one "
                "line naming file, line, position and layer) or split (separate copies from the first "
                "conflicting token)"
            )
        },
    )

    def __post_init__(self):
        if self.route_conflicts not in ROUTE_CONFLICTS:
            raise ConfigError(
                f"engine.route_conflicts '{self.route_conflicts}' must be one of {ROUTE_CONFLICTS}"
            )
        if self.mode not in MODES:
            raise ConfigError(f"engine.mode '{self.mode}' must be one of {MODES}")
        if self.block_size < 1:
            raise ConfigError(f"engine.block_size must be >= 1, got {self.block_size}")
        if self.memory_budget_mib is not None and not self.memory_budget_mib > 0:
            raise ConfigError(
                f"engine.memory_budget_mib must be > 0 MiB or null, got {self.memory_budget_mib}"
            )
        if self.attention not in ("auto", *BACKENDS):
            raise ConfigError(f"engine.attention '{self.attention}' must be one of {('auto', *BACKENDS)}")


@dataclass
class StepResult:
    loss: torch.Tensor  # 0-dim float64
    logprobs: list[np.ndarray]  # per rollout, float64 [L], entry 0 = 0
    entropy: list[np.ndarray]
    stats: dict
    plan: Plan
    recomputed_tokens: int


def refuse_cp_with_moe(cp: bool, moe: bool) -> None:
    """Context parallelism does not route MoE tokens yet (the engine and the planner refuse it)."""
    if cp and moe:
        raise ConfigError("parallel.cp > 1 with an MoE model is not supported yet: use parallel.ep")


class Engine:
    def __init__(self, model, cfg: EngineConfig | None = None, device: str = "cpu", cp_group=None):
        """``cp_group``: the layout's context-parallel group (None: cp = 1); its ranks share every
        unit's tokens (engine/context_parallel.py) and must all run the same calls."""
        self.model, self.cfg, self.device = model, cfg or EngineConfig(), device
        cp = cp_group is not None and dist.get_world_size(cp_group) > 1
        self._refuse_unsupported(cp)
        self.memory: MemoryModel | None = None  # measured at the first plan under a memory budget
        if cp:
            self.executor = CPExecutor(model, self.cfg.activation_budget_tokens, device, cp_group)
            return
        self.executor = Executor(
            model,
            get_attention_backend(self.cfg.attention, device),
            self.cfg.activation_budget_tokens,
            device,
        )

    def _refuse_unsupported(self, cp: bool) -> None:
        """Combinations not built yet, refused once when the engine is made."""
        moe = bool(self.model.cfg.num_experts)
        refuse_cp_with_moe(cp, moe)
        if self.cfg.memory_budget_mib is not None and moe:
            raise ConfigError("engine.memory_budget_mib does not model MoE layers yet: set it to null")
        if self.cfg.memory_budget_mib is not None and cp:
            raise ConfigError(
                "engine.memory_budget_mib does not model context parallelism yet: use parallel.cp=1 or set "
                "engine.memory_budget_mib to null"
            )

    def check_rollouts(self, rollouts: list[Rollout]) -> None:
        """Routing replay against the model (``routed_experts``: shapes, expert ids, conflicting
        routes of shared tokens when engine.route_conflicts=refuse): the trainer calls it on the
        whole data set when it is loaded, ``plan`` on every batch."""
        replay = any(r.routed_experts is not None for r in rollouts)
        if replay and not self.model.cfg.num_experts:
            i = next(i for i, r in enumerate(rollouts) if r.routed_experts is not None)
            raise UserError(
                f"{rollouts[i].source or f'rollout {i}'}: field 'routed_experts': the model has no "
                "mixture-of-experts layers to replay routes in"
            )
        if self.model.cfg.num_experts:
            check_routes(rollouts, self.model.cfg)
            if replay and self.cfg.route_conflicts == "refuse":
                refuse_route_conflicts(rollouts)

    def plan(self, rollouts: list[Rollout]) -> Plan:
        if not rollouts:
            raise ValueError("the engine needs at least one rollout per call (skip empty microbatches)")
        seqs, key_to_token = [r.input_ids for r in rollouts], None
        self.check_rollouts(rollouts)
        if rollouts[0].routed_experts is not None and self.cfg.route_conflicts == "split":
            seqs, key_to_token = route_keys(rollouts)
        c = self.cfg
        if c.memory_budget_mib is not None:
            if self.memory is None:
                self.memory = MemoryModel.probe(self.executor)
            plan = fit_plan(
                self.memory,
                c.memory_budget_mib,
                c.mode,
                seqs,
                c.block_size,
                c.max_tokens_per_microbatch,
                c.pack_tokens,
            )
        else:
            plan = build_plan(
                c.mode,
                seqs,
                seq_offsets_of([len(s) for s in seqs]),
                c.block_size,
                c.max_tokens_per_microbatch,
                c.pack_tokens,
            )
        if key_to_token is not None:
            relabel_tokens(plan, key_to_token)
        return plan

    def start(
        self,
        rollouts: list[Rollout],
        loss: PolicyLoss | None = None,
        denominator: float | None = None,
        num_rollouts: int | None = None,
        forward_only: bool = False,
    ) -> EngineRun:
        """Plan ``rollouts`` and return a run whose ``events`` generator performs one unit event
        (forward or backward) per ``next()``; ``finish`` turns it into a ``StepResult``. Several
        runs may be alive at once (the pipeline schedule interleaves microbatches this way).
        ``num_rollouts``: rollouts of the global batch, which the MoE load-balancing loss averages
        over (default: this batch's)."""
        plan = self.plan(rollouts)
        if forward_only:
            table, loss = {"mask": torch.zeros(sum(len(r) for r in rollouts), dtype=torch.float64)}, None
        else:
            loss = loss or PolicyLoss()
            table = loss.token_table(rollouts, denominator)
        moe = None
        if self.model.cfg.num_experts:
            lengths = [len(r) for r in rollouts]
            moe = MoEState.create(self.model.cfg, lengths, num_rollouts, routes_table(rollouts), self.device)
        return EngineRun(rollouts, plan, self.executor.start(plan, table, loss, forward_only, moe))

    def finish(self, run: EngineRun) -> StepResult:
        out = self.executor.finish(run.state)
        splits = np.cumsum([len(r) for r in run.rollouts])[:-1]
        lps = np.split(out.logprobs.numpy(), splits)
        ents = np.split(out.entropy.numpy(), splits)
        return StepResult(out.loss, lps, ents, out.stats, run.plan, out.recomputed_tokens)

    def _drain(self, run: EngineRun) -> StepResult:
        for _ in run.events:
            pass
        return self.finish(run)

    def forward_backward(
        self,
        rollouts: list[Rollout],
        loss: PolicyLoss | None = None,
        denominator: float | None = None,
        num_rollouts: int | None = None,
    ) -> StepResult:
        """Loss over ``rollouts``; gradients accumulate into the parameters' ``.grad`` (or their float32
        ``main_grad`` while an optimizer attaches them: ``grads.py``).

        ``denominator`` is the loss normalizer over the *global* batch (all ranks and microbatches);
        by default this batch's own.
        """
        return self._drain(self.start(rollouts, loss, denominator, num_rollouts=num_rollouts))

    @torch.no_grad()
    def logprobs(self, rollouts: list[Rollout]) -> StepResult:
        return self._drain(self.start(rollouts, forward_only=True))


@dataclass
class EngineRun:
    rollouts: list[Rollout]
    plan: Plan
    state: Run

    @property
    def events(self):
        return self.state.events
