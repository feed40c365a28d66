"""Per-step metrics: ``RUN_DIR/metrics.jsonl`` (one JSON object per step) and progress output.

Only the main rank writes. A progress bar goes to an interactive terminal, plain log lines to
anything else (files, CI). On resume, lines of steps after the resumed checkpoint are dropped, so
the file reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_dta.errors import ConfigError

PROGRESS = ("auto", "bar", "lines", "none")


def current_rss_bytes() -> int:
    """Resident memory now. A process's peak cannot serve as a baseline: a child inherits its
    parent's peak across fork+exec."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_now_bytes(device: str) -> int:
    """Allocated bytes on a GPU, resident memory on CPU: the baseline of a step's memory rise
    (``peak_memory_bytes`` minus it; on CUDA after ``torch.cuda.reset_peak_memory_stats``)."""
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated()
    return current_rss_bytes()


def peak_memory_bytes(device: str) -> int:
    """Peak allocated bytes on a GPU, peak resident memory of the process on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


@dataclass
class LoggingConfig:
    progress: str = field(
        default="auto",
        metadata={
            "help": f"one of {', '.join(PROGRESS)}; "
            "auto: a bar on an interactive terminal, plain lines otherwise"
        },
    )
    log_every: int = field(
        default=1, metadata={"help": "plain lines: one every N steps (metrics.jsonl always gets every step)"}
    )

    def __post_init__(self):
        if self.progress not in PROGRESS:
            raise ConfigError(f"logging.progress '{self.progress}' must be one of {PROGRESS}")
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every must be >= 1, got {self.log_every}")


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a metrics file; a last line cut short by a killed run is left out."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return records


class MetricsLog:
    def __init__(
        self, cfg: LoggingConfig, run_dir: str | Path, total_steps: int, start_step: int, enabled: bool
    ):
        self.cfg, self.total, self.enabled = cfg, total_steps, enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        if not enabled:
            return
        kept = (
            [m for m in read_metrics(self.path) if m["step"] <= start_step]
            if start_step and self.path.exists()
            else []
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w")
        for m in kept:
            self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        mode = cfg.progress if cfg.progress != "auto" else ("bar" if sys.stderr.isatty() else "lines")
        self.lines = mode == "lines"
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, m: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{m['loss']:.4g}",
                tok_s=f"{m['tokens_per_second']:.0f}",
                sharing=f"{m['sharing_ratio']:.2f}",
            )
            self.bar.update(1)
        elif self.lines and (m["step"] % self.cfg.log_every == 0 or m["step"] == self.total):
            print(
                f"step {m['step']}/{self.total}  loss {m['loss']:.6g}  grad_norm {m['grad_norm']:.4g}  "
                f"lr {m['lr']:.3g}  tokens {m['total_tokens']} (unique {m['unique_tokens']}, "
                f"sharing {m['sharing_ratio']:.2f})  {m['tokens_per_second']:.0f} tok/s  {m['seconds']:.2f}s",
                flush=True,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
