"""Parity dumps: one forward+backward of the default loss, gathered (behind tools/dump_step.py),
and ``compare``, the one comparison of two dumps that the tool and the tests share.

Used to compare modes, dtypes and parallel layouts with each other and with HF transformers. A dump
maps ``logprobs`` (per rollout, [L] float64), ``loss`` (0-dim) and ``grads`` (HF parameter name ->
full, unsharded gradient).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.errors import UserError
from megatron_dta.losses import PolicyLoss
from megatron_dta.model.config import TORCH_DTYPES
from megatron_dta.model.hf import gather_hf, load_hf_checkpoint
from megatron_dta.parallel import (
    ParallelLayout,
    all_reduce_grads,
    all_reduce_scalar,
    broadcast_from_last_stage,
    shard_indices,
)
from megatron_dta.rollouts import load_rollouts


@dataclass(frozen=True)
class Tolerance:
    """How far two dumps of one computation may differ."""

    logprob: float  # max |a - b| of any log-prob; the loss may differ by this x max(1, |loss|)
    grad: float  # ||a - b|| / ||b|| of each gradient tensor, plus GRAD_FLOOR


# float64 against an independent float64 computation (HF transformers, another mode or layout):
# round-off of a few thousand float64 ops is ~1e-14; a real error shows at 1e-3 or above
FLOAT64 = Tolerance(logprob=1e-10, grad=1e-9)
# the same float64 operations per unit (a pipeline vs one stage): only grad summation order differs
SAME_OPS_FLOAT64 = Tolerance(logprob=1e-12, grad=1e-10)
# float32 against float64: float32 round-off on these sizes is ~1e-6
FLOAT32 = Tolerance(logprob=1e-4, grad=1e-4)
# by a dump's dtype (tools/dump_step.py --assert-equal-to)
TOLERANCES = {"float64": FLOAT64, "float32": FLOAT32}
GRAD_FLOOR = 1e-13  # absolute: a gradient that is zero in the reference may still carry round-off


def compare(got: Mapping, want: Mapping, tol: Tolerance) -> list[str]:
    """Every difference of ``got`` from the reference ``want`` beyond ``tol``, one line each (empty:
    equal). The fields both dumps have are compared; a field only one has is a difference."""
    bad = [
        f"{key}: present in only one dump"
        for key in ("logprobs", "loss", "grads")
        if (key in got) != (key in want)
    ]
    if "logprobs" in got and "logprobs" in want:
        if len(got["logprobs"]) != len(want["logprobs"]):
            bad.append(f"rollout count {len(got['logprobs'])} != {len(want['logprobs'])}")
        for i, (x, y) in enumerate(zip(got["logprobs"], want["logprobs"])):
            x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
            if x.shape != y.shape:
                bad.append(f"logprobs[{i}]: shape {tuple(x.shape)} != {tuple(y.shape)}")
                continue
            err = (x - y).abs().max().item() if x.numel() else 0.0
            if err > tol.logprob:
                bad.append(f"logprobs[{i}]: max abs diff {err:.3e} > {tol.logprob}")
    if "loss" in got and "loss" in want:
        x, y = float(got["loss"]), float(want["loss"])
        if abs(x - y) > tol.logprob * max(1.0, abs(y)):
            bad.append(f"loss: |{x} - {y}| = {abs(x - y):.3e} > {tol.logprob} x max(1, |loss|)")
    if "grads" in got and "grads" in want:
        for name in sorted(set(got["grads"]) ^ set(want["grads"])):
            bad.append(f"grads[{name}]: present in only one dump")
        for name in sorted(set(got["grads"]) & set(want["grads"])):
            x, y = got["grads"][name].double(), want["grads"][name].double()
            err, norm = (x - y).norm().item(), y.norm().item()
            if err > tol.grad * norm + GRAD_FLOOR:
                bad.append(f"grads[{name}]: relative diff {err / max(norm, 1e-300):.3e} > {tol.grad}")
    return bad


def dump_step(
    hf_dir,
    rollouts_path,
    mode="dta",
    dtype="float64",
    block_size=2048,
    tp=1,
    dp=None,
    pp=1,
    microbatches=1,
    activation_budget=1 << 20,
    microbatches_in_flight=None,
    cp=1,
    ep=1,
):
    """The dump dict on global rank 0, None elsewhere. With ``pp`` > 1 the step runs through the
    DFS pipeline schedule, the local rollouts split into ``microbatches`` contiguous microbatches;
    with ``cp`` > 1 every unit is split over the context-parallel ranks; ``ep`` splits the experts."""
    layout = ParallelLayout.create(tp=tp, pp=pp, microbatches_in_flight=microbatches_in_flight, cp=cp, ep=ep)
    if dp is not None and dp != layout.dp:
        raise UserError(
            f"--dp {dp} does not match world size {dist.get_world_size()} / "
            f"(tp {tp} x cp {cp} x ep {ep} x pp {pp}) = {layout.dp}"
        )
    model, _ = load_hf_checkpoint(hf_dir, layout, TORCH_DTYPES[dtype])
    rollouts = load_rollouts(rollouts_path, vocab_size=model.cfg.vocab_size)
    if len(rollouts) < layout.dp:
        raise UserError(
            f"{rollouts_path}: {len(rollouts)} rollouts cannot fill {layout.dp} data-parallel ranks"
        )
    mine = shard_indices(len(rollouts), layout.dp, layout.dp_rank)
    loss_fn = PolicyLoss()
    local = [rollouts[i] for i in mine]
    denominator = all_reduce_scalar(loss_fn.local_denominator(local), layout.dp_group)
    engine_cfg = EngineConfig(mode=mode, block_size=block_size, activation_budget_tokens=activation_budget)
    if pp == 1:
        engine = Engine(model, engine_cfg, device=layout.device, cp_group=layout.cp_group)
        result = engine.forward_backward(local, loss_fn, denominator, num_rollouts=len(rollouts))
    else:
        result = _pipeline_step(
            model, engine_cfg, local, (loss_fn, denominator, len(rollouts)), microbatches, layout
        )
    all_reduce_grads(model, layout.grad_group)
    loss = all_reduce_scalar(result.loss.item(), layout.dp_group)
    grads = gather_hf(model, "grad", layout.tp_group, layout.pp_group)
    # logprobs of every DP rank to global rank 0, in file order
    per_rank = [None] * layout.dp
    if layout.dp > 1:
        dist.all_gather_object(per_rank, [lp for lp in result.logprobs], group=layout.dp_group)
    else:
        per_rank = [result.logprobs]
    if not layout.is_main:
        return None
    logprobs = [torch.from_numpy(lp).double() for chunk in per_rank for lp in chunk]
    return {
        "logprobs": logprobs,
        "loss": torch.tensor(loss, dtype=torch.float64),
        "grads": {k: v.double().cpu() for k, v in grads.items()},
        "dtype": dtype,
        "mode": mode,
    }


def _pipeline_step(model, engine_cfg, rollouts, loss_args, microbatches, layout):
    """One step through the DFS pipeline; the last stage's loss and logprobs reach every stage.
    ``loss_args``: (loss, global denominator, global rollout count) of every microbatch."""
    from megatron_dta.pipeline import forward_backward_pipelining_dfs

    bounds = [len(rollouts) * i // microbatches for i in range(microbatches + 1)]
    parts = [rollouts[a:b] for a, b in pairwise(bounds) if b > a]
    results = forward_backward_pipelining_dfs(
        forward_step_func=lambda it, _model: (next(it), *loss_args),
        data_iterator=iter(parts),
        model=model,
        num_microbatches=len(parts),
        layout=layout,
        engine_config=engine_cfg,
    )
    box = broadcast_from_last_stage([(r.loss, r.logprobs) for r in results], layout)
    losses, logprobs = zip(*box)
    return SimpleNamespace(loss=sum(losses), logprobs=[lp for chunk in logprobs for lp in chunk])
