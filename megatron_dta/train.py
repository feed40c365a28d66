"""The training loop and its siblings (forward-only log-probs, HF export, the demo).

``train`` is ``trainer.Trainer`` (parallel layout, model, loss, engine, optimizer, checkpoints) and
its ``run`` loop, one ``train_step`` per optimizer update; this module keeps the step. A step draws
the same global batch on every rank, prepares it as a whole (GRPO group statistics), lets the
balancer give each data-parallel rank its microbatches, normalizes the loss by the all-reduced
global denominator, runs the engine on each microbatch (gradients accumulate), and lets the
optimizer sum gradients over DP, clip and step.

Faults a long job meets are handled here (docs/reliability.md): a step whose batch trains no token
is skipped before any compute, the same way on every layout; a step with a non-finite loss or
gradient on any rank is skipped by all ranks with the optimizer untouched, and
``train.max_bad_steps`` of them in a row stop the run; every DP rank's balancer plan is hashed and
compared each step; a collective that fails (a rank died or stopped answering for
``parallel.timeout_s``) is reported with the operation it was in; a torchrun restart, or
``checkpoint.auto_resume``, resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron_dta.balancer import balance
from megatron_dta.checkpoint import COMPLETE, complete_checkpoints, latest_complete, step_dir
from megatron_dta.config import Config
from megatron_dta.data import TrainData
from megatron_dta.engine import Engine, StepResult
from megatron_dta.errors import CheckpointError, UserError
from megatron_dta.losses import PolicyLoss
from megatron_dta.metrics import memory_now_bytes, peak_memory_bytes, read_metrics
from megatron_dta.model.config import TORCH_DTYPES
from megatron_dta.model.hf import gather_hf, load_hf_checkpoint, load_hf_into, read_hf_dir, save_hf_checkpoint
from megatron_dta.model.transformer import Transformer
from megatron_dta.optim import lr_at
from megatron_dta.parallel import (
    ParallelLayout,
    all_reduce_over,
    all_reduce_scalar,
    broadcast_from_last_stage,
)
from megatron_dta.pipeline import forward_backward_pipelining_dfs
from megatron_dta.rollouts import Rollout, load_rollouts, write_rollouts

# summed over DP ranks (and from the last pipeline stage) each step, in this order
_SUMS = (
    "loss",
    "total_tokens",
    "computed_tokens",
    "recomputed_tokens",
    "tokens",
    "clipped",
    "approx_kl",
    "entropy",
)


def _sum_keys(model_cfg) -> tuple[str, ...]:
    """_SUMS, and an MoE model's aux loss and per-layer expert load (engine/routing.py)."""
    if not model_cfg.num_experts:
        return _SUMS
    loads = [f"moe_load_{s}.{m}" for m in range(len(model_cfg.moe_layers)) for s in ("max", "mean")]
    return (*_SUMS, "aux_loss", *loads)


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class PlanMismatch(RuntimeError):
    """Data-parallel ranks computed different balancer plans: a bug or ranks with different data."""


class CollectiveFailure(RuntimeError):
    """A collective that did not complete: another rank died or stopped answering."""


def say(layout: ParallelLayout, message: str) -> None:
    """A run event worth a log line (skipped steps, resumes), from the main rank, on stderr."""
    if layout.is_main:
        print(message, file=sys.stderr, flush=True)


def create_layout(cfg: Config) -> ParallelLayout:
    device = cfg.parallel.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ParallelLayout.create(
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        device=device,
        microbatches_in_flight=cfg.parallel.microbatches_in_flight,
        timeout_s=cfg.parallel.timeout_s,
        cp=cfg.parallel.cp,
        ep=cfg.parallel.ep,
    )


_COMM_ERRORS = ("Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe", "NCCL")


