"""Faults injected in one process and survived (the multi-process ones are in tools/fault_check.py).

Checkpoints: a kill at each point of a save never leaves a checkpoint that loads, and the resumed
run ends bit for bit where the uninterrupted one does; corrupt files are found by the manifest's
checksums and the previous checkpoint is used; a full disk is one clear error; pruning removes
the ``COMPLETE`` marker first; every file and directory is fsynced; a resume that changes the
model shape is refused naming the field. Steps: a batch that trains no token and a step with a
non-finite loss or gradient are skipped with weights and optimizer state untouched; too many bad
steps in a row stop the run. Rollout files fuzzed by hypothesis never raise anything but the
one-line format error. The model is 1 layer, hidden 32, in float64, so each run takes a second.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_dta import checkpoint as ckpt
from megatron_dta.checkpoint import (
    COMPLETE,
    MANIFEST,
    CheckpointCorrupt,
    CheckpointWriteError,
    IncompatibleResume,
    complete_checkpoints,
    newest_intact,
    read_manifest,
    step_dir,
    verify,
)
from megatron_dta.errors import UserError
from megatron_dta.grads import grad_of
from megatron_dta.config import Config
from megatron_dta.model.hf import gather_hf, read_hf_dir
from megatron_dta.rollouts import RolloutFormatError, load_rollouts, make_rollout, write_rollouts
from megatron_dta.synthetic import make_workload
from megatron_dta.train import (
    CollectiveFailure,
    PlanMismatch,
    TrainingDiverged,
    build_model,
    check_digests_agree,
    collective,
    create_layout,
    plan_digest,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 64
WORKLOAD = {"num_tasks": 2, "trajectories_per_task": 2, "turns": 2, "system_len": 6, "task_len": 4}


def config(run_dir: Path, **sections) -> Config:
    """A 1-layer float64 model on a tiny multi-turn workload, a checkpoint every step, all kept."""
    raw = {
        "model": {
            "preset": "tiny",
            "arch": {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_layers": 1},
        },
        "parallel": {"device": "cpu"},
        "data": {
            "workload": "multi_turn",
            "rollouts_per_step": 4,
            "workload_args": {**WORKLOAD, "turn_len": 3, "obs_len": 3},
        },
        "optimizer": {"lr": 1e-2, "weight_decay": 0.1},
        "train": {"steps": 3, "dtype": "float64"},
        "checkpoint": {"run_dir": str(run_dir), "every": 1, "keep_last": None},
        "logging": {"progress": "none"},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return Config.from_dict(raw)


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return read_hf_dir(step_dir(run_dir, step) / "model")[1]


def optimizer_state(run_dir: Path, step: int) -> dict:
    return torch.load(step_dir(run_dir, step) / "optimizer" / "torch_tp0.pt", weights_only=False)


def initial_weights(cfg: Config) -> dict[str, torch.Tensor]:
    return gather_hf(build_model(cfg, create_layout(cfg)), "param")


def assert_same(a, b, where="") -> None:
    """Bit-for-bit equality of nested states (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 3-step run every survived fault must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    train(config(run))
    return run


class Killed(BaseException):
    """Stands for SIGKILL in one process: no ``except Exception`` or cleanup handler sees it."""


def _kill(*_args, **_kwargs):
    raise Killed


def _kill_after(fn):
    def wrapper(*args, **kwargs):
        fn(*args, **kwargs)
        raise Killed

    return wrapper


def _kill_writing_complete(path, text):
    if Path(path).name == COMPLETE:
        raise Killed
    return _WRITE_DURABLY(path, text)


_WRITE_DURABLY = ckpt._write_durably


def _kill_mid_prune(path):
    (path / COMPLETE).unlink()  # what _remove does first, then the kill before the files go
    raise Killed


# (attribute of megatron_dta.checkpoint, replacement): one point of a save each
KILL_POINTS = {
    "model files written": ("save_hf_checkpoint", lambda f: _kill_after(f)),
    "manifest written, COMPLETE not": ("_write_durably", lambda f: _kill_writing_complete),
    "sealed, not renamed": ("Checkpointer._publish", lambda f: staticmethod(_kill)),
    "renamed, old COMPLETE removed, old files not": (
        "Checkpointer._remove",
        lambda f: staticmethod(_kill_mid_prune),
    ),
}


def train_cli(*args: str) -> subprocess.CompletedProcess:
    """``megatron-dta train ARGS`` in a subprocess (one thread), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_dta", "train", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_during_save_never_leaves_a_loadable_torn_checkpoint(
    reference, tmp_path, monkeypatch, capsys, point
):
    """Kill the save of step 2 at ``point`` (keep_last=1 so that pruning runs), then resume: the
    checkpoint resumed from verifies, what the kill left is removed with a log line, and the run
    ends with the reference's weights and optimizer state bit for bit."""
    run = tmp_path / "run"
    attr, make = KILL_POINTS[point]
    owner, name = (ckpt.Checkpointer, attr.split(".")[1]) if "." in attr else (ckpt, attr)
    wrapped = make(getattr(owner, name))
    saves = {"n": 0}

    real_save = ckpt.Checkpointer.save

    def save(self, step, *args):
        saves["n"] = step
        if step == 2:
            with monkeypatch.context() as m:
                m.setattr(owner, name, wrapped)
                return real_save(self, step, *args)
        return real_save(self, step, *args)

    monkeypatch.setattr(ckpt.Checkpointer, "save", save)
    with pytest.raises(Killed):
        train(config(run, checkpoint={"keep_last": 1}))
    assert saves["n"] == 2
    monkeypatch.undo()
    for path in complete_checkpoints(run):
        verify(path)  # whatever is complete is whole
    capsys.readouterr()
    train(config(run, checkpoint={"keep_last": 1}), resume=True)
    err = capsys.readouterr().err
    assert f"resuming from {step_dir(run, 2 if point.startswith('renamed') else 1)}" in err
    assert "removing" in err and "an interrupted save or prune left it without COMPLETE" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]
    assert_same_weights(weights(run, 3), weights(reference, 3))
    assert_same(optimizer_state(run, 3), optimizer_state(reference, 3))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "deleted", "manifest garbled"])
