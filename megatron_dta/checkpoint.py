"""Checkpoints: written atomically, found by ``latest_complete``, restored exactly.

Layout of ``RUN_DIR/checkpoints/step_NNNNNNNN/``:
  model/          the full model as an HF checkpoint (gathered over TP; what `export` copies)
  optimizer/      the optimizer backend's own files (per TP rank, or per DP rank for ZeRO)
  rng_rankR.pt    every rank's RNG states
  state.pt        step, data position and filled old log-probs (same on every rank)
  COMPLETE        written last
Every rank writes into ``.tmp-step_NNNNNNNN``; after a barrier the main rank writes ``COMPLETE`` and
renames the directory into place (``os.replace``), so a crash at any moment leaves either a
complete checkpoint or an ignored temporary directory, never a checkpoint that loads wrong. The
run directory must be on a file system every node sees.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_dta.errors import CheckpointError, ConfigError
from megatron_dta.model.hf import config_to_hf, gather_hf, load_hf_into, read_hf_dir, save_hf_checkpoint
from megatron_dta.parallel import ParallelLayout

COMPLETE = "COMPLETE"


@dataclass
class CheckpointConfig:
    run_dir: str = field(
        default="runs/demo", metadata={"help": "metrics.jsonl, config.yaml and checkpoints/ go here"}
    )
    every: int = field(
        default=0, metadata={"help": "save every N steps (0: only at the end); the last step is always saved"}
    )
    keep_last: int | None = field(default=2, metadata={"help": "complete checkpoints kept; null keeps all"})

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: only at the end), got {self.every}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1 or null (keep all), got {self.keep_last}")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())


def latest_complete(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, layout: ParallelLayout, total_steps: int, dtype: str):
        self.cfg, self.layout, self.total, self.dtype = cfg, layout, total_steps, dtype

    def due(self, step: int) -> bool:
        return step == self.total or (self.cfg.every > 0 and step % self.cfg.every == 0)

    def save(self, step: int, model, optimizer, state: dict) -> Path:
        """Collective: every rank calls it. ``state`` must be the same on every rank."""
        final = step_dir(self.cfg.run_dir, step)
        tmp = final.with_name(".tmp-" + final.name)
        main = self.layout.is_main
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        tensors = gather_hf(model, "param", self.layout.tp_group, self.layout.pp_group)
        if main:
            save_hf_checkpoint(tensors, config_to_hf(model.cfg, self.dtype), tmp / "model")
            torch.save({"step": step, **state}, tmp / "state.pt")
        del tensors
        optimizer.save(tmp / "optimizer")
        torch.save(_rng_state(), tmp / f"rng_rank{self.layout.rank}.pt")
        dist.barrier()
        if main:
            (tmp / COMPLETE).write_text(f"{step}\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if self.cfg.keep_last is not None:
                for old in complete_checkpoints(self.cfg.run_dir)[: -self.cfg.keep_last]:
                    shutil.rmtree(old)
        dist.barrier()
        return final

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore model, optimizer and this rank's RNG; returns the saved state (with ``step``)."""
        _, tensors = read_hf_dir(path / "model")
        load_hf_into(model, tensors, self.layout.tp_rank, str(path / "model"))
        del tensors
        optimizer.load(path / "optimizer")
        rng = path / f"rng_rank{self.layout.rank}.pt"
        if not rng.is_file():
            raise CheckpointError(
                f"{path}: no RNG state for rank {self.layout.rank}: resume with the world size "
                "the checkpoint was written with"
            )
        _set_rng_state(torch.load(rng, weights_only=False))
        return torch.load(path / "state.pt", weights_only=False)
