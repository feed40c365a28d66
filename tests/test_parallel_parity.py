"""TP=2 and DP=2 (torchrun, gloo, 2 processes) equal TP=1 through tools/dump_step.py, the dump
comparison flags what it should, and the HF checkpoint import/export is exact and refuses what it
cannot represent."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import hf_dense_step, make_hf_model

from megatron_dta.devtools.parity import FLOAT64, compare
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


def load(path):
    return torch.load(path, weights_only=False)


@pytest.mark.slow
def test_dump_matches_hf_and_tp2_dp2_match_tp1(setup):
    tmp, hf, rollouts = setup
    ref = load(dump(tmp, "dta_tp1", "--mode", "dta", "--block-size", "4"))
    assert compare(ref, hf_dense_step(hf, rollouts), FLOAT64) == []
    tp2 = dump(tmp, "dta_tp2", "--mode", "dta", "--block-size", "4", "--tp", "2", nproc=2)
    assert compare(load(tp2), ref, FLOAT64) == []
    assert (
        compare(load(dump(tmp, "sparse_dp2", "--mode", "sparse", "--dp", "2", nproc=2)), ref, FLOAT64) == []
    )


def test_compare_flags_each_field_beyond_its_tolerance_and_nothing_within():
    rng = np.random.default_rng(0)
    want = {
        "logprobs": [rng.normal(size=n) for n in (3, 1, 5)],
        "loss": torch.tensor(rng.normal(), dtype=torch.float64),
        "grads": {"a": torch.from_numpy(rng.normal(size=(4, 3))), "b": torch.from_numpy(rng.normal(size=2))},
    }

    def changed(key, factor):
        got = {"logprobs": list(want["logprobs"]), "loss": want["loss"], "grads": dict(want["grads"])}
        if key == "logprobs":
            got["logprobs"][2] = got["logprobs"][2] + factor * FLOAT64.logprob
        elif key == "loss":
            got["loss"] = got["loss"] + factor * FLOAT64.logprob * max(1.0, abs(want["loss"].item()))
        else:
            g = want["grads"]["b"]
            got["grads"]["b"] = g + factor * FLOAT64.grad * g.norm() / g.numel() ** 0.5
        return got

    for key, line in (("logprobs", "logprobs[2]"), ("loss", "loss"), ("grads", "grads[b]")):
        assert compare(changed(key, 0.5), want, FLOAT64) == [], key
        bad = compare(changed(key, 2.0), want, FLOAT64)
        assert len(bad) == 1 and bad[0].startswith(line), bad
    missing = {**want, "grads": {"a": want["grads"]["a"]}, "logprobs": want["logprobs"][:2]}
    assert compare(missing, want, FLOAT64) == ["rollout count 2 != 3", "grads[b]: present in only one dump"]
    assert compare({k: want[k] for k in ("logprobs", "grads")}, want, FLOAT64) == [
        "loss: present in only one dump"
    ]


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
def test_hf_round_trip_is_bit_exact(kind, tmp_path, single_process_world):
    from safetensors.torch import load_file

    hf = make_hf_model(kind, dtype=torch.float32, vocab=VOCAB)
    hf.save_pretrained(tmp_path / "src", max_shard_size="20KB")  # sharded on purpose
    assert hf_weight_map(tmp_path / "src") is not None
    model, hf_cfg = load_hf_checkpoint(tmp_path / "src", single_process_world, torch.float64)
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


def test_only_parallel_py_touches_megatron_parallel_state():
    """The layout owns the process groups: everything else receives them from it (issue 12)."""
    users = sorted(
        str(p.relative_to(ROOT))
        for folder in ("megatron_dta", "tools")
        for p in (ROOT / folder).rglob("*.py")
        if re.search(r"import parallel_state|parallel_state\.|parallel_state as", p.read_text())
    )
    assert users == ["megatron_dta/parallel.py"]
