"""Size a job before launching it: memory per rank, step time and communication of a layout.

``plan(cfg, world_size, profile)`` runs the project's own code at world size N in this process, with
no weights and no accelerator: every rank position's model on the meta device over fake process
groups (``planner.ranks``), the balancer and the engine's plans on the step's batch, the DFS
pipeline schedule, priced by a hardware profile (``planner.cost``, ``planner.hardware``). Its
result is the JSON interface of ``megatron-dta plan`` (docs/scaling.md describes every field);
``check_fits`` turns an overflow into one line naming the rank, the memory term and the setting
to change. Context parallelism (``parallel.cp``) and mixture-of-experts models with expert
parallelism (``parallel.ep``) are modelled as their executors run (``planner.cost``).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_dta.engine import refuse_cp_with_moe
from megatron_dta.errors import UserError
from megatron_dta.planner.cost import Layout, Workload, mfu, predict, rank_entries
from megatron_dta.planner.hardware import GIB, PROFILES, HardwareProfile, load_profile
from megatron_dta.planner.ranks import rank_shapes

__all__ = ["PROFILES", "HardwareProfile", "Workload", "check_fits", "format_table", "load_profile", "plan"]

TERMS = ("weights", "grads", "optimizer", "activations", "kv_stacks")
FIXES = {
    "weights": "raise parallel.tp or parallel.pp (parallel.ep for an MoE model's experts)",
    "grads": "raise parallel.tp or parallel.pp, or use optimizer.backend=deepspeed optimizer.zero_stage=2",
    "optimizer": "use optimizer.backend=megatron (distributed optimizer) or raise parallel.dp (more GPUs)",
    "optimizer_sharded": "raise parallel.dp (more GPUs: the distributed optimizer shards over them), "
    "parallel.tp or parallel.pp",
    "activations": "lower engine.activation_budget_tokens, data.microbatch_tokens or engine.block_size, "
    "or raise parallel.cp",
    "kv_stacks": "raise parallel.cp, parallel.tp or parallel.pp (the K/V stacks hold the longest path of "
    "every layer)",
}


def model_config(cfg):
    """The architecture alone: the preset's, or an HF checkpoint's config.json (weights unread)."""
    from megatron_dta.model.hf import config_from_hf

    if cfg.model.hf_checkpoint is None:
        return cfg.model.model_config()
    path = Path(cfg.model.hf_checkpoint) / "config.json"
    if not path.is_file():
        raise UserError(f"model.hf_checkpoint: {path} not found (the planner reads the architecture from it)")
    return config_from_hf(json.loads(path.read_text()), str(path))


def workload_of(cfg, vocab_size: int) -> Workload:
    """The first step's global batch, drawn as training draws it."""
    from megatron_dta.data import TrainData

    data = TrainData(cfg.data, vocab_size)
    return Workload([data.rollouts[i] for i in data.next_indices()], cfg.data.load_cost_model())


def _mode_result(cfg, mode, shapes, layout, hw, workload):
    e = cfg.engine
    events = workload.events(
        layout.dp,
        cfg.data.microbatch_tokens,
        mode,
        e.block_size,
        e.pack_tokens,
        e.max_tokens_per_microbatch,
        e.activation_budget_tokens,
    )
    pred = predict(shapes, layout, hw, events, cfg.optimizer.backend, cfg.optimizer.zero_stage)
    ranks = rank_entries(pred, shapes, layout, hw)
    return pred, ranks


