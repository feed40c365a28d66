"""Context parallelism against cp = 1 on every rank of a torchrun world (run by test_context_parallel.py).

    torchrun --nproc-per-node 2 tests/cp_worker.py HF_DIR OUT.json
    torchrun --nproc-per-node 4 tests/cp_worker.py HF_DIR OUT.json --tp 2 1   (CP2 x TP2, then CP2 x DP2)

Each case runs one forward+backward (and the logprob pass) twice on every rank: through the engine
without a CP group (the cp = 1 reference, itself proven against HF in test_exactness.py) and with
the layout's CP group on this DP rank's share of the rollouts, gradients and loss then summed over
DP x CP. All cases and layouts share one torchrun. Rank 0 writes {"cases": [...], "failures": [...]},
every rank's.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from megatron_dta.devtools.parity import SAME_OPS_FLOAT64, compare
from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.losses import PolicyLoss
from megatron_dta.model.hf import gather_hf, load_hf_checkpoint
from megatron_dta.parallel import ParallelLayout, all_reduce_grads, all_reduce_scalar, shard_indices, shutdown
from megatron_dta.rollouts import make_rollout
from test_pipeline import forest

VOCAB = 96


def rollout_sets() -> dict[str, list]:
    """Forests with forks, a long chain, a duplicate and a prefix rollout, lone short rollouts."""
    rng = np.random.default_rng(5)
    forks = forest(rng)  # the pipeline tests' forests: shared prompts, branching turns, a lone chain
    forks.append(make_rollout(forks[0].input_ids, advantages=-0.5))  # a duplicate
    forks.append(make_rollout(forks[1].input_ids[:15], advantages=0.7))  # a prefix of another rollout
    forks.append(make_rollout(rng.integers(0, VOCAB, 2).tolist(), advantages=1.3))  # 2 tokens
    chain = [make_rollout(rng.integers(0, VOCAB, 41).tolist(), advantages=0.9)]
    chain.append(make_rollout(chain[0].input_ids[:30].tolist() + rng.integers(0, VOCAB, 7).tolist()))
    return {"forks": forks, "chain": chain}


# (name, rollout set, engine config): forks inside CP-split units (pack_tokens > block_size packs a
# node with its children under a tree mask), chunked long nodes, units of one token (shorter than
# C: ranks without rows), recompute of every parent, the dense and sparse modes
CASES = [
    ("dta_packed_forks", "forks", dict(block_size=4, pack_tokens=16)),
    ("dta_block1", "forks", dict(block_size=1)),
    ("dta_budget0", "forks", dict(block_size=3, pack_tokens=9, activation_budget_tokens=0)),
    ("dta_long_chain", "chain", dict(block_size=8)),
    ("dta_chain_budget0", "chain", dict(block_size=16, activation_budget_tokens=0)),
    ("dense", "forks", dict(mode="dense")),
    ("sparse", "forks", dict(mode="sparse", max_tokens_per_microbatch=24)),
]


def step(model, engine, rollouts, layout, mine=None):
    """(dump of one forward+backward over ``rollouts`` or this DP rank's share ``mine`` of them,
    logprobs of the no-grad pass); with a share, grads and loss are summed over DP x CP."""
    loss_fn, local = PolicyLoss(), rollouts if mine is None else [rollouts[i] for i in mine]
    denominator = (
        None if mine is None else all_reduce_scalar(loss_fn.local_denominator(local), layout.dp_group)
    )
    model.zero_grad(set_to_none=True)
    res = engine.forward_backward(local, loss_fn, denominator)
    loss = res.loss
    if mine is not None:
        all_reduce_grads(model, layout.grad_group)
        loss = torch.tensor(all_reduce_scalar(loss.item(), layout.dp_group), dtype=torch.float64)
    grads = gather_hf(model, "grad", layout.tp_group)
    fwd = engine.logprobs(local)
    return {"logprobs": res.logprobs, "loss": loss, "grads": grads}, {"logprobs": fwd.logprobs}


def stack_rows(engine, calls: list) -> None:
    """Record the stack rows each run of ``engine`` allocates (the shards' sizes)."""
    alloc = engine.executor._alloc_stacks
    engine.executor._alloc_stacks = lambda plan: calls.append((plan.max_path, alloc(plan))) or calls[-1][1]


def check_layout(hf_dir: str, tp: int, cases_named=None) -> tuple[list[str], list[dict]]:
    """Every case under TP = ``tp`` x CP = 2 x DP = the rest of the world, against cp = 1 on this rank."""
    layout = ParallelLayout.create(tp=tp, cp=2, device="cpu")
    model, _ = load_hf_checkpoint(hf_dir, layout, torch.float64)
    sets, failures, cases = rollout_sets(), [], []
    where = f"tp{layout.tp} x cp2 x dp{layout.dp}, cp rank {layout.cp_rank}, dp rank {layout.dp_rank}"
    for name, which, kw in [c for c in CASES if cases_named is None or c[0] in cases_named]:
        cfg, rollouts = EngineConfig(**kw), sets[which]
        mine = shard_indices(len(rollouts), layout.dp, layout.dp_rank)
        cp_engine, calls = Engine(model, cfg, "cpu", cp_group=layout.cp_group), []
        stack_rows(cp_engine, calls)
        ref, ref_fwd = step(model, Engine(model, cfg, "cpu"), rollouts, layout)
        got, got_fwd = step(model, cp_engine, rollouts, layout, mine)
        ref["logprobs"] = ref_fwd["logprobs"] = [ref_fwd["logprobs"][i] for i in mine]
        # same float64 ops per token; sums over ranks (K/V grads, params) change the order only
        bad = compare(got, ref, SAME_OPS_FLOAT64) + compare(got_fwd, ref_fwd, SAME_OPS_FLOAT64)
        for max_path, stacks in calls if which == "chain" else []:  # each rank keeps half of the path
            if stacks.k[0].shape[0] > -(-max_path // 2) + 1:
                bad.append(f"stack shard of {stacks.k[0].shape[0]} rows for a path of {max_path}")
        failures += [f"{name} ({where}): {line}" for line in bad]
        cases.append({"name": name, "layout": where, "loss": float(got["loss"])})
    return failures, cases


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, nargs="+", default=[1], help="one layout per value, in turn")
    ap.add_argument("--cases", nargs="+", help="the CASES to run (default: all)")
    args = ap.parse_args()
    failures, cases = [], []
    for tp in args.tp:
        f, c = check_layout(args.hf_dir, tp, args.cases)
        failures, cases = failures + f, cases + c
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, [failures, cases])
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(
                {"cases": [c for _, cs in every for c in cs], "failures": [x for fs, _ in every for x in fs]},
                f,
                indent=1,
            )
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
