"""The Python API (``megatron_dta.Trainer``) and the online mode (``data.follow``).

The API's steps equal the CLI's; an online run fed by a producer thread (files late, out of order
by name, half-written under a temporary name) equals one whose files were all there from the start;
a malformed file is refused with the one-line error and the run resumes at that file once it is
replaced; a killed online run resumes at the right file with the uninterrupted run's weights; the
published weights load in transformers with the trainer's log-probs. Same tiny float64 model and
multi-turn rollouts as test_train; the online runs keep the LR constant (min_lr = lr) so that runs
with different ``train.steps`` (a STOP file ends one) follow the same schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (
    EXACT_KEYS,
    PY,
    ROOT,
    cli,
    exact,
    kill_after_checkpoint,
    one_line_error,
    small_config,
    tiny_multi_turn,
)

from megatron_dta import Trainer
from megatron_dta.checkpoint import latest_complete, step_dir, step_of
from megatron_dta.config import Config
from megatron_dta.metrics import read_metrics
from megatron_dta.model.hf import read_hf_dir
from megatron_dta.online import LATEST, STOP, step_file
from megatron_dta.rollouts import write_rollouts
from megatron_dta.train import train

FILES = 3
STEPS = 6  # 2 steps per file: 2 passes (data.epochs_per_file) of one step (the whole file)


def file_lines(number: int) -> list[str]:
    return [json.dumps(r.to_json()) + "\n" for r in tiny_multi_turn(number)]


def write_file(directory: Path, number: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_rollouts(step_file(directory, number), tiny_multi_turn(number))  # written aside, then renamed


def online_overrides(tmp_path: Path, name: str, steps: int = STEPS) -> list[str]:
    return [
        f"checkpoint.run_dir={tmp_path / name / 'run'}",
        f"data.rollouts={tmp_path / name / 'stream'}",
        "data.workload=null",
        "data.follow=true",
        "data.epochs_per_file=2",
        "data.rollouts_per_step=null",
        "data.follow_timeout=120",
        "optimizer.min_lr=1e-2",  # = lr: a constant schedule (see the module docstring)
        f"train.steps={steps}",
        "checkpoint.every=1",
    ]


def final_weights(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return read_hf_dir(step_dir(run, step) / "model")[1]


def assert_same_run(run: Path, ref: Path) -> None:
    assert exact(read_metrics(run / "metrics.jsonl")) == exact(read_metrics(ref / "metrics.jsonl"))
    ref_w = final_weights(ref)
    for name, t in final_weights(run).items():
        assert torch.equal(t, ref_w[name]), name


@pytest.fixture(scope="module")
def online_reference(tmp_path_factory):
    """The online run with every file there from the start (uninterrupted), and its Trainer."""
    tmp = tmp_path_factory.mktemp("online")
    for n in range(1, FILES + 1):
        write_file(tmp / "ref" / "stream", n)
    trainer = Trainer(small_config(tmp), online_overrides(tmp, "ref"))
    history = trainer.run()
    return tmp, trainer, history


def test_api_steps_equal_the_cli_steps(tmp_path):
    """Three CLI steps on a rollout file (old log-probs filled on step 1, then PPO updates) against
    ``Trainer.step`` three times on the same rollouts with ``Trainer.logprobs`` attached first:
    the same float64 numbers and weights, bit for bit (same CPU, same thread count)."""
    rollouts = tiny_multi_turn(7)
    write_rollouts(tmp_path / "batch.jsonl", rollouts)
    overrides = [
        f"data.rollouts={tmp_path / 'batch.jsonl'}",
        "data.workload=null",
        "data.rollouts_per_step=null",
        "train.steps=3",
    ]
    config = small_config(tmp_path)
    cli("train", "--config", config, f"checkpoint.run_dir={tmp_path / 'cli'}", *overrides)

    trainer = Trainer(config, [f"checkpoint.run_dir={tmp_path / 'api'}", *overrides])
    batch = [r.to_json() for r in rollouts]  # dicts in the rollout-file format
    for record, lp in zip(batch, trainer.logprobs(batch)):
        record["old_logprobs"] = lp.tolist()
    ours = [trainer.step(batch) for _ in range(3)]
    assert exact(ours) == exact(read_metrics(tmp_path / "cli" / "metrics.jsonl"))
    assert ours[0]["approx_kl"] == 0.0 and ours[-1]["approx_kl"] > 0  # on-policy, then PPO updates
    ref_w = final_weights(tmp_path / "cli", 3)
    got_w = trainer.hf_state_dict()
    assert set(got_w) == set(ref_w)
    for name, t in got_w.items():
        assert torch.equal(t, ref_w[name]), name
    assert step_of(trainer.save()) == 3
    again = Trainer(config, [f"checkpoint.run_dir={tmp_path / 'api'}", *overrides])
    assert again.load() == 3
    for name, t in again.hf_state_dict().items():
        assert torch.equal(t, ref_w[name]), name


def test_online_run_publishes_after_every_step(online_reference):
    tmp, trainer, history = online_reference
    assert [m["rollout_file"] for m in history] == [1, 1, 2, 2, 3, 3]
    assert [m["approx_kl"] == 0.0 for m in history] == [True, False] * FILES  # each file: on-policy first
    weights = tmp / "ref" / "stream" / "weights"
    assert os.readlink(weights / LATEST) == f"step_{STEPS:08d}"
    assert sorted(p.name for p in weights.iterdir()) == [
        LATEST,
        f"step_{STEPS - 1:08d}",
        f"step_{STEPS:08d}",
    ]  # data.publish_keep=2
    published = read_hf_dir(weights / LATEST)[1]
    for name, t in trainer.hf_state_dict().items():
        assert torch.equal(published[name], t), name


def test_published_weights_load_in_transformers_with_the_trainers_logprobs(online_reference):
    """transformers loads ``weights/latest``; its float64 log-probs equal ``Trainer.logprobs``
    (patched float64 HF as in test_exactness: round-off only, 1e-10)."""
    from reference import float64_hf, hf_logprobs_of
    from transformers import AutoModelForCausalLM

    tmp, trainer, _ = online_reference
    hf = AutoModelForCausalLM.from_pretrained(
        tmp / "ref" / "stream" / "weights" / LATEST, dtype=torch.float64, attn_implementation="sdpa"
    ).eval()
    rollouts = tiny_multi_turn(11)
    ours = trainer.logprobs(rollouts)
    with torch.no_grad(), float64_hf():
        for r, lp in zip(rollouts, ours):
            np.testing.assert_allclose(lp, hf_logprobs_of(hf, r.input_ids).numpy(), rtol=0, atol=1e-10)


def test_producer_thread_late_out_of_order_half_written(online_reference, tmp_path):
    """Files land late, the third before the first, the first half-written under a temporary name
    for a while; then STOP. The run waits, reads each file only once it is complete and in order,
    stops cleanly on STOP (train.steps is far away) and equals the uninterrupted run."""
    ref_tmp, _, _ = online_reference
    stream = tmp_path / "prod" / "stream"
    stream.mkdir(parents=True)  # the producer's directory, before the trainer starts

    def produce():
        time.sleep(0.5)
        write_file(stream, 3)
        part = stream / ".step_000001.jsonl.partial"
        lines = file_lines(1)
        with part.open("w") as f:
            f.writelines(lines[:2])
            f.flush()
            time.sleep(1.0)  # the trainer is waiting for step_000001.jsonl meanwhile
            f.write(lines[2][: len(lines[2]) // 2])
            f.flush()
            time.sleep(0.5)
            f.write(lines[2][len(lines[2]) // 2 :])
            f.writelines(lines[3:])
        part.rename(step_file(stream, 1))
        time.sleep(1.0)
        write_file(stream, 2)
        (stream / STOP).touch()

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        history = train(Config.from_yaml(small_config(tmp_path), online_overrides(tmp_path, "prod", 100)))
    finally:
        producer.join()
    assert [m["rollout_file"] for m in history] == [1, 1, 2, 2, 3, 3]
    assert step_of(latest_complete(tmp_path / "prod" / "run")) == STEPS  # saved on STOP
    assert_same_run(tmp_path / "prod" / "run", ref_tmp / "ref" / "run")


def test_timeout_waiting_for_a_file(tmp_path):
    overrides = [*online_overrides(tmp_path, "idle"), "data.follow_timeout=0.3"]
    with pytest.raises(ValueError, match=r"step_000001.jsonl: not there after data.follow_timeout=0.3 s"):
        Trainer(small_config(tmp_path), overrides).run()


def test_malformed_file_is_refused_and_the_run_resumes_at_it(online_reference, tmp_path):
    """File 2 has a bad line: the CLI ends with the one-line error (exit 2) after a checkpoint of
    file 1's steps; the producer replaces the file and the resumed run equals the uninterrupted one."""
    ref_tmp, _, _ = online_reference
    stream = tmp_path / "bad" / "stream"
    write_file(stream, 1)
    lines = file_lines(2)
    broken = json.loads(lines[1])
    broken["loss_mask"][0] = 1
    step_file(stream, 2).write_text(lines[0] + json.dumps(broken) + "\n" + "".join(lines[2:]))
    config = small_config(tmp_path)
    line = one_line_error(cli("train", "--config", config, *online_overrides(tmp_path, "bad"), check=False))
    assert f"{step_file(stream, 2)}:2: field 'loss_mask'" in line
    run = tmp_path / "bad" / "run"
    assert step_of(latest_complete(run)) == 2
    assert len(read_metrics(run / "metrics.jsonl")) == 2
    write_file(stream, 2)
    write_file(stream, 3)
    train(Config.from_yaml(config, online_overrides(tmp_path, "bad")), resume=True)
    assert_same_run(run, ref_tmp / "ref" / "run")


