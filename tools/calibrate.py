"""Fit the balancer's cost model to DTA step times measured on this hardware.

    python tools/calibrate.py [--model PRESET] [--dtype D] [--samples N] --out cost_model.json

Times one DTA forward+backward on each of N sub-batches of varied shape (synthetic workloads,
random subsets), fits the CostModel's non-negative coefficients to them (NNLS) and writes the
model as JSON (point ``--cost-model`` of tools/balance.py, or ``data.cost_model`` in a config,
at it). Prints each sample's predicted vs measured time and the fit's error.
"""

from __future__ import annotations

import argparse
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
    layout = ParallelLayout.create(device=device)
    cfg = preset(args.model)
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
        t0 = time.perf_counter()
        engine.forward_backward(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        feats.append(CostModel.features(forest))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
