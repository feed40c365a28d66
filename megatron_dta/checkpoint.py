"""Checkpoints: written atomically and durably, verified by checksums, found by ``newest_intact``.

Layout of ``RUN_DIR/checkpoints/step_NNNNNNNN/``:
  model/          the full model as an HF checkpoint (gathered over TP; what `export` copies)
  optimizer/      the optimizer backend's own files (per TP rank, or per DP rank for ZeRO)
  rng_rankR.pt    every rank's RNG states
  state.pt        step, data position, filled old log-probs, fault counters (same on every rank)
  MANIFEST.json   size and SHA-256 of every file above, and the run's fingerprint (what a resume
                  must not change: model shape, parallel layout, dtype, optimizer, data)
  COMPLETE        written last
Every rank writes into ``.tmp-step_NNNNNNNN``; after a barrier the main rank checksums and fsyncs
every file and directory, writes the manifest and ``COMPLETE`` (fsynced), renames the directory
into place (``os.replace``) and fsyncs its parent. A crash at any moment therefore leaves either a
complete, durable checkpoint or a directory without ``COMPLETE``, which is never loaded and is
removed with a log line at the next start (``remove_torn``). Pruning (``keep_last``) removes an
old checkpoint's ``COMPLETE`` first, for the same reason. A resume verifies the newest complete
checkpoint against its manifest and, if a file is missing, truncated or altered, sets it aside as
``corrupt-step_N`` with a log line and falls back to the previous one. The run directory must be
on a file system every node sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_dta.errors import CheckpointError, ConfigError
from megatron_dta.model.hf import config_to_hf, gather_hf, load_hf_into, read_hf_dir, save_hf_checkpoint
from megatron_dta.parallel import ParallelLayout

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20  # bytes read at a time while checksumming


class CheckpointCorrupt(CheckpointError):
    """A complete checkpoint whose files do not match its manifest."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, file size limit, permissions)."""


class IncompatibleResume(CheckpointError):
    """The checkpoint was written by a run whose fingerprint differs from this config's."""


@dataclass
class CheckpointConfig:
    run_dir: str = field(
        default="runs/demo", metadata={"help": "metrics.jsonl, config.yaml and checkpoints/ go here"}
    )
    every: int = field(
        default=0, metadata={"help": "save every N steps (0: only at the end); the last step is always saved"}
    )
    keep_last: int | None = field(default=2, metadata={"help": "complete checkpoints kept; null keeps all"})
    auto_resume: bool = field(
        default=False,
        metadata={
            "help": "continue from the newest intact checkpoint in run_dir (as --resume), so a job its "
            "scheduler restarts picks up where it stopped; a torchrun restart always does"
        },
    )

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: only at the end), got {self.every}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1 or null (keep all), got {self.keep_last}")


