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

from megatron_dta.attention import BACKENDS, get_attention_backend
from megatron_dta.engine.executor import Executor, Run
from megatron_dta.engine.memory import MemoryModel, fit_plan
from megatron_dta.engine.plan import MODES, Plan, build_plan, seq_offsets_of
from megatron_dta.errors import ConfigError
from megatron_dta.losses import PolicyLoss
from megatron_dta.rollouts import Rollout

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

    def __post_init__(self):
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


class Engine:
    def __init__(self, model, cfg: EngineConfig | None = None, device: str = "cpu"):
        self.model, self.cfg, self.device = model, cfg or EngineConfig(), device
        self.executor = Executor(
            model,
            get_attention_backend(self.cfg.attention, device),
            self.cfg.activation_budget_tokens,
            device,
        )
        self.memory: MemoryModel | None = None  # measured at the first plan under a memory budget

    def plan(self, rollouts: list[Rollout]) -> Plan:
        if not rollouts:
            raise ValueError("the engine needs at least one rollout per call (skip empty microbatches)")
        seqs = [r.input_ids for r in rollouts]
        if self.cfg.memory_budget_mib is not None:
            if self.memory is None:
                self.memory = MemoryModel.probe(self.executor)
            c = self.cfg
            return fit_plan(
                self.memory,
                c.memory_budget_mib,
                c.mode,
                seqs,
                c.block_size,
                c.max_tokens_per_microbatch,
                c.pack_tokens,
            )
        return build_plan(
            self.cfg.mode,
            seqs,
            seq_offsets_of([len(s) for s in seqs]),
            self.cfg.block_size,
            self.cfg.max_tokens_per_microbatch,
            self.cfg.pack_tokens,
        )

    def start(
        self,
        rollouts: list[Rollout],
        loss: PolicyLoss | None = None,
        denominator: float | None = None,
        forward_only: bool = False,
    ) -> EngineRun:
        """Plan ``rollouts`` and return a run whose ``events`` generator performs one unit event
        (forward or backward) per ``next()``; ``finish`` turns it into a ``StepResult``. Several
        runs may be alive at once (the pipeline schedule interleaves microbatches this way)."""
        plan = self.plan(rollouts)
        if forward_only:
            table, loss = {"mask": torch.zeros(sum(len(r) for r in rollouts), dtype=torch.float64)}, None
        else:
            loss = loss or PolicyLoss()
            table = loss.token_table(rollouts, denominator)
        return EngineRun(rollouts, plan, self.executor.start(plan, table, loss, forward_only))

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
        self, rollouts: list[Rollout], loss: PolicyLoss | None = None, denominator: float | None = None
    ) -> StepResult:
        """Loss over ``rollouts``; gradients accumulate into the parameters' ``.grad`` (or their float32
        ``main_grad`` while an optimizer attaches them: ``grads.py``).

        ``denominator`` is the loss normalizer over the *global* batch (all ranks and microbatches);
        by default this batch's own.
        """
        return self._drain(self.start(rollouts, loss, denominator))

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
