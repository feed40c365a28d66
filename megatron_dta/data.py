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

from megatron_dta.errors import ConfigError
from megatron_dta.rollouts import Rollout, load_rollouts
from megatron_dta.sampler import TreeSampler
from megatron_dta.synthetic import WORKLOADS, make_workload


@dataclass
class DataConfig:
    rollouts: str | None = field(
        default=None,
        metadata={"help": "a rollout file (JSON Lines, format in the README); null: a synthetic workload"},
    )
    workload: str | None = field(
        default="demo",
        metadata={
            "help": f"a synthetic workload: one of {', '.join(sorted(WORKLOADS))}; null with data.rollouts"
        },
    )
    workload_args: dict = field(
        default_factory=dict,
        metadata={"help": "the workload generator's keyword arguments (sizes, megatron_dta/synthetic.py)"},
    )
    rollouts_per_step: int | None = field(
        default=None, metadata={"help": "global batch size in rollouts; null: all rollouts every step"}
    )
    microbatch_tokens: int | None = field(
        default=None,
        metadata={"help": "max unique tokens of one microbatch on a rank; null: one microbatch per rank"},
    )
    fill_old_logprobs: bool = field(
        default=True,
        metadata={
            "help": (
                "rollouts without old_logprobs get them from the policy the first time they are trained on"
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "synthetic workload and sampling order"})
    cost_model: str | None = field(
        default=None,
        metadata={"help": "balancer cost model JSON from tools/calibrate.py; null: built-in defaults"},
    )
    follow: bool = field(
        default=False,
        metadata={
            "help": "online mode (docs/rl_loop.md): data.rollouts is a directory a producer fills with "
            "step_000001.jsonl, step_000002.jsonl, ...; weights are published after every step"
        },
    )
    epochs_per_file: int = field(
        default=1, metadata={"help": "online mode: PPO passes over each file (each pass: its steps)"}
    )
    follow_timeout: float = field(
        default=600.0, metadata={"help": "online mode: seconds to wait for the next file before giving up"}
    )
    publish_dir: str | None = field(
        default=None,
        metadata={"help": "online mode: HF weights published here after every step; null: RUN_DIR/weights"},
    )
    publish_keep: int = field(
        default=2,
        metadata={"help": "online mode: published checkpoints kept (`latest` points at the newest)"},
    )

    def __post_init__(self):
        if (self.rollouts is None) == (self.workload is None):
            raise ConfigError(
                "set exactly one of data.rollouts (a JSONL file) and data.workload "
                f"(one of {sorted(WORKLOADS)}); set the other to null"
            )
        if self.workload is not None and self.workload not in WORKLOADS:
            raise ConfigError(
                f"data.workload '{self.workload}' is unknown; choose one of {sorted(WORKLOADS)}"
            )
        if self.rollouts_per_step is not None and self.rollouts_per_step < 1:
            raise ConfigError(
                f"data.rollouts_per_step must be >= 1 or null (all rollouts), got {self.rollouts_per_step}"
            )
        if self.microbatch_tokens is not None and self.microbatch_tokens < 1:
            raise ConfigError(
                f"data.microbatch_tokens must be >= 1 or null (no limit), got {self.microbatch_tokens}"
            )
        if self.follow and self.rollouts is None:
            raise ConfigError(
                "data.follow=true needs data.rollouts: the directory the producer writes "
                "step_000001.jsonl, step_000002.jsonl, ... into (and data.workload=null)"
            )
        if self.epochs_per_file < 1:
            raise ConfigError(f"data.epochs_per_file must be >= 1, got {self.epochs_per_file}")
        if not self.follow_timeout > 0:
            raise ConfigError(f"data.follow_timeout must be > 0 seconds, got {self.follow_timeout}")
        if self.publish_keep < 1:
            raise ConfigError(f"data.publish_keep must be >= 1, got {self.publish_keep}")
        if self.cost_model is not None and not Path(self.cost_model).is_file():
            raise ConfigError(
                f"data.cost_model '{self.cost_model}' is not a file: write one with "
                "tools/calibrate.py --out FILE, or set data.cost_model to null"
            )

    def load_cost_model(self):
        """The balancer's cost model: the calibrated file (read once per process), or the defaults."""
        return _cost_model(self.cost_model)


@functools.lru_cache(maxsize=4)
def _cost_model(path: str | None):
    from megatron_dta.balancer import CostModel

    if not path:
        return CostModel()
    try:
        return CostModel.load(path)
    except ValueError as exc:  # the file's content: malformed JSON, unknown keys, negative values
        raise ConfigError(f"data.cost_model {path}: {str(exc).removeprefix(f'{path}: ')}") from None


def load_dataset(cfg: DataConfig, vocab_size: int) -> list[Rollout]:
    if cfg.rollouts is not None:
        return load_rollouts(cfg.rollouts, vocab_size)
    try:
        return make_workload(cfg.workload, vocab_size, cfg.seed, **cfg.workload_args)
    except TypeError as exc:  # an argument the generator does not take
        raise ConfigError(f"data.workload_args: {exc}") from None


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