def log(message: str) -> None:
    """Checkpoint events that change what a run resumes from; stderr, so metrics lines stay clean."""
    print(f"checkpoint: {message}", file=sys.stderr, flush=True)


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


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to stable storage (a rename is durable only once its
    directory is fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_durably(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def seal(tmp: Path, step: int, fingerprint: dict) -> None:
    """Checksum and fsync every file and directory under ``tmp``, then write the manifest and
    ``COMPLETE`` (each fsynced): from here on the directory is a checkpoint."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        fsync_path(path)
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(d)
    manifest = {"step": step, "fingerprint": fingerprint, "files": files}
    _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    _write_durably(tmp / COMPLETE, f"{step}\n")
    fsync_path(tmp)


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointCorrupt(f"{path}: unreadable {MANIFEST} ({exc})") from None


def verify(path: Path) -> dict:
    """The manifest of ``path`` after checking every file it lists; CheckpointCorrupt names the
    first file that is missing, has another size (truncated) or another checksum (altered)."""
    manifest = read_manifest(path)
    for name, want in sorted(manifest["files"].items()):
        file = path / name
        if not file.is_file():
            raise CheckpointCorrupt(f"{path}: file {name} is missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointCorrupt(f"{path}: file {name} has {size} bytes, the manifest {want['bytes']}")
        if _sha256(file) != want["sha256"]:
            raise CheckpointCorrupt(f"{path}: file {name} does not match its SHA-256 in {MANIFEST}")
    return manifest


def remove_torn(run_dir: str | Path) -> None:
    """Delete what a crash can leave behind: temporary directories of unfinished saves and step
    directories without ``COMPLETE`` (a save or a prune cut short). Main rank, before any save."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        torn = path.name.startswith(".tmp-step_") or (
            path.name.startswith("step_") and not (path / COMPLETE).is_file()
        )
        if torn and path.is_dir():
            log(f"removing {path}: an interrupted save or prune left it without {COMPLETE}")
            shutil.rmtree(path)


def _set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the ``step_*`` namespace (kept for inspection)."""
    target = path.with_name("corrupt-" + path.name)
    n = 1
    while target.exists():
        target, n = path.with_name(f"corrupt{n}-{path.name}"), n + 1
    os.replace(path, target)
    fsync_path(path.parent)
    return target


def newest_intact(run_dir: str | Path, fingerprint: dict) -> Path | None:
    """The newest complete checkpoint that matches its manifest (corrupt ones are set aside, each
    with a log line) and this run's fingerprint; None when there is no complete checkpoint. Main
    rank only: it reads every file once."""
    found = complete_checkpoints(run_dir)
    for path in reversed(found):
        try:
            manifest = verify(path)
        except CheckpointCorrupt as exc:
            moved = _set_aside(path)
            log(f"refusing {exc}; moved it to {moved.name}, trying the previous complete checkpoint")
            continue
        check_fingerprint(path, manifest["fingerprint"], fingerprint)
        return path
    if found:
        raise CheckpointCorrupt(
            f"{Path(run_dir) / 'checkpoints'}: every complete checkpoint is corrupt (set aside as "
            "corrupt-step_*); restore one from a backup, or start over in a new checkpoint.run_dir"
        )
    return None


def check_fingerprint(path: Path, saved: dict, current: dict) -> None:
    """Refuse, in one line naming every differing field, a resume whose config changes what the
    checkpoint's state depends on."""
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differ:
        was = ", ".join(f"{k}={json.dumps(saved.get(k))}" for k in differ)
        now = ", ".join(f"{k}={json.dumps(current.get(k))}" for k in differ)
        raise IncompatibleResume(
            f"{path}: written with {was}; this config has {now}: resume with the checkpoint's values, "
            "or start a new run in another checkpoint.run_dir"
        )


def _write_failure(exc: Exception) -> str | None:
    """What went wrong if ``exc`` is a failed write, else None. The serializers do not raise
    OSError: torch.save reports a short write as a RuntimeError from its zip writer, safetensors
    its own error with the OS message inside."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError):
        return exc.strerror or text
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return f"torch.save could not write its file ({text})"
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text
    return None


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
    def __init__(
        self,
        cfg: CheckpointConfig,
        layout: ParallelLayout,
        total_steps: int,
        dtype: str,
        fingerprint: dict | None = None,
    ):
        self.cfg, self.layout, self.total, self.dtype = cfg, layout, total_steps, dtype
        self.set_fingerprint(fingerprint or {})

    def set_fingerprint(self, fingerprint: dict) -> None:
        """What a resume must not change (``train.resume_fingerprint``), as the manifest reads back."""
        self.fingerprint = json.loads(json.dumps(fingerprint))

    def due(self, step: int) -> bool:
        return step == self.total or (self.cfg.every > 0 and step % self.cfg.every == 0)

    def resume_point(self) -> Path | None:
        """Collective: torn directories removed, the newest intact checkpoint chosen by the main rank
        and known to all (None: start from scratch)."""
        box = [None]
        if self.layout.is_main:
            remove_torn(self.cfg.run_dir)
            box = [newest_intact(self.cfg.run_dir, self.fingerprint)]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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
        with self._writing(step, tmp):
            if main:
                save_hf_checkpoint(tensors, config_to_hf(model.cfg, self.dtype), tmp / "model")
                torch.save({"step": step, **state}, tmp / "state.pt")
            del tensors
            optimizer.save(tmp / "optimizer")
            torch.save(_rng_state(), tmp / f"rng_rank{self.layout.rank}.pt")
        dist.barrier()
        if main:
            with self._writing(step, tmp):
                seal(tmp, step, self.fingerprint)
            self._publish(tmp, final)
            if self.cfg.keep_last is not None:
                for old in complete_checkpoints(self.cfg.run_dir)[: -self.cfg.keep_last]:
                    self._remove(old)
        dist.barrier()
        return final

    @contextlib.contextmanager
    def _writing(self, step: int, tmp: Path):
        """A failed write (disk full, RLIMIT_FSIZE, permissions) becomes one clear error; the
        unfinished directory goes, the earlier checkpoints stay as they were."""
        try:
            yield
        except Exception as exc:
            detail = _write_failure(exc)
            if detail is None:
                raise
            if self.layout.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = latest_complete(self.cfg.run_dir)
            free = shutil.disk_usage(tmp.parent).free / 2**30
            raise CheckpointWriteError(
                f"cannot write the checkpoint of step {step} under {tmp}: {detail} ({free:.1f} GiB free; "
                f"disk full or a file size limit?); the earlier checkpoints are intact (newest: "
                f"{kept.name if kept else 'none'}): free space, then rerun with --resume"
            ) from None

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        if final.exists():  # a stale step_N (set aside or superseded): never two with one name
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(final.parent)

    @staticmethod
    def _remove(path: Path) -> None:
        """``COMPLETE`` goes first and durably, so a crash mid-removal leaves a torn directory that
        is never loaded, not a complete-looking checkpoint with files missing."""
        (path / COMPLETE).unlink()
        fsync_path(path)
        shutil.rmtree(path)
        fsync_path(path.parent)

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore model, optimizer and this rank's RNG; returns the saved state (with ``step``).
        ``path`` comes from ``resume_point``, which verified it."""
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