@contextlib.contextmanager
def collective(step: int, what: str, timeout_s: float):
    """Name the operation when a collective inside fails, so a lost rank reads as one, not as an
    anonymous transport error (gloo raises a plain RuntimeError on timeout or a closed peer)."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if not (isinstance(exc, dist.DistError) or any(w in text for w in _COMM_ERRORS)):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CollectiveFailure(
            f"step {step + 1}: {what} failed on rank {dist.get_rank()}: another rank died or did not "
            f"answer within parallel.timeout_s={timeout_s:g} ({first})"
        ) from exc


def build_model(cfg: Config, layout: ParallelLayout) -> Transformer:
    """This rank's TP shard of its pipeline stage, from the HF checkpoint or a seeded random init
    that depends on neither TP nor PP (each full HF-shaped tensor drawn from a generator seeded by
    its name, then sharded), so TP=2 or PP=2 starts from the same weights as one process."""
    dtype = TORCH_DTYPES[cfg.train.dtype]
    if cfg.model.hf_checkpoint is not None:
        return load_hf_checkpoint(cfg.model.hf_checkpoint, layout, dtype)[0]
    model = Transformer(cfg.model.model_config(), layout, dtype)
    shapes = {name: t.shape for name, t in gather_hf(model, "param", layout.tp_group).items()}
    if model.cfg.tie_embeddings and model.is_last and not model.is_first:  # the last stage's copy
        shapes["model.embed_tokens.weight"] = (model.cfg.vocab_size, model.cfg.hidden_size)
    full = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            full[name] = torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            full[name] = torch.zeros(shape, dtype=dtype)
        else:
            gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + zlib.crc32(name.encode()))
            full[name] = (
                torch.randn(shape, generator=gen, dtype=torch.float64).mul_(model.cfg.init_std).to(dtype)
            )
    load_hf_into(model, full, layout.tp_rank, "initialisation")
    return model


def plan_digest(plan, batch: list[Rollout], dp: int) -> int:
    """A 63-bit hash of the batch's rollouts and the plan's assignment of them to every DP rank."""
    h = hashlib.sha256()
    for r in batch:
        for a in (r.input_ids, r.loss_mask, r.advantages, r.old_logprobs, r.ref_logprobs):
            h.update(b"-" if a is None else np.ascontiguousarray(a).tobytes())
    h.update(repr([[[int(i) for i in mb] for mb in plan.for_rank(k)] for k in range(dp)]).encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_digests_agree(digests: list[int]) -> None:
    if len(set(digests)) > 1:
        raise PlanMismatch(
            "data-parallel ranks computed different balancer plans (digests by DP rank: "
            f"{', '.join(f'{d:016x}' for d in digests)}): every rank must hold the same rollouts, "
            "sampler position and data.cost_model; refusing to train on inconsistent microbatches"
        )


def local_microbatches(batch: list[Rollout], layout: ParallelLayout, data_cfg):
    """(the balance plan, indices into ``batch`` of this DP rank's microbatches, empty ones dropped).
    Each rank balances on its own, so the plans are compared (one all-gather of a hash) first."""
    plan = balance(batch, layout.dp, data_cfg.microbatch_tokens, data_cfg.load_cost_model())
    if layout.dp > 1:
        mine = torch.tensor([plan_digest(plan, batch, layout.dp)], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(layout.dp)]
        dist.all_gather(every, mine, group=layout.dp_group)
        check_digests_agree([int(t.item()) for t in every])
    return plan, [mb for mb in plan.for_rank(layout.dp_rank) if mb]


def gather_over_dp(value: dict, layout: ParallelLayout) -> dict:
    """Merge every DP rank's dict (keys are disjoint)."""
    if layout.dp == 1:
        return value
    parts = [None] * layout.dp
    dist.all_gather_object(parts, value, group=layout.dp_group)
    return {k: v for part in parts for k, v in part.items()}


def run_microbatches(
    engine: Engine,
    layout: ParallelLayout,
    micro: list[list[Rollout]],
    loss_fn=None,
    denominator: float | None = None,
    forward_only: bool = False,
    num_rollouts: int | None = None,
) -> list[StepResult]:
    """The engine over this rank's microbatches (gradients accumulate): one after another, or through
    the DFS pipeline schedule when pp > 1, whose results are filled on the last stage only.
    ``num_rollouts``: the global batch's, for the MoE load-balancing loss."""
    if layout.pp == 1:
        if forward_only:
            return [engine.logprobs(rollouts) for rollouts in micro]
        return [engine.forward_backward(rollouts, loss_fn, denominator, num_rollouts) for rollouts in micro]
    return forward_backward_pipelining_dfs(
        forward_step_func=lambda it, _model: (next(it), loss_fn, denominator, num_rollouts),
        data_iterator=iter(micro),
        model=engine.model,
        num_microbatches=len(micro),
        forward_only=forward_only,
        layout=layout,
        engine_config=engine.cfg,
    )


def forward_logprobs(
    engine: Engine, rollouts: list[Rollout], layout: ParallelLayout, data_cfg
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{index: (logprobs, entropy)} of every rollout, computed over the DP ranks, known to all."""
    local = local_microbatches(rollouts, layout, data_cfg)[1]
    results = run_microbatches(engine, layout, [[rollouts[i] for i in mb] for mb in local], forward_only=True)
    out = {
        i: (lp, ent) for mb, res in zip(local, results) for i, lp, ent in zip(mb, res.logprobs, res.entropy)
    }
    return gather_over_dp(broadcast_from_last_stage(out, layout), layout)


def grads_finite(model: torch.nn.Module) -> bool:
    """This rank's accumulated gradients hold no NaN or Inf (``.grad``, and megatron-style
    ``.main_grad`` buffers where a backend accumulates into those)."""
    for p in model.parameters():
        for g in (p.grad, getattr(p, "main_grad", None)):
            if g is not None and not bool(torch.isfinite(g).all()):
                return False
    return True


def train_step(
    step: int,
    cfg: Config,
    layout: ParallelLayout,
    data: TrainData,
    loss_fn: PolicyLoss,
    engine: Engine,
    optimizer,
) -> dict:
    """One optimizer update; ``skipped`` in the result is None, "empty" or "non-finite"."""
    start = time.perf_counter()
    timeout = cfg.parallel.timeout_s
    if layout.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mem_before = memory_now_bytes(layout.device)
    idx = data.next_indices()
    lr = lr_at(cfg.optimizer, step, cfg.train.steps)
    if not any(data.rollouts[i].loss_mask.any() for i in idx):
        # No token to learn from. An optimizer step would still move the weights (Adam momentum,
        # weight decay) on layouts that zero-fill missing gradients and not on others, so no
        # layout steps: every rank holds the whole batch and decides the same without talking.
        plan = balance(
            [data.rollouts[i] for i in idx], layout.dp, cfg.data.microbatch_tokens, cfg.data.load_cost_model()
        )
        g = dict.fromkeys(_SUMS, 0.0) | {"total_tokens": float(sum(len(data.rollouts[i]) for i in idx))}
        peak = float(peak_memory_bytes(layout.device))
        return _record(step, g, plan, lr, 0.0, time.perf_counter() - start, peak, (0.0, 0.0), "empty")
    missing = data.missing_old_logprobs(idx)
    if missing:
        with collective(step, "filling old log-probs (forward over DP ranks, all-gather)", timeout):
            filled = forward_logprobs(engine, [data.rollouts[i] for i in missing], layout, cfg.data)
        data.fill({missing[k]: lp for k, (lp, _) in filled.items()})
    batch = loss_fn.prepare([data.rollouts[i] for i in idx])
    with collective(step, "the comparison of balancer plans across DP ranks (all-gather)", timeout):
        plan, local = local_microbatches(batch, layout, cfg.data)
    micro = [[batch[i] for i in mb] for mb in local]
    with collective(step, "the all-reduce of the loss denominator over DP ranks", timeout):
        denominator = all_reduce_scalar(
            loss_fn.local_denominator([r for mb in micro for r in mb]), layout.dp_group
        )

    keys = _sum_keys(engine.model.cfg)
    sums = dict.fromkeys(keys, 0.0)
    optimizer.zero_grad()
    compute_start = time.perf_counter()
    with collective(
        step, "the forward/backward pass (pipeline sends/receives, DP gradient reduction)", timeout
    ):
        with optimizer.accumulate():
            results = run_microbatches(engine, layout, micro, loss_fn, denominator, num_rollouts=len(batch))
            # this rank's forward+backward time, before any collective that waits for the slowest rank
            compute = time.perf_counter() - compute_start
            finite = grads_finite(engine.model)  # before any reduction mixes the ranks' gradients
    if engine.model.is_last:  # with pp > 1 the other stages' results are empty; the sums skip them
        for rollouts, res in zip(micro, results):
            sums["loss"] += res.loss.item()
            sums["total_tokens"] += sum(len(r) for r in rollouts)
            sums["computed_tokens"] += res.plan.computed_tokens
            sums["recomputed_tokens"] += res.recomputed_tokens
            for k, v in res.stats.items():
                sums[k] += float(v)
    finite = finite and math.isfinite(sums["loss"])
    with collective(step, "the all-reduce of the step's timings and finiteness over all ranks", timeout):
        bad = all_reduce_scalar(float(not finite), dist.group.WORLD, dist.ReduceOp.MAX) > 0
        compute_max = all_reduce_scalar(compute, layout.dp_group, dist.ReduceOp.MAX)
        compute_min = all_reduce_scalar(compute, layout.dp_group, dist.ReduceOp.MIN)
    if bad:  # every rank skips together: weights and optimizer state stay as they were
        optimizer.zero_grad()
        grad_norm = math.nan
    else:
        with collective(step, "the optimizer step (gradient all-reduce over DP ranks, grad norm)", timeout):
            grad_norm = optimizer.step(lr)

    with collective(step, "the all-reduce of the step's metrics", timeout):
        totals = all_reduce_over(
            torch.tensor([sums[k] for k in keys], dtype=torch.float64), layout.dp_group, layout.pp_group
        )
        peak = all_reduce_scalar(float(peak_memory_bytes(layout.device)), dist.group.WORLD, dist.ReduceOp.MAX)
        # engine.memory_budget_mib: the plans' predicted peak and the step's measured rise
        planned = max((r.plan.extra.get("planned_peak_bytes", 0) for r in results if r), default=0)
        memory = [
            all_reduce_scalar(float(v), dist.group.WORLD, dist.ReduceOp.MAX)
            for v in (planned, peak - mem_before)
        ]
    g = dict(zip(keys, totals.tolist()))
    seconds = time.perf_counter() - start
    record = _record(
        step, g, plan, lr, grad_norm, seconds, peak, (compute_max, compute_min), "non-finite" if bad else None
    )
    return record | {"planned_memory_bytes": int(memory[0]), "step_memory_bytes": int(max(memory[1], 0))}


def _record(step, g: dict, plan, lr, grad_norm, seconds, peak, compute, skipped) -> dict:
    """The metrics.jsonl record of a step from the global sums ``g`` and the balancer ``plan``."""
    loss_tokens = max(g["tokens"], 1.0)
    return {
        "step": step + 1,
        "loss": g["loss"],
        "grad_norm": grad_norm,
        "lr": lr,
        "total_tokens": int(g["total_tokens"]),
        "unique_tokens": plan.unique_tokens,
        "computed_tokens": int(g["computed_tokens"]),
        "recomputed_tokens": int(g["recomputed_tokens"]),
        "sharing_ratio": g["total_tokens"] / max(plan.unique_tokens, 1),
        "loss_tokens": int(g["tokens"]),
        "tokens_per_second": g["total_tokens"] / seconds,
        "seconds": seconds,
        "peak_memory_bytes": int(peak),
        "clip_fraction": g["clipped"] / loss_tokens,
        "approx_kl": g["approx_kl"] / loss_tokens,
        "entropy": g["entropy"] / loss_tokens,
        "microbatches": plan.num_microbatches,
        "rank_compute_seconds_max": compute[0],  # slowest vs fastest DP rank: the balancer's result
        "rank_compute_seconds_min": compute[1],
        "predicted_imbalance": plan.imbalance,
        "skipped": skipped,  # None, "empty" (no trained token) or "non-finite" (loss or gradient)
    } | _moe_record(g)


def _moe_record(g: dict) -> dict:
    """An MoE model's metrics: the load-balancing loss, and per MoE layer the expert load's max over
    mean (tokens per expert, microbatches' values summed; 1.0 is perfectly balanced)."""
    if "aux_loss" not in g:
        return {}
    layers = sorted({int(k.rsplit(".", 1)[1]) for k in g if k.startswith("moe_load_max.")})
    return {
        "aux_loss": g["aux_loss"],
        "moe_load_max_over_mean": [
            g[f"moe_load_max.{m}"] / max(g[f"moe_load_mean.{m}"], 1e-30) for m in layers
        ],
    }


def save_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, for safe_dump
    (run_dir / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))


def resume_fingerprint(cfg: Config, model: Transformer, num_rollouts: int | None) -> dict:
    """What a checkpoint's state depends on, by config field: a resume that changes any of these
    would load weights of another shape, optimizer or RNG files of another layout, or a sampler
    position in another data set. ``train.steps``, the learning rate, loss and engine may change."""
    fingerprint = {f"model.arch.{k}": v for k, v in model.cfg.to_dict().items()}
    fingerprint |= {
        "parallel.tp": cfg.parallel.tp,
        "parallel.pp": cfg.parallel.pp,
        "parallel.ep": cfg.parallel.ep,
        "world size": dist.get_world_size(),
        "train.dtype": cfg.train.dtype,
        "optimizer.backend": cfg.optimizer.backend,
        "data.workload": cfg.data.workload,
        "data.workload_args": cfg.data.workload_args,
        "data.seed": cfg.data.seed,
        "data.rollouts_per_step": cfg.data.rollouts_per_step,
    }
    if num_rollouts is not None:  # a fixed data set (not the Python API's, nor a followed directory)
        fingerprint["number of rollouts in data.rollouts"] = num_rollouts
    if cfg.optimizer.backend == "deepspeed":
        fingerprint["optimizer.zero_stage"] = cfg.optimizer.zero_stage
    return fingerprint


def train(cfg: Config, resume: bool = False) -> list[dict]:
    """Run the configured steps (or follow a rollout directory, ``data.follow``); returns this run's
    per-step metrics (on every rank). The loop is ``Trainer.run``: the CLI uses the Python API."""
    from megatron_dta.trainer import Trainer  # trainer.py builds on this module's step and setup

    run_dir = Path(cfg.checkpoint.run_dir)
    # torchrun sets this on the workers it restarts after a failure: they continue the run
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    resume = resume or cfg.checkpoint.auto_resume or restart > 0
    if not resume and complete_checkpoints(run_dir):
        raise CheckpointError(
            f"checkpoint.run_dir {run_dir} already holds checkpoints: pass --resume to continue "
            "that run, or set checkpoint.run_dir to a new directory"
        )
    return Trainer(cfg).run(resume=resume, restart=restart)


def count_skipped(counts: dict, metrics: dict, layout: ParallelLayout, max_bad: int) -> None:
    """Update the skipped-step counters (kept in checkpoints, so a resumed run counts on) and log."""
    step, skipped = metrics["step"], metrics["skipped"]
    if skipped is None:
        counts["nonfinite_in_a_row"] = 0
        return
    counts["skipped_steps"] += 1
    if skipped == "empty":
        say(layout, f"step {step}: skipped: no rollout of the batch has a trained token (loss_mask all 0)")
        return
    counts["nonfinite_steps"] += 1
    counts["nonfinite_in_a_row"] += 1
    say(
        layout,
        f"step {step}: skipped: non-finite loss or gradient (loss {metrics['loss']:.6g}); weights and "
        f"optimizer state untouched ({counts['nonfinite_in_a_row']} in a row; the run stops at "
        f"train.max_bad_steps={max_bad})",
    )


def compute_logprobs(cfg: Config, rollouts_path: str, out_path: str) -> int:
    """Forward-only pass: each rollout written back with ``logprobs`` and ``entropy`` (entry 0 = 0.0)."""
    layout = create_layout(cfg)
    model = build_model(cfg, layout)
    rollouts = load_rollouts(rollouts_path, model.cfg.vocab_size)
    engine = Engine(model, cfg.engine, layout.device, layout.cp_group)
    values = forward_logprobs(engine, rollouts, layout, cfg.data)
    if layout.is_main:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        write_rollouts(
            out_path,
            (
                {**r.to_json(), "logprobs": values[i][0].tolist(), "entropy": values[i][1].tolist()}
                for i, r in enumerate(rollouts)
            ),
        )
    return len(rollouts)


def export(run_dir: str, hf_out: str, step: int | None = None, dtype: str | None = None) -> Path:
    """Copy a complete checkpoint's model out as an HF checkpoint directory; returns the checkpoint used."""
    path = step_dir(run_dir, step) if step is not None else latest_complete(run_dir)
    if path is None or not (path / COMPLETE).is_file():
        found = [p.name for p in complete_checkpoints(run_dir)]
        raise CheckpointError(
            f"{run_dir}: no complete checkpoint{f' for step {step}' if step is not None else ''}; "
            f"complete ones: {', '.join(found) or 'none'}"
        )
    hf_cfg, tensors = read_hf_dir(path / "model")
    if dtype is not None:
        hf_cfg = {**hf_cfg, "dtype": dtype}
    save_hf_checkpoint(tensors, hf_cfg, hf_out, dtype=dtype)
    return path


def time_modes(cfg: Config, modes=("dta", "dense"), repeats: int = 2) -> dict[str, tuple[float, int]]:
    """Best-of-``repeats`` seconds and computed tokens of one forward+backward of the first step's
    batch in each mode; modes interleave after an untimed warm-up, so a busy machine hurts both."""
    layout = create_layout(cfg)
    model = build_model(cfg, layout)
    data = TrainData(cfg.data, model.cfg.vocab_size)
    loss_fn = PolicyLoss(cfg.loss)
    batch = loss_fn.prepare([data.rollouts[i] for i in data.next_indices()])
    engines = {
        mode: Engine(model, dataclasses.replace(cfg.engine, mode=mode), layout.device, layout.cp_group)
        for mode in modes
    }
    engines[modes[0]].forward_backward(batch, loss_fn)
    best: dict[str, tuple[float, int]] = {}
    for _ in range(repeats):
        for mode, engine in engines.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            res = engine.forward_backward(batch, loss_fn)
            seconds = time.perf_counter() - start
            if mode not in best or seconds < best[mode][0]:
                best[mode] = (seconds, res.plan.computed_tokens)
    return best


def demo(run_dir: str = "runs/demo") -> None:
    """Train the default config (tiny model, synthetic multi-turn batch, CPU), show the loss going
    down and the measured dta-vs-dense speed-up."""
    wall = time.perf_counter()
    # One CPU thread: on a shared or busy machine OpenMP threads spin-wait for descheduled peers,
    # which slowed this demo tenfold in tests; one thread keeps it fast and its timings comparable.
    torch.set_num_threads(1)
    cfg = Config.from_yaml(None, [f"checkpoint.run_dir={run_dir}", "logging.progress=lines"])
    shutil.rmtree(run_dir, ignore_errors=True)
    m = cfg.model.model_config()
    print(
        f"demo: {cfg.model.preset} model ({m.num_layers} layers, hidden {m.hidden_size}, "
        f"vocab {m.vocab_size}), "
        f"'{cfg.data.workload}' workload, {cfg.train.steps} PPO steps",
        flush=True,
    )
    train(cfg)
    metrics = read_metrics(Path(run_dir) / "metrics.jsonl")
    print("\nloss by step (step 1 is on-policy; later steps are PPO updates on the same rollouts):")
    for r in metrics:
        print(
            f"  step {r['step']}: loss {r['loss']:+.6f}  clip_fraction {r['clip_fraction']:.3f}  "
            f"approx_kl {r['approx_kl']:.2e}"
        )
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    print(f"loss went {'down' if last < first else 'UP'}: {first:+.6f} -> {last:+.6f}")
    times = time_modes(cfg)
    (t_dta, n_dta), (t_dense, n_dense) = times["dta"], times["dense"]
    print(
        f"\none forward+backward of the same {metrics[0]['total_tokens']}-token batch (best of 2, "
        f"one thread):"
    )
    print(f"  dense: {n_dense:6d} tokens computed  {t_dense:7.2f} s")
    print(f"  dta:   {n_dta:6d} tokens computed  {t_dta:7.2f} s")
    print(
        f"  dta speed-up over dense: {t_dense / t_dta:.2f}x (sharing ratio {metrics[0]['sharing_ratio']:.2f})"
    )
    print(
        f"\nmetrics: {run_dir}/metrics.jsonl   checkpoint: {latest_complete(run_dir)}   "
        f"demo wall time {time.perf_counter() - wall:.1f} s"
    )
