"""Online mode: rollouts arrive as numbered files in a directory, weights go back after every step.

The exchange with an inference engine is one directory (``data.rollouts``, ``data.follow: true``):
  step_000001.jsonl, step_000002.jsonl, ...   written by the producer to a temporary name, then
                                              renamed: a name that exists is a complete file
  STOP                                        the producer is done: stop once the files already
                                              there are trained on (also an operator's stop)
  weights/step_NNNNNNNN/                      HF checkpoints published after every optimizer step
  weights/latest -> step_NNNNNNNN             a symlink, replaced atomically (``os.replace``)
Files are consumed strictly in numeric order: ``step_000003.jsonl`` waits until ``step_000002``
has been trained on, however early it lands. The main rank watches the directory and broadcasts
what it saw, so every rank takes the same decision (next file, stop or time-out) at the same step.
The position (file number, sampler position within it, old log-probs filled so far) is part of
the checkpoint, so a resumed run continues at the file and step it stopped at.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from megatron_dta.errors import UserError
from megatron_dta.data import DataConfig, TrainData
from megatron_dta.model.hf import save_hf_checkpoint
from megatron_dta.parallel import ParallelLayout
from megatron_dta.rollouts import load_rollouts

STOP = "STOP"
LATEST = "latest"
POLL_SECONDS = 0.05


def step_file(directory: str | Path, number: int) -> Path:
    return Path(directory) / f"step_{number:06d}.jsonl"


class FollowedRollouts:
    """The step files of ``cfg.rollouts`` as one ``TrainData`` at a time, each for
    ``cfg.epochs_per_file`` passes."""

    def __init__(self, cfg: DataConfig, vocab_size: int, layout: ParallelLayout):
        self.cfg, self.vocab_size, self.layout = cfg, vocab_size, layout
        self.directory = Path(cfg.rollouts)
        self.file = 0  # number of the file ``data`` holds (0: none yet)
        self.data: TrainData | None = None

    def next_data(self) -> TrainData | None:
        """The data to draw the next step from, waiting for the next file when the current one has
        had its passes; None when the producer wrote STOP and no further file is there."""
        if self.data is not None and self.data.passes_done() < self.cfg.epochs_per_file:
            return self.data
        if not self._wait(self.file + 1):
            return None
        # a malformed file raises here, before the position moves: the run's state stays that of
        # the last step, and a resumed run reads the (replaced) file again
        self.data = self._load(self.file + 1)
        self.file += 1
        return self.data

    def _load(self, number: int) -> TrainData:
        rollouts = load_rollouts(step_file(self.directory, number), self.vocab_size)
        return TrainData(self.cfg, self.vocab_size, rollouts)

    def _wait(self, number: int) -> bool:
        """True once file ``number`` exists, False on STOP; raises after ``follow_timeout`` seconds."""
        path = step_file(self.directory, number)
        seen = None
        if self.layout.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            deadline = time.monotonic() + self.cfg.follow_timeout
            while seen is None:
                if path.is_file():
                    seen = "file"
                elif (self.directory / STOP).exists():
                    seen = "stop"
                elif time.monotonic() > deadline:
                    seen = "timeout"
                else:
                    time.sleep(POLL_SECONDS)
        box = [seen]
        dist.broadcast_object_list(box, src=0)
        if box[0] == "timeout":
            raise UserError(
                f"{path}: not there after data.follow_timeout={self.cfg.follow_timeout:g} s; the run "
                f"stopped after file {self.file} (resume with --resume once the producer writes it)"
            )
        return box[0] == "file"

    def state_dict(self) -> dict:
        return {"file": self.file, "data": self.data.state_dict() if self.data is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.file = state["file"]
        self.data = None
        if state["data"] is not None:
            self.data = self._load(self.file)
            self.data.load_state_dict(state["data"])


class WeightPublisher:
    """Writes HF checkpoints an inference engine reloads: ``DIR/step_NNNNNNNN`` written aside and
    renamed (``save_hf_checkpoint``), then ``DIR/latest`` re-pointed with one ``os.replace``, then
    all but the newest ``keep`` removed. A reader that opens ``latest`` gets a complete checkpoint."""

    def __init__(self, directory: str | Path, keep: int):
        self.directory, self.keep = Path(directory), keep

    def publish(self, step: int, tensors: dict, hf_cfg: dict) -> Path:
        """Main rank only: ``tensors`` are the full HF-named weights (``Trainer.hf_state_dict``)."""
        final = self.directory / f"step_{step:08d}"
        save_hf_checkpoint(tensors, hf_cfg, final)
        link = self.directory / f".{LATEST}.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(final.name)  # relative: the directory may be mounted elsewhere by the reader
        os.replace(link, self.directory / LATEST)
        published = sorted(p for p in self.directory.glob("step_*") if "." not in p.name)  # not temps
        for old in published[: -self.keep]:
            shutil.rmtree(old)
        return final
