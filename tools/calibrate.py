"""Fit the balancer's cost model to DTA step times measured on this hardware.

    python tools/calibrate.py [--model PRESET] [--dtype D] [--samples N] --out cost_model.json

Times one DTA forward+backward on each of N sub-batches of varied shape (synthetic workloads,
random subsets), fits the CostModel's non-negative coefficients to them (NNLS) and writes the
model as JSON (point ``--cost-model`` of tools/balance.py, or ``data.cost_model`` in a config,
at it). Prints each sample's predicted vs measured time and the fit's error.

``--profile-out FILE`` also fits the planner's hardware profile (``megatron-dta plan --gpu FILE``;
docs/hardware_cpu.json is the one ``--gpu cpu`` reads) to the same timings: the samples' work as the
planner counts it (``planner.cost.work``: matmul FLOPs, attention FLOPs, memory-bound bytes,
kernel calls), non-negative least squares on the relative error; plus the process's resident
memory before any model (the profile's reserved bytes) and, in two spawned gloo processes, the
bandwidth and latency of an all-reduce (its link speeds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model preset (random weights)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--samples", type=int, default=16, help="timed sub-batches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="cost model JSON to write")
    ap.add_argument("--profile-out", help="also fit the planner's hardware profile and write it here")
    args = ap.parse_args(argv)

    import torch

    from megatron_dta.balancer import CostModel
    from megatron_dta.engine import Engine, EngineConfig
    from megatron_dta.forest import PrefixForest
    from megatron_dta.model.config import TORCH_DTYPES, preset
    from megatron_dta.model.transformer import Transformer
    from megatron_dta.parallel import ParallelLayout
    from megatron_dta.synthetic import make_workload

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = TORCH_DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    cfg = preset(args.model)
    if args.profile_out:  # the fake world of the planner's rank shapes comes before the real one
        from megatron_dta.metrics import peak_rss_bytes
        from megatron_dta.planner.cost import summarize, work
        from megatron_dta.planner.ranks import rank_shapes

        shape = rank_shapes(cfg, 1, 1, 1, dtype)[0, 0, 0]
        works = []
    layout = ParallelLayout.create(device=device)
    if args.profile_out:  # a training process holds this much before its model: imports, process groups
        baseline_rss = peak_rss_bytes()
    model = Transformer(cfg, layout, dtype)
    engine = Engine(model, EngineConfig(mode="dta"), device=device)
    rng = np.random.default_rng(args.seed)
    pools = {
        name: make_workload(name, cfg.vocab_size, args.seed, **kw)
        for name, kw in [
            ("demo", {}),
            ("grpo", {"num_prompts": 4, "group_size": 8, "prompt_len": 128, "completion_len": 64}),
            ("tree_search", {"num_roots": 2, "depth": 3, "segment_len": 32, "prompt_len": 128}),
            ("fanout", {"num_completions": 32, "completion_len": 32}),
        ]
    }
    engine.forward_backward(pools["demo"][:4])  # warm-up
    # On CPU the process's own CPU time: on a shared machine wall time measures the neighbours
    # (run single-threaded, OMP_NUM_THREADS=1, as the CPU configs train); on GPU wall time.
    clock = time.process_time if device == "cpu" else time.perf_counter
    feats, secs = [], []
    for i in range(args.samples):
        name = list(pools)[i % len(pools)]
        pool = pools[name]
        k = int(rng.integers(max(1, len(pool) // 8), len(pool) + 1))
        batch = [pool[j] for j in sorted(rng.choice(len(pool), size=k, replace=False))]
        forest = PrefixForest([r.input_ids for r in batch])
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        engine.forward_backward(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        secs.append(clock() - t0)
        feats.append(CostModel.features(forest))
        if args.profile_out:
            works.append(work(summarize(engine.plan(batch), engine.cfg.activation_budget_tokens), shape))
        print(
            f"[calibrate] {i + 1}/{args.samples} {name}: {len(batch)} rollouts, "
            f"{forest.unique_tokens} unique "
            f"tokens, {len(forest.nodes)} nodes: {secs[-1]:.3f} s",
            flush=True,
        )
    model_fit, err = CostModel.fit(np.array(feats), np.array(secs))
    pred = model_fit.predict(np.array(feats))
    for s, p in zip(secs, pred):
        print(f"  measured {s:.3f} s  predicted {p:.3f} s  ({100 * (p - s) / s:+.1f}%)")
    print(f"fit error (rms relative): {err:.3f}; coefficients: {model_fit}")
    model_fit.save(args.out)
    print(f"wrote {args.out}")
    if args.profile_out:
        profile = fit_profile(np.array(works), np.array(secs), baseline_rss)
        profile.save(args.profile_out)
        print(f"hardware profile (fit error {profile.fit_error:.3f}): {profile}\nwrote {args.profile_out}")
    return 0


def fit_profile(works_R4: np.ndarray, seconds_R: np.ndarray, reserved_bytes: int):
    """The planner's CPU profile: rates fitted to the timed samples, links measured over gloo."""
    from megatron_dta.balancer import nnls
    from megatron_dta.planner.hardware import HardwareProfile

    coef = nnls(works_R4 / seconds_R[:, None], np.ones(len(seconds_R)))
    error = float(np.sqrt(np.mean((works_R4 @ coef / seconds_R - 1) ** 2)))
    # a zero coefficient (that work did not show in the timings) becomes a rate of 1e30/s
    lin, attn, mem, call = (max(c, 1e-30) for c in coef)
    bandwidth, latency = _gloo_link()
    return HardwareProfile(
        "cpu",
        memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        peak_flops=1 / lin,
        matmul_efficiency=1.0,
        attention_efficiency=lin / attn,
        memory_bytes_per_s=1 / mem,
        call_seconds=float(coef[3]),
        intra_node_bytes_per_s=bandwidth,
        inter_node_bytes_per_s=bandwidth,
        collective_latency_s=latency,
        devices_per_node=os.cpu_count() or 1,
        reserved_bytes=float(reserved_bytes),
        attention_scores_materialized=True,  # CPU sdpa writes the [T, P + T] scores
        fit_error=error,
    )


def _gloo_worker(rank: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    big, small = torch.ones(4 << 20), torch.ones(1)  # 16 MiB and 4 bytes of float32
    times = {}
    for name, t, reps in (("big", big, 5), ("small", small, 50)):
        dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        times[name] = (time.perf_counter() - t0) / reps
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def _gloo_link() -> tuple[float, float]:
    """(bytes/s a rank sends, seconds per collective) of a two-process gloo all-reduce on this host."""
    import torch.multiprocessing as mp

    from megatron_dta.parallel import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_gloo_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=600)
    for p in procs:
        p.join()
    latency = times["small"]
    # a ring all-reduce over 2 ranks sends the whole buffer once: 2 (n - 1) / n = 1
    return (16 << 20) / max(times["big"] - latency, 1e-9), latency


if __name__ == "__main__":
    sys.exit(main())
