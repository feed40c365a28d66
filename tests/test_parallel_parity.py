"""TP=2 and DP=2 (torchrun, gloo, 2 processes) equal TP=1 through tools/dump_step.py, and the
HF checkpoint import/export is exact and refuses what it cannot represent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import hf_dense_step, make_hf_model

from megatron_dta.model.hf import (
    CheckpointError,
    config_from_hf,
    gather_hf,
    hf_weight_map,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from megatron_dta.rollouts import make_rollout, write_rollouts

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
VOCAB = 96


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    hf = make_hf_model("qwen3", seed=7, vocab=VOCAB)
    hf.save_pretrained(tmp / "ckpt")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, VOCAB, 12).tolist()
    rollouts = []
    for i in range(6):
        turn = prompt + rng.integers(0, VOCAB, 5).tolist()
        rollouts += [
            make_rollout(turn + rng.integers(0, VOCAB, 3 + j).tolist(), advantages=rng.normal())
            for j in range(2)
        ]
    write_rollouts(tmp / "rollouts.jsonl", rollouts)
    return tmp, hf, rollouts


def dump(tmp, name, *extra, nproc=1):
    out = tmp / f"{name}.pt"
    cmd = [sys.executable] if nproc == 1 else [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [
        str(ROOT / "tools/dump_step.py"),
        "--hf-checkpoint",
        str(tmp / "ckpt"),
        "--rollouts",
        str(tmp / "rollouts.jsonl"),
        "--dtype",
        "float64",
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def assert_equal(a, b):
    """The tool's own comparison, in process (the CLI face is tested below)."""
    spec = importlib.util.spec_from_file_location("dump_step_tool", ROOT / "tools/dump_step.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    bad = tool.compare(torch.load(a, weights_only=False), torch.load(b, weights_only=False), "float64")
    assert not bad, bad


def test_dump_matches_hf_and_tp2_dp2_match_tp1(setup):
    tmp, hf, rollouts = setup
    ref = dump(tmp, "dta_tp1", "--mode", "dta", "--block-size", "4")
    d = torch.load(ref, weights_only=False)
    ref_lps, ref_loss, ref_grads = hf_dense_step(hf, rollouts)
    for a, b in zip(d["logprobs"], ref_lps):
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=1e-10)
    assert abs(d["loss"].item() - ref_loss.item()) <= 1e-10 * max(1.0, abs(ref_loss.item()))
    for name, g in ref_grads.items():  # float64 round-off bound, see test_exactness.py
        assert (d["grads"][name] - g).norm() <= 1e-9 * g.norm(), name
    assert_equal(dump(tmp, "dta_tp2", "--mode", "dta", "--block-size", "4", "--tp", "2", nproc=2), ref)
    assert_equal(dump(tmp, "sparse_dp2", "--mode", "sparse", "--dp", "2", nproc=2), ref)


def test_assert_equal_detects_a_difference(setup):
    tmp, _, _ = setup
    a = dump(tmp, "dense", "--mode", "dense")
    d = torch.load(a, weights_only=False)
    name = next(iter(d["grads"]))
    d["grads"][name] = d["grads"][name] * (1 + 1e-6)
    torch.save(d, tmp / "perturbed.pt")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/dump_step.py"),
            "--out",
            str(tmp / "perturbed.pt"),
            "--assert-equal-to",
            str(a),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 1 and name in proc.stdout


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_hf_round_trip_is_bit_exact(kind, tmp_path):
    from safetensors.torch import load_file

    hf = make_hf_model(kind, dtype=torch.float32, vocab=VOCAB)
    hf.save_pretrained(tmp_path / "src", max_shard_size="20KB")  # sharded on purpose
    assert hf_weight_map(tmp_path / "src") is not None
    model, hf_cfg = load_hf_checkpoint(tmp_path / "src", dtype=torch.float64)
    save_hf_checkpoint(
        gather_hf(model, "param"), hf_cfg, tmp_path / "out", hf_weight_map(tmp_path / "src"), "float32"
    )
    src = {k: v for f in (tmp_path / "src").glob("*.safetensors") for k, v in load_file(f).items()}
    out = {k: v for f in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(src) == set(out)
    for k, t in src.items():
        assert torch.equal(t, out[k]), k
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in (tmp_path / "src").iterdir() if p.name != "generation_config.json"
    )


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"use_sliding_window": True}, "sliding-window"),
        ({"num_experts": 8}, "mixture of experts"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope scaling type 'yarn'",
        ),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_configs_are_refused(patch, message):
    cfg = make_hf_model("qwen2", vocab=VOCAB).config.to_dict()
    cfg.update(patch)
    with pytest.raises(CheckpointError, match=message):
        config_from_hf(cfg, "x/config.json")


def test_rope_theta_is_read_from_rope_parameters():
    cfg = make_hf_model("llama", vocab=VOCAB, theta=123456.0).config.to_dict()
    assert config_from_hf(cfg).rope_theta == 123456.0


def test_bad_checkpoint_dir_gives_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}) + "\n{")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools/dump_step.py"),
            "--hf-checkpoint",
            str(tmp_path),
            "--rollouts",
            "x.jsonl",
            "--out",
            str(tmp_path / "o.pt"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr
