"""Mixture of experts (Qwen3-MoE): routing replay and its conflicts, the rollout field's checks,
HF import/export of both expert layouts, and expert parallelism (EP=2 equals EP=1).

The float64 exactness of the MoE model without replay (dense, sparse, dta vs patched HF, the
load-balancing loss included) runs in test_exactness.py with the other model kinds. References:
HF transformers patched to float64 (tests/reference.py), forcing the replayed experts in its router
and computing the load-balancing loss from its router logits; EP=1 runs of the same code for EP=2.
Tolerances: ``FLOAT64`` of megatron_dta.devtools.parity (logprobs 1e-10, gradients 1e-9 relative).
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from reference import hf_dense_step, make_hf_model
from safetensors.torch import load_file, save_file
from test_exactness import run_ours
from test_parallel_parity import dump, load
from test_train import cli, one_line_error

from megatron_dta.devtools.parity import FLOAT64, compare
from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.errors import UserError
from megatron_dta.model.hf import (
    CheckpointError,
    config_from_hf,
    gather_hf,
    hf_weight_map,
    load_hf_checkpoint,
    read_hf_dir,
    save_hf_checkpoint,
)
from megatron_dta.rollouts import (
    RolloutFormatError,
    load_rollouts,
    make_rollout,
    parse_rollout,
    write_rollouts,
)

VOCAB = 96
M, K, E = 2, 2, 4  # the tiny HF MoE of tests/reference.py: MoE layers, experts per token, experts


@pytest.fixture(scope="module")
def moe(single_process_world, tmp_path_factory):
    """(HF float64 Qwen3-MoE, its checkpoint directory, our model loaded from it)."""
    hf = make_hf_model("qwen3_moe", seed=11, vocab=VOCAB)
    path = tmp_path_factory.mktemp("moe") / "ckpt"
    hf.save_pretrained(path)
    return hf, path, load_hf_checkpoint(path, single_process_world, torch.float64)[0]


def prefix_routes(ids, salt: int = 0) -> np.ndarray:
    """Routes [L, M, K] that depend on the token prefix only (so rollouts sharing a prefix agree)
    and differ from the router's own top-k: what an inference engine replays."""
    out = np.empty((len(ids), M, K), dtype=np.int64)
    for j in range(len(ids)):
        rng = np.random.default_rng(zlib.crc32(np.asarray(ids[: j + 1], dtype=np.int64).tobytes()) + salt)
        out[j] = [rng.choice(E, K, replace=False) for _ in range(M)]
    return out


def tree_rollouts(seed: int = 0):
    """Three turns over one prompt, two answers each, plus a rollout that is a prefix of another."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, VOCAB, 6).tolist()
    seqs = []
    for _ in range(3):
        turn = prompt + rng.integers(0, VOCAB, 3).tolist()
        seqs += [turn + rng.integers(0, VOCAB, 2 + j).tolist() for j in range(2)]
    seqs.append(seqs[0][:8])
    return [make_rollout(s, advantages=rng.normal()) for s in seqs]


def with_routes(rollouts, routes):
    return [
        make_rollout(r.input_ids, r.loss_mask, r.advantages, routed_experts=x)
        for r, x in zip(rollouts, routes)
    ]


def test_replay_all_modes_equal_hf_float64(moe):
    hf, _, ours = moe
    rollouts = tree_rollouts()
    replayed = with_routes(rollouts, [prefix_routes(r.input_ids) for r in rollouts])
    ref = hf_dense_step(hf, replayed)
    for mode in ("dense", "sparse", "dta"):
        assert compare(run_ours(ours, replayed, mode, block_size=3, budget=4)[0], ref, FLOAT64) == [], mode
    # the replayed routes are not the router's own: without replay the step differs
    assert compare(hf_dense_step(hf, rollouts), ref, FLOAT64) != []


def conflicting(rollouts):
    """Routes of the last rollout differ from the prefix routes from its position 4 on (MoE layer 1);
    its first 8 tokens are shared with rollout 0."""
    routes = [prefix_routes(r.input_ids) for r in rollouts]
    routes[-1] = routes[-1].copy()
    routes[-1][4:, 1] = (routes[-1][4:, 1] + 1) % E
    return with_routes(rollouts, routes)


def test_route_conflict_refused_with_file_line_position_layer(moe, tmp_path):
    _, _, ours = moe
    path = tmp_path / "r.jsonl"
    write_rollouts(path, conflicting(tree_rollouts()))
    with pytest.raises(UserError) as err:
        Engine(ours, EngineConfig(mode="dta")).plan(load_rollouts(path, VOCAB))
    msg = str(err.value)
    assert f"{path}:7: field 'routed_experts': position 4, MoE layer 1" in msg
    assert f"in {path}:1" in msg and "\n" not in msg


def test_route_conflict_split_equals_hf_float64(moe):
    hf, _, ours = moe
    rollouts = conflicting(tree_rollouts())
    ref = hf_dense_step(hf, rollouts)
    for mode in ("sparse", "dta"):
        ours.zero_grad(set_to_none=True)
        eng = Engine(ours, EngineConfig(mode=mode, block_size=3, route_conflicts="split"))
        res = eng.forward_backward(rollouts)
        got = {"logprobs": res.logprobs, "loss": res.loss, "grads": gather_hf(ours, "grad")}
        assert compare(got, ref, FLOAT64) == [], mode
    split = Engine(ours, EngineConfig(mode="dta", route_conflicts="split")).plan(rollouts)
    shared = Engine(ours, EngineConfig(mode="dta")).plan(tree_rollouts())
    assert split.computed_tokens == shared.computed_tokens + 4  # positions 4..7 computed twice


@pytest.mark.parametrize(
    ("routes", "problem"),
    [
        ([[[0, 1]] * 2] * 2, "expected [len(input_ids)][MoE layers][top_k] integer expert ids: one entry"),
        ([[[0, 1], [1]]] * 3, "(a rectangular nested list)"),
        ([[[0.0, 1.0]] * 2] * 3, "(a rectangular nested list)"),
        ([[[0, 1]] * 2, [[0, -1]] * 2, [[0, 1]] * 2], "negative expert id at position 1, MoE layer 0"),
        ([[[0, 1]] * 2, [[0, 1], [2, 2]], [[0, 1]] * 2], "repeated expert id at position 1, MoE layer 1"),
    ],
)
def test_routed_experts_field_is_validated(routes, problem):
    record = {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "advantages": 1.0, "routed_experts": routes}
    with pytest.raises(RolloutFormatError) as err:
        parse_rollout(record, VOCAB, "f.jsonl", 3)
    assert str(err.value).startswith("f.jsonl:3: field 'routed_experts': ") and problem in str(err.value)


@pytest.mark.parametrize(
    ("routes", "problem"),
    [
        (
            np.zeros((3, 1, K), dtype=np.int64) + [0, 1],
            "1 MoE layers x 2 experts per token, but the model has 2 x 2",
        ),
        (
            np.zeros((3, M, K), dtype=np.int64) + [0, E],
            f"expert id {E} at position 0, MoE layer 0 is not below",
        ),
    ],
)
def test_routes_must_fit_the_model(moe, routes, problem):
    _, _, ours = moe
    r = make_rollout([1, 2, 3], routed_experts=routes)
    with pytest.raises(UserError, match=problem.replace("(", r"\(")):
        Engine(ours).plan([r])
    with pytest.raises(UserError, match="routes in every rollout of the batch or in none"):
        Engine(ours).plan(
            [make_rollout([1, 2, 3], routed_experts=np.zeros((3, M, K)) + [0, 1]), make_rollout([1])]
        )


def test_hf_round_trip_is_bit_exact_in_both_expert_layouts(moe, tmp_path, single_process_world):
    _, path, _ = moe
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    cfg, tensors = read_hf_dir(path)  # transformers 5 writes experts per expert; read fuses them
    assert (
        "model.layers.0.mlp.experts.gate_up_proj" in tensors
        and "model.layers.1.mlp.gate_proj.weight" in tensors
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(fused_dir / "model.safetensors"))
    (fused_dir / "config.json").write_text(json.dumps(cfg))
    for src in (path, fused_dir):
        model, hf_cfg = load_hf_checkpoint(src, single_process_world, torch.float64)
        out = tmp_path / f"out-{src.name}"
        weight_map = hf_weight_map(src) or {
            n: "model.safetensors" for n in load_file(str(src / "model.safetensors"))
        }
        save_hf_checkpoint(gather_hf(model, "param"), hf_cfg, out, weight_map, "float64")
        a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), src
        assert config_from_hf(json.loads((out / "config.json").read_text())) == model.cfg


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"shared_expert_intermediate_size": 64}, "shared experts is not supported"),
        ({"scoring_func": "sigmoid"}, "router scoring_func 'sigmoid' is not supported"),
        ({"model_type": "mixtral"}, "model_type 'mixtral' is not supported"),
        ({"model_type": "qwen3", "num_experts": 4}, "mixture of experts in model_type 'qwen3'"),
    ],
)
def test_unsupported_moe_configs_are_refused(moe, change, problem):
    hf, _, _ = moe
    with pytest.raises(CheckpointError, match=problem):
        config_from_hf({**hf.config.to_dict(), **change}, "x/config.json")


def test_aux_loss_is_reported_and_zero_coefficient_drops_it(moe):
    """The reported aux loss is the reference's; with router_aux_loss_coef=0 the loss is the policy
    loss alone (its gradients then match a reference without the aux term)."""
    hf, _, ours = moe
    rollouts = tree_rollouts(1)
    with_aux = run_ours(ours, rollouts, "dta")[1]
    coef = ours.cfg.router_aux_loss_coef
    try:
        ours.cfg.router_aux_loss_coef = hf.config.router_aux_loss_coef = 0.0
        dump_, res = run_ours(ours, rollouts, "dta")
        assert compare(dump_, hf_dense_step(hf, rollouts), FLOAT64) == []
    finally:
        ours.cfg.router_aux_loss_coef = hf.config.router_aux_loss_coef = coef
    assert res.stats.get("aux_loss", 0.0) == 0.0
    assert abs(float(with_aux.loss) - float(res.loss) - with_aux.stats["aux_loss"]) < 1e-12
    assert with_aux.stats["aux_loss"] > 0.5 * coef  # ~c: near-balanced routing gives c per rollout
    for m in range(M):
        assert with_aux.stats[f"moe_load_max.{m}"] >= with_aux.stats[f"moe_load_mean.{m}"] > 0


@pytest.fixture(scope="module")
def ep_setup(moe, tmp_path_factory):
    """The checkpoint and a tree batch in the layout test_parallel_parity's ``dump`` reads."""
    hf, path, _ = moe
    tmp = tmp_path_factory.mktemp("ep")
    hf.save_pretrained(tmp / "ckpt")
    write_rollouts(tmp / "rollouts.jsonl", tree_rollouts(2))
    return tmp


@pytest.fixture(scope="module")
def ep1(moe):
    """The EP=1 dta dump of the same checkpoint and batch, in this process, for both EP tests."""
    return run_ours(moe[2], tree_rollouts(2), "dta", block_size=3)[0]


@pytest.mark.slow
def test_ep2_equals_ep1_float64(ep_setup, ep1):
    ep2 = load(dump(ep_setup, "ep2", "--mode", "dta", "--block-size", "3", "--ep", "2", nproc=2))
    assert compare(ep2, ep1, FLOAT64) == []


@pytest.mark.slow
def test_ep2_tp2_equals_ep1_float64(ep_setup, ep1):
    """EP=2 x TP=2 in one 4-process run (experts split over EP, each expert's FFN over TP), in
    sparse mode: every mode equals the dense computation, so it equals the EP=1 dta dump too."""
    ep2tp2 = load(dump(ep_setup, "ep2tp2", "--mode", "sparse", "--ep", "2", "--tp", "2", nproc=4))
    assert compare(ep2tp2, ep1, FLOAT64) == []


def test_train_cli_refuses_conflicting_routes_in_one_line(moe, tmp_path):
    """At load time, before any step: exit 2, one line naming file, line, position and layer."""
    _, path, _ = moe
    write_rollouts(tmp_path / "r.jsonl", conflicting(tree_rollouts()))
    proc = cli(
        "train",
        "--config",
        "configs/demo_cpu.yaml",
        "model.preset=null",
        f"model.hf_checkpoint={path}",
        "data.workload=null",
        f"data.rollouts={tmp_path / 'r.jsonl'}",
        f"checkpoint.run_dir={tmp_path / 'run'}",
        check=False,
    )
    assert "r.jsonl:7: field 'routed_experts': position 4, MoE layer 1" in one_line_error(proc)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_ep2_dp2_equals_ep1_float64(ep_setup, ep1):
    """EP=2 x DP=2 in one 4-process run: the rollouts split over the expert-data-parallel group,
    gradients all-reduced over it (experts per EP rank, dense parameters on all)."""
    ep2dp2 = load(
        dump(ep_setup, "ep2dp2", "--mode", "dta", "--block-size", "3", "--ep", "2", "--dp", "2", nproc=4)
    )
    assert compare(ep2dp2, ep1, FLOAT64) == []


@pytest.mark.slow
def test_pp2_with_moe_layers_equals_pp1_float64(single_process_world, tmp_path):
    """PP=2 over 2 microbatches: each stage adds its MoE layers' load-balancing loss with the global
    rollout count; the last stage reports the sum. 4 layers: MoE, dense, MoE, MoE."""
    make_hf_model("qwen3_moe", seed=12, vocab=VOCAB, layers=3).save_pretrained(tmp_path / "ckpt")
    write_rollouts(tmp_path / "rollouts.jsonl", tree_rollouts(3))
    pp1_model = load_hf_checkpoint(tmp_path / "ckpt", single_process_world, torch.float64)[0]
    pp1 = run_ours(pp1_model, tree_rollouts(3), "dta", block_size=3)[0]
    pp2 = dump(
        tmp_path, "pp2", "--mode", "dta", "--block-size", "3", "--pp", "2", "--microbatches", "2", nproc=2
    )
    assert compare(load(pp2), pp1, FLOAT64) == []


def test_ep_needs_the_torch_optimizer():
    from megatron_dta.config import Config
    from megatron_dta.errors import ConfigError

    with pytest.raises(ConfigError, match="parallel.ep=2 needs optimizer.backend=torch"):
        Config.from_yaml(None, ["parallel.ep=2", "optimizer.backend=deepspeed", "train.dtype=float32"])
    assert Config.from_yaml(None, ["parallel.ep=2", "model.preset=tiny-moe"]).parallel.ep == 2