def test_corrupt_checkpoint_is_refused_and_the_previous_one_used(reference, tmp_path, capsys, damage):
    run = tmp_path / "run"
    train(config(run, train={"steps": 2}))
    newest = step_dir(run, 2)
    target = newest / "model" / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        target.write_bytes(bytes(data[:-100]))
    elif damage == "deleted":
        (newest / "rng_rank0.pt").unlink()
    else:
        (newest / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointCorrupt):
        verify(newest)
    fingerprint = read_manifest(step_dir(run, 1))["fingerprint"]
    assert newest_intact(run, fingerprint) == step_dir(run, 1)
    err = capsys.readouterr().err
    assert f"refusing {newest}" in err and "corrupt-step_00000002" in err, err
    assert not newest.exists() and (run / "checkpoints" / "corrupt-step_00000002").is_dir()
    if damage == "flipped byte":  # the run continues from step 1 and repeats the reference
        train(config(run), resume=True)
        assert_same_weights(weights(run, 3), weights(reference, 3))


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    run = tmp_path / "run"
    train(config(run, train={"steps": 1}))
    (step_dir(run, 1) / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointCorrupt, match="every complete checkpoint is corrupt"):
        train(config(run, train={"steps": 2}), resume=True)


def test_disk_full_while_saving_is_one_clear_error_and_resumable(reference, tmp_path, monkeypatch):
    """ENOSPC from the optimizer's file of step 2 (tools/fault_check.py does it for real with
    RLIMIT_FSIZE): a CheckpointWriteError naming the step and the intact newest checkpoint, no
    temporary directory left, and a resume repeats the reference."""
    run = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if ".tmp-step_00000002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        train(config(run))
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "step 2" in message and "No space left on device" in message and "step_00000001" in message
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    verify(step_dir(run, 1))
    train(config(run), resume=True)
    assert_same_weights(weights(run, 3), weights(reference, 3))