def plan(
    cfg, world_size: int, hw: HardwareProfile, workload: Workload | None = None, baselines: bool = True
) -> dict:
    """The ``megatron-dta plan`` report of ``cfg`` on ``world_size`` devices of profile ``hw``;
    ``baselines=False`` leaves out the dense and sparse predictions (a third of the time each)."""
    from megatron_dta.model.config import TORCH_DTYPES

    mcfg = model_config(cfg)
    tp, pp, cp, ep = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp, cfg.parallel.ep
    refuse_cp_with_moe(cp > 1, bool(mcfg.num_experts))  # as the engine does
    shapes = rank_shapes(mcfg, tp, pp, world_size, TORCH_DTYPES[cfg.train.dtype], cp, ep)
    in_flight = cfg.parallel.microbatches_in_flight or 2 * pp
    layout = Layout(tp, pp, world_size // (tp * cp * ep * pp), in_flight, cp, ep)
    workload = workload or workload_of(cfg, mcfg.vocab_size)
    results = {}
    for mode in dict.fromkeys((cfg.engine.mode, "dense", "sparse") if baselines else (cfg.engine.mode,)):
        pred, ranks = _mode_result(cfg, mode, shapes, layout, hw, workload)
        peak = max(r["memory_bytes"]["total"] for r in ranks)
        results[mode] = {
            "step_seconds": pred.step_seconds,
            "tokens_per_second": workload.total_tokens / pred.step_seconds,
            "mfu": mfu(pred, layout, hw),
            "bubble": pred.bubble,
            "imbalance": pred.imbalance,
            "peak_memory_bytes": peak,
            "fits": peak <= hw.memory_bytes,
            "_pred": pred,
            "_ranks": ranks,
        }
    main = results[cfg.engine.mode]
    pred = main["_pred"]
    return {
        "layout": {"tp": tp, "cp": cp, "ep": ep, "pp": pp, "dp": layout.dp},
        "world_size": world_size,
        "hardware": hw.name,
        "device_memory_bytes": int(hw.memory_bytes),
        "model": {
            "model_type": mcfg.model_type,
            "layers": mcfg.num_layers,
            "hidden_size": mcfg.hidden_size,
            "vocab_size": mcfg.vocab_size,
        },
        "mode": cfg.engine.mode,
        "optimizer_backend": cfg.optimizer.backend,
        "parameters_total": sum(s.parameters for s in shapes.values()),
        "ranks": main["_ranks"],
        "fits": main["fits"],
        "step_seconds": pred.step_seconds,
        "tokens_per_second": main["tokens_per_second"],
        "mfu": main["mfu"],
        "bubble": pred.bubble,
        "imbalance": pred.imbalance,
        "communication_bytes": pred.communication_bytes,
        "breakdown_seconds": {
            "compute_max": max(pred.compute_seconds, default=0.0),
            "compute_mean": sum(pred.compute_seconds) / max(len(pred.compute_seconds), 1),
            "dp_reduction": pred.dp_seconds,
            "optimizer": pred.optimizer_seconds,
        },
        "batch": {
            "rollouts": len(workload.batch),
            "tokens": workload.total_tokens,
            "microbatches_per_rank": workload.split(layout.dp, cfg.data.microbatch_tokens)[
                0
            ].num_microbatches,
        },
        "baselines": {
            mode: {k: v for k, v in r.items() if not k.startswith("_")}
            for mode, r in results.items()
            if mode in ("dense", "sparse")
        },
    }


def check_fits(report: dict) -> None:
    """ValueError naming the first rank over the device memory, its largest term and the fix."""
    limit = report["device_memory_bytes"]
    for r in report["ranks"]:
        mem = r["memory_bytes"]
        if mem["total"] > limit:
            term = max(TERMS, key=lambda k: mem[k])
            fix = FIXES[term]
            if term == "optimizer" and report["optimizer_backend"] != "torch":
                fix = FIXES["optimizer_sharded"]
            raise UserError(
                f"rank {r['rank']}: {mem['total'] / GIB:.1f} GiB of {limit / GIB:.1f} GiB, largest term "
                f"{term} {mem[term] / GIB:.1f} GiB: {fix} (--allow-oom reports anyway)"
            )


def format_table(report: dict) -> str:
    lay = report["layout"]
    worst = max(report["ranks"], key=lambda r: r["memory_bytes"]["total"])
    mem = worst["memory_bytes"]
    lines = [
        f"layout tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} cp={lay['cp']} ep={lay['ep']} on "
        f"{report['world_size']} x "
        f"{report['hardware']}: {report['parameters_total'] / 1e9:.3f}B parameters, "
        f"{'fits' if report['fits'] else 'DOES NOT FIT'}",
        f"busiest rank {worst['rank']}: "
        + ", ".join(f"{k} {mem[k] / GIB:.2f}" for k in (*TERMS, "reserved", "total"))
        + f" GiB of {report['device_memory_bytes'] / GIB:.1f}",
        "| mode | step s | tokens/s | MFU | bubble | imbalance | peak GiB | fits |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = {report["mode"]: {**report, "peak_memory_bytes": mem["total"]}, **report["baselines"]}
    for mode, r in rows.items():
        lines.append(
            f"| {mode} | {r['step_seconds']:.3f} | {r['tokens_per_second']:,.0f} | {r['mfu']:.3f} | "
            f"{r['bubble']:.3f} | {r['imbalance']:.3f} | {r['peak_memory_bytes'] / GIB:.2f} | "
            f"{'yes' if r['fits'] else 'no'} |"
        )
    comm = report["communication_bytes"]
    lines.append(
        "communication per rank and step (GiB): " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in comm.items())
    )
    return "\n".join(lines)
