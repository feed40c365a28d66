"""Benchmark worker: time forward+backward steps of one execution mode in this process.

``tools/benchmark.py`` starts one fresh process per mode (so peak memory is the mode's own) and
collects the JSON each prints. Modes: ``dense``, ``sparse``, ``dta`` (this engine) and, when
transformers is installed, ``hf_dense`` (HF running each rollout alone) and ``hf_sparse`` (HF on
the packed forest with a 4D ancestor mask): the baselines users run today.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.forest import PrefixForest
from megatron_dta.losses import PolicyLoss
from megatron_dta.metrics import current_rss_bytes, peak_memory_bytes
from megatron_dta.model.config import TORCH_DTYPES, ModelConfig
from megatron_dta.parallel import all_reduce_scalar
from megatron_dta.rollouts import Rollout


class MemoryMeter:
    """Peak memory of the process and of a step: RSS on CPU, allocated bytes on GPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def baseline(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return current_rss_bytes()

    def peak(self) -> int:
        return peak_memory_bytes("cuda" if self.cuda else "cpu")


class SteadyStepMeter:
    """The largest memory rise of the steps after the warm-up: allocated bytes above those at
    ``start`` on CUDA; on CPU resident memory sampled every ``interval`` s by a thread (torch's
    kernels release the GIL) above the resident memory at ``start``, after glibc returned its free
    memory to the system (the warm-up's one-time allocations and cached free blocks are excluded,
    which a process peak cannot do)."""

    def __init__(self, device: str, interval: float = 2e-4):
        self.cuda, self.interval = device == "cuda", interval
        self.base = self.top = 0
        self.stop = threading.Event()
        self.thread = None

    def _sample(self):
        while not self.stop.is_set():
            self.top = max(self.top, current_rss_bytes())
            time.sleep(self.interval)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.top = current_rss_bytes()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def rise(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        self.stop.set()
        self.thread.join()
        return self.top - self.base


def _hf_step_fn(cfg: ModelConfig, dtype, device, rollouts: list[Rollout], packed: bool):
    """A PPO step with HF transformers on the same architecture (random weights)."""
    import transformers

    from megatron_dta.model.hf import config_to_hf

    hf_cfg = config_to_hf(cfg)
    hf_cfg.pop("architectures")
    config = transformers.AutoConfig.for_model(**hf_cfg)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(
        device
    )
    loss_fn = PolicyLoss()
    table = loss_fn.token_table(rollouts)
    if not packed:

        def step():
            offset = 0
            for r in rollouts:
                ids = torch.as_tensor(r.input_ids, device=device)[None]
                logits = model(input_ids=ids).logits[0, :-1].float()
                lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).squeeze(1)
                sl = slice(offset + 1, offset + len(r))
                loss, _ = loss_fn.terms(lp, None, {k: v[sl].to(device) for k, v in table.items()})
                loss.backward()
                offset += len(r)

        return model, step

    forest = PrefixForest([r.input_ids for r in rollouts])
    pk = forest.packed()
    mask = torch.as_tensor(pk.dense_mask(), device=device)
    bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)[
        None, None
    ]
    ids = torch.as_tensor(pk.input_ids, device=device)[None]
    pos = torch.as_tensor(pk.position_ids, device=device)[None]
    # (token row predicting, target) for each (rollout, position): gather as the engine does
    rows, targets, flat = [], [], []
    offset = 0
    for i, r in enumerate(rollouts):
        path = forest.paths[i]
        token_rows = np.concatenate([pk.node_start[n] + np.arange(forest.nodes[n].length) for n in path])
        rows.append(token_rows[:-1])
        targets.append(r.input_ids[1:])
        flat.append(offset + np.arange(1, len(r)))
        offset += len(r)
    rows_t = torch.as_tensor(np.concatenate(rows), device=device)
    tgt_t = torch.as_tensor(np.concatenate(targets), device=device)
    flat_t = torch.as_tensor(np.concatenate(flat))

    def step():
        logits = model(input_ids=ids, position_ids=pos, attention_mask=bias).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[rows_t, tgt_t]
        loss, _ = loss_fn.terms(lp, None, {k: v[flat_t].to(device) for k, v in table.items()})
        loss.backward()

    return model, step


def run_mode(
    mode: str,
    cfg: ModelConfig,
    rollouts: list[Rollout],
    steps: int,
    dtype: str,
    device: str,
    block_size: int = 2048,
    max_tokens_per_microbatch: int | None = None,
    hf_dir: str | None = None,
    cp: int = 1,
    memory_budget_mib: float | None = None,
) -> dict:
    """Median seconds per forward+backward step and memory of one mode; 1 warm-up step first. With
    ``cp`` > 1 (under torchrun, cp processes) every unit is split over the ranks; the result holds
    the slowest rank's time and the largest rank's memory."""
    from megatron_dta.model.transformer import Transformer
    from megatron_dta.parallel import ParallelLayout

    torch.manual_seed(0)
    tdtype = TORCH_DTYPES[dtype]
    layout = ParallelLayout.create(tp=1, device=device, cp=cp)
    if mode.startswith("hf_"):
        model, step = _hf_step_fn(cfg, tdtype, device, rollouts, packed=(mode == "hf_sparse"))
    else:
        if hf_dir:
            from megatron_dta.model.hf import load_hf_checkpoint

            model, _ = load_hf_checkpoint(hf_dir, layout, tdtype)
        else:
            model = Transformer(cfg, layout, tdtype)
        engine = Engine(
            model,
            EngineConfig(
                mode=mode,
                block_size=block_size,
                max_tokens_per_microbatch=max_tokens_per_microbatch,
                memory_budget_mib=memory_budget_mib,
            ),
            device=device,
            cp_group=layout.cp_group,
        )

        def step():
            res = engine.forward_backward(rollouts)
            extra["planned_memory_bytes"] = res.plan.extra.get("planned_peak_bytes")
            extra["recomputed_tokens"] = res.recomputed_tokens
            extra["units"] = res.plan.units

    extra: dict = {}
    for p in model.parameters():  # the weights' gradients are resident, not part of the step's rise
        p.grad = torch.zeros_like(p)

    meter, steady = MemoryMeter(device), SteadyStepMeter(device)
    before = meter.baseline()
    times, cpu_times = [], []
    for i in range(steps + 1):
        model.zero_grad(set_to_none=False)
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        else:
            peak = meter.peak()  # the process peak up to here (ru_maxrss never decreases)
            steady.start()
    total = sum(len(r) for r in rollouts)
    sec = all_reduce_scalar(statistics.median(times), layout.cp_group, dist.ReduceOp.MAX)
    # CPU seconds of the busiest rank: what a step takes on dedicated cores, on a shared machine too
    cpu = all_reduce_scalar(statistics.median(cpu_times), layout.cp_group, dist.ReduceOp.MAX)
    steady_rise = int(all_reduce_scalar(steady.rise(), layout.cp_group, dist.ReduceOp.MAX))
    peak = int(all_reduce_scalar(max(peak, meter.peak()), layout.cp_group, dist.ReduceOp.MAX))
    before = int(all_reduce_scalar(before, layout.cp_group, dist.ReduceOp.MAX))
    return {
        "seconds_per_step": sec,
        "tokens_per_second": total / sec,
        "cpu_seconds_per_step": cpu,
        "peak_memory_bytes": peak,
        "step_memory_bytes": peak - before,
        "steady_step_memory_bytes": steady_rise,
        "steps": steps,
        **extra,
    }
