"""Measured step time of the DFS pipeline schedule: PP=1 vs PP=2 with K microbatches in flight.

    torchrun --standalone --nproc-per-node 2 tools/bench_pipeline.py [--workload multi_turn]
        [--workload-arg KEY=INT ...] [--microbatches 4] [--in-flight 1 2 4] [--layers 8] [--hidden 256]
        [--block-size 256] [--repeats 3] [--json OUT.json]

Same model (random weights, qwen3-shaped), same microbatches (contiguous shares of the workload's
trees, planned in dta mode), float32, one thread per process. PP=1 runs ``Engine.forward_backward``
over the microbatches on rank 0 while rank 1 waits; PP=2 runs ``forward_backward_pipelining_dfs``
on both ranks, each holding half of the layers. Each configuration: one untimed warm-up, then the
minimum of ``--repeats`` timed steps (all configurations interleaved per repeat, so a busy machine
hurts each alike). Prints a table with ratios to PP=1 and the schedule's simulated bubble.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from itertools import pairwise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="multi_turn", help="synthetic workload (default: multi_turn)")
    ap.add_argument(
        "--workload-arg",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override a size of the synthetic workload, e.g. num_tasks=8 (repeatable)",
    )
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4], help="PP=2 runs with these K")
    ap.add_argument("--microbatches", type=int, default=4, help="contiguous shares of the workload's trees")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=256, help="dta: max tokens per unit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    from megatron_dta.engine import Engine, EngineConfig
    from megatron_dta.losses import PolicyLoss
    from megatron_dta.model.config import ModelConfig
    from megatron_dta.model.transformer import Transformer
    from megatron_dta.parallel import ParallelLayout, shutdown
    from megatron_dta.pipeline import dfs_schedule, event_tokens, forward_backward_pipelining_dfs
    from megatron_dta.synthetic import make_workload, parse_workload_args

    torch.set_num_threads(1)
    layout = ParallelLayout.create(pp=2, device="cpu")
    cfg = ModelConfig(
        vocab_size=1000,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128),
        head_dim=64,
        qk_norm=True,
    )
    torch.manual_seed(0)
    whole = dataclasses.replace(layout, pp=1, pp_rank=0)  # the PP=1 reference: every layer on this rank
    full = Transformer(cfg, whole, torch.float32) if layout.pp_rank == 0 else None
    stage = Transformer(cfg, layout, torch.float32)
    rollouts = make_workload(
        args.workload, vocab_size=cfg.vocab_size, seed=0, **parse_workload_args(args.workload_arg)
    )
    groups: dict = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r)
    trees = list(groups.values())
    bounds = [len(trees) * i // args.microbatches for i in range(args.microbatches + 1)]
    micro = [[r for t in trees[a:b] for r in t] for a, b in pairwise(bounds) if b > a]
    loss = PolicyLoss()
    den = loss.local_denominator(rollouts)
    ecfg = EngineConfig(mode="dta", block_size=args.block_size)

    def pp1():
        if full is not None:
            engine = Engine(full, ecfg)
            for mb in micro:
                engine.forward_backward(mb, loss, den)
            full.zero_grad(set_to_none=True)

    def pp2(in_flight):
        forward_backward_pipelining_dfs(
            forward_step_func=lambda it, _m: (next(it), loss, den),
            data_iterator=iter(micro),
            model=stage,
            num_microbatches=len(micro),
            layout=layout,
            engine_config=ecfg,
            microbatches_in_flight=in_flight,
        )
        stage.zero_grad(set_to_none=True)

    configs = {"pp1": pp1, **{f"pp2_in_flight_{k}": (lambda k=k: pp2(k)) for k in args.in_flight}}
    best = dict.fromkeys(configs, float("inf"))
    for repeat in range(args.repeats + 1):
        for name, fn in configs.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            if repeat:  # the first round is the warm-up
                best[name] = min(best[name], time.perf_counter() - start)
    engine = Engine(stage, ecfg)
    events = [event_tokens(engine.plan(mb).events()) for mb in micro]
    bubbles = {
        "pp1": 0.0,
        **{f"pp2_in_flight_{k}": dfs_schedule(events, 2, k).bubble for k in args.in_flight},
    }
    if layout.pp_rank == 0:
        tokens = sum(len(r) for r in rollouts)
        print(
            f"workload {args.workload}: {tokens} tokens, {len(micro)} microbatches; {args.layers} layers, "
            f"hidden {args.hidden}, float32, block size {args.block_size}, min of {args.repeats}"
        )
        print("| config | seconds/step | vs pp1 | simulated bubble |\n|---|---|---|---|")
        for name, sec in best.items():
            print(f"| {name} | {sec:.3f} | {best['pp1'] / sec:.2f}x | {bubbles[name]:.3f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"tokens": tokens, "microbatches": len(micro), "seconds": best, "bubble": bubbles},
                    f,
                    indent=1,
                )
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