@pytest.mark.slow
def test_killed_online_run_resumes_at_the_right_file(online_reference, tmp_path):
    """SIGKILL an online run (CLI) once it checkpointed step 3 (mid-way through file 2's passes;
    file 3 is not there yet, so it cannot finish); resume: same metrics and weights as the
    uninterrupted run."""
    ref_tmp, _, _ = online_reference
    stream = tmp_path / "kill" / "stream"
    write_file(stream, 1)
    write_file(stream, 2)
    config = small_config(tmp_path)
    overrides = online_overrides(tmp_path, "kill")
    run = tmp_path / "kill" / "run"
    assert 3 <= kill_after_checkpoint(["--config", config, *overrides], run, 3) <= 4
    write_file(stream, 3)
    history = train(Config.from_yaml(config, overrides), resume=True)
    assert [m["rollout_file"] for m in history] == [2, 2, 3, 3][-len(history) :]
    assert_same_run(run, ref_tmp / "ref" / "run")


@pytest.mark.slow
def test_toy_rl_example_runs_and_writes_its_records(tmp_path):
    """examples/toy_rl.py end to end at a tiny size (two iterations): one record per iteration with
    the documented keys, a shared prefix tree (sharing > 1), both timings measured, and the plot.
    Its learning curve is measured in docs/rl_loop.md (minutes, too long for a test)."""
    out = tmp_path / "toy"
    args = ["--iterations", "2", "--prompts", "2", "--group", "3", "--ppo-steps", "2", "--out", out]
    proc = subprocess.run(
        [PY, "examples/toy_rl.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    records = [json.loads(line) for line in (out / "rewards.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    for r in records:
        assert set(r) == {
            "iteration",
            "mean_reward",
            "sharing_ratio",
            "train_seconds",
            "dense_equivalent_seconds",
        }
        assert 0 <= r["mean_reward"] <= 1 and r["sharing_ratio"] > 1
        assert r["train_seconds"] > 0 and r["dense_equivalent_seconds"] > 0
    assert (out / "rewards.png").stat().st_size > 0
    assert step_of(latest_complete(out / "run")) == 4  # Trainer.save() after 2 x 2 PPO steps


@pytest.mark.slow
def test_online_dp2_equals_one_process(online_reference, tmp_path):
    """Online mode under torchrun, DP=2: the main rank watches the directory and broadcasts what it
    saw, both ranks read each file, the balancer splits each step. Same run as one process within
    1e-9 relative (summation order only, as test_train's two-process tests), published by rank 0."""
    ref_tmp, _, _ = online_reference
    stream = tmp_path / "dp2" / "stream"
    for n in range(1, FILES + 1):
        write_file(stream, n)
    cli(
        "train",
        "--config",
        small_config(tmp_path),
        *online_overrides(tmp_path, "dp2"),
        torchrun=True,
        timeout=300,
    )
    run, ref = tmp_path / "dp2" / "run", ref_tmp / "ref" / "run"
    ours, theirs = read_metrics(run / "metrics.jsonl"), read_metrics(ref / "metrics.jsonl")
    assert [m["rollout_file"] for m in ours] == [1, 1, 2, 2, 3, 3]
    for a, b in zip(ours, theirs, strict=True):
        for key in set(EXACT_KEYS) - {"computed_tokens"}:  # ranks recompute prefixes they share
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (a["step"], key)
    ref_w = final_weights(ref)
    published = read_hf_dir(stream / "weights" / LATEST)[1]
    for name, t in final_weights(run).items():
        assert (t - ref_w[name]).abs().max() <= 1e-9 * ref_w[name].abs().max(), name
        assert torch.equal(published[name], t), name
