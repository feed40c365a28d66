"""The Python API for RL frameworks, and the configured training loop built on it.

    trainer = megatron_dta.Trainer("configs/demo_cpu.yaml", ["optimizer.lr=1e-5"])  # or a Config, a dict
    metrics = trainer.step(rollouts)        # one optimizer update over a global batch (dicts or Rollouts)
    logprobs = trainer.logprobs(rollouts)   # per rollout, float64 [L], entry 0 = 0.0
    weights = trainer.hf_state_dict()       # full HF-named tensors, for the inference engine
    trainer.export_hf("hf_out"); trainer.save(); trainer.load()

Every method is collective: under torchrun every rank builds the Trainer from the same config and
makes the same calls with the same arguments (the whole global batch, not a rank's share). Inside,
a step is ``train.train_step``: the cost-model balancer gives each data-parallel rank its
subtrees, DTA runs each microbatch, the optimizer sums gradients over DP, clips and steps; the
results are the same on every rank. ``run`` is the loop `megatron-dta train` runs: over a rollout
file or synthetic workload, or, with ``data.follow``, over a directory a producer fills, publishing
the weights after every step (``megatron_dta.online``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_dta.checkpoint import Checkpointer
from megatron_dta.config import Config
from megatron_dta.data import TrainData
from megatron_dta.engine import Engine
from megatron_dta.errors import UserError
from megatron_dta.losses import PolicyLoss
from megatron_dta.metrics import MetricsLog
from megatron_dta.model.hf import config_to_hf, gather_hf, save_hf_checkpoint
from megatron_dta.online import FollowedRollouts, WeightPublisher
from megatron_dta.optim import build_optimizer
from megatron_dta.rollouts import Rollout, parse_rollout
from megatron_dta.train import (
    TrainingDiverged,
    count_skipped,
    build_model,
    collective,
    create_layout,
    forward_logprobs,
    resume_fingerprint,
    save_config,
    say,
    train_step,
)


def as_config(config: Config | dict | str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """A Config from a Config, a dict of sections, or a YAML path (None: the defaults) + overrides."""
    if isinstance(config, (str, Path)) or config is None:
        return Config.from_yaml(config, overrides)
    if overrides:
        raise TypeError("overrides apply to a YAML path; change the Config or dict directly")
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return Config.from_dict(config, "config dict")
    raise TypeError(f"config must be a Config, a dict or a YAML path, got {type(config).__name__}")


class Trainer:
    def __init__(self, config: Config | dict | str | Path | None = None, overrides: Sequence[str] = ()):
        cfg = self.cfg = as_config(config, overrides)
        self.layout = create_layout(cfg)
        self.model = build_model(cfg, self.layout)
        self.loss_fn = PolicyLoss(cfg.loss)
        self.engine = Engine(self.model, cfg.engine, self.layout.device, self.layout.cp_group)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.layout)
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            self.layout,
            cfg.train.steps,
            cfg.train.dtype,
            resume_fingerprint(cfg, self.model, None),
        )
        # skipped steps (empty batch, non-finite loss or gradient), kept in checkpoints
        self.counts = {"skipped_steps": 0, "nonfinite_steps": 0, "nonfinite_in_a_row": 0}
        self.steps_done = 0  # optimizer updates so far (the LR schedule's position)
        self._saved_step: int | None = None  # step of the checkpoint written or loaded last
        self._source: TrainData | FollowedRollouts | None = None  # run()'s data
        self._source_state: dict | None = None  # its position from a loaded checkpoint

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def _batch(self, rollouts: Sequence[Rollout | dict]) -> list[Rollout]:
        if not rollouts:
            raise ValueError("the trainer needs at least one rollout")
        return [
            r if isinstance(r, Rollout) else parse_rollout(r, self.vocab_size, "<rollouts>", i + 1)
            for i, r in enumerate(rollouts)
        ]

    def step(self, rollouts: Sequence[Rollout | dict]) -> dict:
        """One optimizer update over ``rollouts`` (the global batch). Rollouts without
        ``old_logprobs`` get the current policy's (that update is on-policy); for further PPO passes
        over the same rollouts, attach ``logprobs(rollouts)`` taken before the first one."""
        whole = dataclasses.replace(self.cfg.data, rollouts_per_step=None)  # one step: all of them
        return self._train(TrainData(whole, self.vocab_size, self._batch(rollouts)))

    def _train(self, data: TrainData) -> dict:
        metrics = train_step(
            self.steps_done, self.cfg, self.layout, data, self.loss_fn, self.engine, self.optimizer
        )
        self.steps_done += 1
        max_bad = self.cfg.train.max_bad_steps
        count_skipped(self.counts, metrics, self.layout, max_bad)
        metrics |= {k: v for k, v in self.counts.items() if k != "nonfinite_in_a_row"}
        if self.counts["nonfinite_in_a_row"] >= max_bad:
            raise TrainingDiverged(
                f"step {self.steps_done}: {self.counts['nonfinite_in_a_row']} consecutive steps had a "
                f"non-finite loss or gradient (train.max_bad_steps={max_bad}); newest checkpoint: "
                f"{self.checkpointer.resume_point() or 'none'}: lower optimizer.lr, check the rollouts' "
                "advantages and log-probs, or raise train.max_bad_steps"
            )
        return metrics

    def logprobs(self, rollouts: Sequence[Rollout | dict]) -> list[np.ndarray]:
        """Per-rollout float64 log-probs [L] under the current weights (entry 0 = 0.0), no grad."""
        batch = self._batch(rollouts)
        values = forward_logprobs(self.engine, batch, self.layout, self.cfg.data)
        return [values[i][0] for i in range(len(batch))]

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model as HF-named tensors, gathered over TP and PP (collective over the ranks of
        this rank's model-parallel group; each of them gets the whole dict)."""
        return gather_hf(self.model, "param", self.layout.tp_group, self.layout.pp_group)

    def hf_config(self, dtype: str | None = None) -> dict:
        return config_to_hf(self.model.cfg, dtype or self.cfg.train.dtype)

    def export_hf(self, out_dir: str | Path, dtype: str | None = None) -> Path:
        """Write an HF checkpoint directory transformers loads (written aside, then renamed)."""
        tensors = self.hf_state_dict()
        if self.layout.is_main:
            save_hf_checkpoint(tensors, self.hf_config(dtype), out_dir)
        dist.barrier()
        return Path(out_dir)

    def save(self) -> Path:
        """A complete checkpoint of this step under ``checkpoint.run_dir`` (model, optimizer, RNG,
        step and ``run``'s data position)."""
        state = {
            "data": self._source.state_dict() if self._source is not None else None,
            "counts": self.counts,
        }
        what = "the checkpoint save (barriers between ranks' writes)"
        with collective(self.steps_done, what, self.cfg.parallel.timeout_s):
            path = self.checkpointer.save(self.steps_done, self.model, self.optimizer, state)
        self._saved_step = self.steps_done
        return path

    def load(self, path: str | Path | None = None) -> int | None:
        """Restore a checkpoint (default: the newest intact one in ``checkpoint.run_dir``: torn ones
        are removed, corrupt ones set aside, both logged); returns its step, or None when there is
        none to load. A checkpoint of another model shape or layout is refused naming the field."""
        path = Path(path) if path is not None else self.checkpointer.resume_point()
        if path is None:
            return None
        say(self.layout, f"resuming from {path}")
        state = self.checkpointer.load(path, self.model, self.optimizer)
        self.counts = state.get("counts") or self.counts
        self.steps_done = self._saved_step = state["step"]
        self._source_state = state["data"]
        if self._source is not None and self._source_state is not None:
            self._source.load_state_dict(self._source_state)
        return self.steps_done

    def run(self, resume: bool = False, restart: int = 0) -> list[dict]:
        """Train until ``train.steps`` (or, following a directory, until STOP); returns this run's
        per-step metrics on every rank. Writes config.yaml, metrics.jsonl and checkpoints. ``resume``
        first loads the newest intact checkpoint (``restart``: torchrun's restart count, logged)."""
        cfg, layout = self.cfg, self.layout
        follow = cfg.data.follow
        if follow:
            self._source = FollowedRollouts(cfg.data, self.vocab_size, layout)
            publisher = WeightPublisher(
                cfg.data.publish_dir or Path(cfg.data.rollouts) / "weights", cfg.data.publish_keep
            )
        else:
            self._source = TrainData(cfg.data, self.vocab_size)
            self.engine.check_rollouts(self._source.rollouts)  # MoE routing replay, at load time
            self.checkpointer.set_fingerprint(resume_fingerprint(cfg, self.model, len(self._source.rollouts)))
        if resume and self.load() is not None and restart:
            say(layout, f"(restart {restart} of this job)")
        if self._source_state is not None:
            self._source.load_state_dict(self._source_state)
        run_dir = Path(cfg.checkpoint.run_dir)
        if layout.is_main:
            save_config(cfg, run_dir)
        log = MetricsLog(cfg.logging, run_dir, cfg.train.steps, self.steps_done, layout.is_main)
        history = []
        try:
            while self.steps_done < cfg.train.steps:
                data = self._next_followed() if follow else self._source
                if data is None:
                    break
                metrics = self._train(data)
                if follow:
                    metrics["rollout_file"] = self._source.file
                    self.publish(publisher)
                log.write(metrics)
                history.append(metrics)
                if self.checkpointer.due(self.steps_done):
                    self.save()
            self._save_if_unsaved()  # stopped before train.steps (STOP)
        finally:
            log.close()
        return history

    def _next_followed(self) -> TrainData | None:
        try:
            return self._source.next_data()
        except UserError:
            # a malformed file or a time-out: keep what was trained so far, then refuse
            self._save_if_unsaved()
            raise

    def _save_if_unsaved(self) -> None:
        if self.steps_done and self._saved_step != self.steps_done:
            self.save()

    def publish(self, publisher: WeightPublisher) -> None:
        tensors = self.hf_state_dict()
        if self.layout.is_main:
            publisher.publish(self.steps_done, tensors, self.hf_config())
