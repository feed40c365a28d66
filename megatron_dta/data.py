"""Training data: the rollout set, which rollouts each step trains on, and their old log-probs.

Every rank holds the whole rollout set and draws the same global batch each step (``TreeSampler``
keeps prefix trees and groups together, is seeded, and its position is part of the checkpoint);
``balancer.balance`` then decides which rank computes which rollouts. Rollouts without
``old_logprobs`` get them from the policy the first time they are trained on
(``fill_old_logprobs``): that step is on-policy, and later steps on the same rollouts are PPO
updates against that behaviour policy. The filled values are part of the data state, so a resumed
run sees exactly the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_dta.rollouts import Rollout, load_rollouts
from megatron_dta.sampler import TreeSampler
from megatron_dta.synthetic import WORKLOADS, make_workload


@dataclass
class DataConfig:
    rollouts: str | None = None  # a rollout file (JSON Lines); or null for a synthetic workload
    workload: str | None = "demo"  # synthetic workload name (megatron_dta.synthetic)
    workload_args: dict = field(default_factory=dict)  # its generator's keyword arguments
    rollouts_per_step: int | None = None  # global batch size in rollouts; null: all rollouts every step
    microbatch_tokens: int | None = None  # max unique tokens of one microbatch on a rank; null: one
    fill_old_logprobs: bool = True
    seed: int = 0  # synthetic workload and sampling order
    cost_model: str | None = None  # balancer cost model JSON from tools/calibrate.py; null: defaults
    # online mode (megatron_dta/online.py): data.rollouts is a directory a producer fills with
    # step_000001.jsonl, step_000002.jsonl, ...; the weights go back after every step
    follow: bool = False
    epochs_per_file: int = 1  # PPO passes over each file (each pass: its rollouts_per_step steps)
    follow_timeout: float = 600.0  # seconds to wait for the next file before giving up
    publish_dir: str | None = None  # HF weights published here after every step; null: DIR/weights
    publish_keep: int = 2  # published checkpoints kept (``latest`` points at the newest)

    def __post_init__(self):
        if (self.rollouts is None) == (self.workload is None):
            raise ValueError(
                "set exactly one of data.rollouts (a JSONL file) and data.workload "
                f"(one of {sorted(WORKLOADS)}); set the other to null"
            )
        if self.workload is not None and self.workload not in WORKLOADS:
            raise ValueError(f"data.workload '{self.workload}' is unknown; choose one of {sorted(WORKLOADS)}")
        if self.rollouts_per_step is not None and self.rollouts_per_step < 1:
            raise ValueError(
                f"data.rollouts_per_step must be >= 1 or null (all rollouts), got {self.rollouts_per_step}"
            )
        if self.microbatch_tokens is not None and self.microbatch_tokens < 1:
            raise ValueError(
                f"data.microbatch_tokens must be >= 1 or null (no limit), got {self.microbatch_tokens}"
            )
        if self.follow and self.rollouts is None:
            raise ValueError(
                "data.follow=true needs data.rollouts: the directory the producer writes "
                "step_000001.jsonl, step_000002.jsonl, ... into (and data.workload=null)"
            )
        if self.epochs_per_file < 1:
            raise ValueError(f"data.epochs_per_file must be >= 1, got {self.epochs_per_file}")
        if not self.follow_timeout > 0:
            raise ValueError(f"data.follow_timeout must be > 0 seconds, got {self.follow_timeout}")
        if self.publish_keep < 1:
            raise ValueError(f"data.publish_keep must be >= 1, got {self.publish_keep}")
        if self.cost_model is not None and not Path(self.cost_model).is_file():
            raise ValueError(
                f"data.cost_model '{self.cost_model}' is not a file: write one with "
                "tools/calibrate.py --out FILE, or set data.cost_model to null"
            )

    def load_cost_model(self):
        """The balancer's cost model: the calibrated file (read once per process), or the defaults."""
        return _cost_model(self.cost_model)


@functools.lru_cache(maxsize=4)
def _cost_model(path: str | None):
    from megatron_dta.balancer import CostModel

    return CostModel.load(path) if path else CostModel()


def load_dataset(cfg: DataConfig, vocab_size: int) -> list[Rollout]:
    if cfg.rollouts is not None:
        return load_rollouts(cfg.rollouts, vocab_size)
    try:
        return make_workload(cfg.workload, vocab_size, cfg.seed, **cfg.workload_args)
    except TypeError as exc:  # an argument the generator does not take
        raise ValueError(f"data.workload_args: {exc}") from None


class TrainData:
    """The rollout set, its sampler and the old log-probs filled in so far. ``rollouts``, when
    given, replaces the configured data set (one online file, or one ``Trainer.step`` batch)."""

    def __init__(self, cfg: DataConfig, vocab_size: int, rollouts: list[Rollout] | None = None):
        self.cfg = cfg
        self.rollouts = load_dataset(cfg, vocab_size) if rollouts is None else list(rollouts)
        self.sampler = TreeSampler(self.rollouts, cfg.rollouts_per_step or len(self.rollouts), cfg.seed)
        self.steps = iter(self.sampler)
        self.filled: dict[int, np.ndarray] = {}

    def next_indices(self) -> list[int]:
        """Rollout indices (ascending) of the next step's global batch."""
        return next(self.steps)

    def passes_done(self) -> int:
        """Whole passes (epochs) over the rollouts that the steps drawn so far complete."""
        s = self.sampler
        return s.epoch + (s.position == len(s.steps_of_epoch(s.epoch)))

    def missing_old_logprobs(self, idx: list[int]) -> list[int]:
        if not self.cfg.fill_old_logprobs:
            return []
        return [i for i in idx if self.rollouts[i].old_logprobs is None]

    def fill(self, values: dict[int, np.ndarray]) -> None:
        for i, lp in values.items():
            self.rollouts[i] = dataclasses.replace(self.rollouts[i], old_logprobs=lp)
            self.filled[i] = lp

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.steps = iter(self.sampler)
        self.fill(state["filled"])
