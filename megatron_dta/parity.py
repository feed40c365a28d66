"""The parity step behind tools/dump_step.py: one forward+backward of the default loss, gathered.

Used to compare modes, dtypes and parallel layouts with each other and with HF transformers.
"""

from __future__ import annotations

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
):
    """The dump dict on global rank 0, None elsewhere. With ``pp`` > 1 the step runs through the
    DFS pipeline schedule, the local rollouts split into ``microbatches`` contiguous microbatches."""
    layout = ParallelLayout.create(tp=tp, pp=pp, microbatches_in_flight=microbatches_in_flight)
    if dp is not None and dp != layout.dp:
        raise UserError(
            f"--dp {dp} does not match world size {dist.get_world_size()} / (tp {tp} x pp {pp}) = {layout.dp}"
        )
    model, _ = load_hf_checkpoint(
        hf_dir,
        tp=tp,
        tp_rank=layout.tp_rank,
        dtype=TORCH_DTYPES[dtype],
        device=layout.device,
        stage=(layout.pp_rank, pp),
    )
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
        result = Engine(model, engine_cfg, device=layout.device).forward_backward(local, loss_fn, denominator)
    else:
        result = _pipeline_step(model, engine_cfg, local, loss_fn, denominator, microbatches, layout)
    all_reduce_grads(model, layout.dp_group)
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


def _pipeline_step(model, engine_cfg, rollouts, loss_fn, denominator, microbatches, layout):
    """One step through the DFS pipeline; the last stage's loss and logprobs reach every stage."""
    from megatron_dta.pipeline import forward_backward_pipelining_dfs

    bounds = [len(rollouts) * i // microbatches for i in range(microbatches + 1)]
    parts = [rollouts[a:b] for a, b in pairwise(bounds) if b > a]
    results = forward_backward_pipelining_dfs(
        forward_step_func=lambda it, _model: (next(it), loss_fn, denominator),
        data_iterator=iter(parts),
        model=model,
        num_microbatches=len(parts),
        engine_config=engine_cfg,
        device=layout.device,
        microbatches_in_flight=layout.microbatches_in_flight,
    )
    box = broadcast_from_last_stage([(r.loss, r.logprobs) for r in results], layout)
    losses, logprobs = zip(*box)
    return SimpleNamespace(loss=sum(losses), logprobs=[lp for chunk in logprobs for lp in chunk])