def test_keep_last_removes_the_marker_first_and_everything_is_fsynced(tmp_path, monkeypatch):
    run = tmp_path / "run"
    synced: list[Path] = []
    real_fsync_path, real_write = ckpt.fsync_path, ckpt._write_durably
    monkeypatch.setattr(ckpt, "fsync_path", lambda p: (synced.append(Path(p)), real_fsync_path(p)))
    monkeypatch.setattr(ckpt, "_write_durably", lambda p, t: (synced.append(Path(p)), real_write(p, t)))
    removed_with_marker: list[Path] = []
    real_rmtree = ckpt.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith("step_") and (Path(path) / COMPLETE).exists():
            removed_with_marker.append(Path(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    train(config(run, checkpoint={"keep_last": 2}))
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000002", "step_00000003"]
    assert removed_with_marker == []  # step_1 lost its COMPLETE before its files
    final = step_dir(run, 3)
    tmp = final.with_name(".tmp-" + final.name)
    for path in final.rglob("*"):  # each file and directory was fsynced while it was in tmp
        assert tmp / path.relative_to(final) in synced, path
    assert tmp in synced and final.parent in synced  # the directory itself, and the rename


def test_resume_with_another_model_shape_or_layout_is_refused_naming_the_field(tmp_path):
    run = tmp_path / "run"
    train(config(run, train={"steps": 1}))
    cases = [
        (
            {
                "model": {
                    "arch": {"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 48, "num_layers": 1}
                }
            },
            "hidden_size",
        ),
        ({"train": {"steps": 2, "dtype": "float32"}}, "train.dtype"),
        ({"data": {"rollouts_per_step": 3}}, "data.rollouts_per_step"),
    ]
    for change, field in cases:
        with pytest.raises(IncompatibleResume) as info:
            train(config(run, **{"train": {"steps": 2}} | change), resume=True)
        message = str(info.value)
        assert "\n" not in message and f"{step_dir(run, 1)}: written with " in message, message
        assert f"{field}=" in message.split(";")[0], message
    # the same refusal through the command line: one line, exit code 2
    (tmp_path / "c.yaml").write_text(json.dumps(config(run).to_dict()))
    proc = train_cli("--config", str(tmp_path / "c.yaml"), "--resume", "model.arch.num_layers=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {step_dir(run, 1)}: written with "), proc.stderr
    assert "model.arch.num_layers=1" in errors[0]


def _poison_step(monkeypatch, bad_steps: set[int], value: float) -> None:
    """Put ``value`` into one gradient entry after the backward of the given (1-based) steps."""
    import megatron_dta.train as train_mod

    real = train_mod.run_microbatches
    calls = {"step": 0}

    def run(engine, layout, micro, loss_fn=None, denominator=None, forward_only=False, **kw):
        results = real(engine, layout, micro, loss_fn, denominator, forward_only, **kw)
        if not forward_only:
            calls["step"] += 1
            if calls["step"] in bad_steps:
                grad_of(next(engine.model.parameters())).view(-1)[0] = value
        return results

    monkeypatch.setattr(train_mod, "run_microbatches", run)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_step_is_skipped_with_optimizer_untouched(tmp_path, monkeypatch, capsys, value):
    run = tmp_path / "run"
    _poison_step(monkeypatch, {2}, value)
    history = train(config(run))
    assert [m["skipped"] for m in history] == [None, "non-finite", None]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite_steps"] for m in metrics] == [0, 1, 1]
    assert np.isfinite(history[2]["grad_norm"]) and np.isnan(history[1]["grad_norm"])
    assert_same_weights(weights(run, 2), weights(run, 1))
    assert_same(optimizer_state(run, 2), optimizer_state(run, 1))
    assert not torch.equal(
        weights(run, 3)["model.embed_tokens.weight"], weights(run, 2)["model.embed_tokens.weight"]
    )
    assert "step 2: skipped: non-finite loss or gradient" in capsys.readouterr().err


def test_consecutive_bad_steps_stop_the_run(tmp_path, monkeypatch):
    """An absurd advantage (1e300, valid JSON, finite) overflows the float32 loss on every step:
    train.max_bad_steps=2 of them stop the run with one clear line; the weights never moved."""
    rollouts = make_workload("multi_turn", VOCAB, 0, **WORKLOAD, turn_len=3, obs_len=3)
    rollouts[0] = make_rollout(rollouts[0].input_ids, rollouts[0].loss_mask, advantages=1e300)
    write_rollouts(tmp_path / "absurd.jsonl", rollouts)
    run = tmp_path / "run"
    cfg = config(
        run,
        data={"rollouts": str(tmp_path / "absurd.jsonl"), "workload": None, "rollouts_per_step": None},
        train={"dtype": "float32", "steps": 5, "max_bad_steps": 2},
    )
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("step 2: 2 consecutive steps had a non-finite loss") and "\n" not in message
    assert f"newest checkpoint: {step_dir(run, 1)}" in message
    assert_same_weights(weights(run, 1), initial_weights(cfg))


def test_step_without_trained_tokens_is_skipped_and_moves_nothing(tmp_path, capsys):
    """Rollouts of length 1 and rollouts whose loss_mask is all 0 predict no token: the step is
    skipped before any compute, so weight decay (0.1 here) and Adam momentum do not move the
    weights; before the fix the second kind got zero gradients and decayed."""
    base = make_workload("multi_turn", VOCAB, 0, **WORKLOAD, turn_len=3, obs_len=3)
    empty = [make_rollout([5])] + [
        make_rollout(r.input_ids, np.zeros(len(r), dtype=np.int8), advantages=1.0) for r in base
    ]
    write_rollouts(tmp_path / "empty.jsonl", empty)
    run = tmp_path / "run"
    cfg = config(run, data={"rollouts": str(tmp_path / "empty.jsonl"), "workload": None}, train={"steps": 2})
    history = train(cfg)
    assert [m["skipped"] for m in history] == ["empty", "empty"]
    assert all(m["loss_tokens"] == 0 and m["total_tokens"] > 0 for m in history)
    assert_same_weights(weights(run, 2), initial_weights(cfg))
    assert "step 1: skipped: no rollout of the batch has a trained token" in capsys.readouterr().err


def test_plan_digest_and_the_disagreement_error():
    from megatron_dta.balancer import balance

    batch = make_workload("multi_turn", VOCAB, 0, **WORKLOAD, turn_len=3, obs_len=3)
    a, b = balance(batch, 2), balance(batch, 2, max_tokens_per_microbatch=8)
    assert plan_digest(a, batch, 2) == plan_digest(balance(batch, 2), batch, 2)
    assert plan_digest(a, batch, 2) != plan_digest(b, batch, 2)  # another assignment
    changed = [make_rollout(batch[0].input_ids, batch[0].loss_mask, advantages=2.0), *batch[1:]]
    assert plan_digest(a, batch, 2) != plan_digest(a, changed, 2)  # same plan, other data
    check_digests_agree([7, 7])
    with pytest.raises(PlanMismatch, match="different balancer plans"):
        check_digests_agree([7, 8])


def test_failed_collective_names_the_operation():
    with pytest.raises(CollectiveFailure) as info:
        with collective(4, "the all-reduce of X", 5.0):
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")
    assert str(info.value).startswith("step 5: the all-reduce of X failed on rank 0")
    assert "parallel.timeout_s=5" in str(info.value) and "Timed out waiting" in str(info.value)
    with pytest.raises(RuntimeError, match="^a bug$"):  # not a communication error: unchanged
        with collective(4, "the all-reduce of X", 5.0):
            raise RuntimeError("a bug")


# ---- fuzzed rollout files ----------------------------------------------------------------------

_GOOD = [r.to_json() for r in make_workload("multi_turn", VOCAB, 3, **WORKLOAD, turn_len=3, obs_len=3)[:3]]
_GOOD[1]["old_logprobs"] = [0.0] + [-1.5] * (len(_GOOD[1]["input_ids"]) - 1)
_GOOD[2]["group"] = "task-1"
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([10**400, -(10**400), 2**63, VOCAB, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e308, -1e308, 1e-320])
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def fuzzed_files(draw) -> bytes:
    records = [json.loads(json.dumps(r)) for r in _GOOD]
    for _ in range(draw(st.integers(0, 3))):  # structural changes to the records
        record = records[draw(st.integers(0, len(records) - 1))]
        key = draw(st.sampled_from([*record, "old_logprobs", "ref_logprobs", "group", "extra"]))
        action = draw(st.sampled_from(["replace", "delete", "element"]))
        if action == "replace":
            record[key] = draw(_JSON)
        elif action == "delete":
            record.pop(key, None)
        elif isinstance(record.get(key), list) and record[key]:
            record[key][draw(st.integers(0, len(record[key]) - 1))] = draw(_JSON)
    text = bytearray("\n".join(json.dumps(r) for r in records).encode() + b"\n")
    for _ in range(draw(st.integers(0, 3))):  # byte-level damage
        pos = draw(st.integers(0, len(text) - 1))
        text[pos] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return bytes(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzzed_files())
def test_fuzzed_rollout_file_is_loaded_whole_or_refused_in_one_line(content):
    """Either every rollout loads and satisfies the format's invariants, or the load raises the
    one-line RolloutFormatError naming the file and line, and nothing is returned: never another
    exception, never a part of the file."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        f.write(content)
    try:
        rollouts = load_rollouts(f.name, VOCAB)
    except RolloutFormatError as exc:
        message = str(exc)
        assert message.startswith(f"{f.name}:") and "\n" not in message
        return
    finally:
        os.unlink(f.name)
    assert 1 <= len(rollouts) == sum(1 for line in content.split(b"\n") if line.strip())
    for r in rollouts:
        n = len(r)
        assert n >= 1 and r.loss_mask.shape == r.advantages.shape == (n,) and r.loss_mask[0] == 0
        assert ((r.input_ids >= 0) & (r.input_ids < VOCAB)).all() and np.isfinite(r.advantages).all()
        for lp in (r.old_logprobs, r.ref_logprobs):
            assert lp is None or (lp.shape == (n,) and np.isfinite(lp).all())


def test_fuzzed_rollout_file_stops_the_cli_before_any_step(tmp_path):
    """A damaged line far into the file: one line, exit 2, and no step ran (no metrics, no checkpoint)."""
    lines = [json.dumps(r) for r in _GOOD] * 3
    lines[7] = lines[7][: len(lines[7]) // 2]
    (tmp_path / "cut.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    proc = train_cli(
        f"data.rollouts={tmp_path / 'cut.jsonl'}",
        "data.workload=null",
        f"checkpoint.run_dir={run}",
        "model.arch.vocab_size=64",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith(
        f"error: {tmp_path / 'cut.jsonl'}:8: field '<json>': malformed JSON"
    ), proc.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_fault_check_quick_survives_restart_kill_during_save_and_a_hung_rank(tmp_path):
    """The reduced tools/fault_check.py: rank 1 SIGKILLed mid-step under torchrun --max-restarts 1
    resumes bit for bit; a kill between manifest and COMPLETE is cleaned up and resumed bit for
    bit; a rank that stops answering makes the other fail within parallel.timeout_s naming the
    operation. (The full set, with its figures, is in docs/reliability.md.)"""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/fault_check.py",
            "--quick",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1500,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert [r["scenario"] for r in results] == ["restart", "kill-save-one", "hang"]
    assert all(r["ok"] for r in results)
    hang = results[2]
    assert hang["seconds"] < 60  # parallel.timeout_s=5, plus the launcher tearing the job down
