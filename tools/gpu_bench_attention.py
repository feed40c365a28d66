"""Attention backend timings on a GPU: sdpa, flex, auto, cascade, te, flash (forward + backward).

    python tools/gpu_bench_attention.py --json $OUT/bench_attention_gpu.json [--dtype bfloat16]

Cases are the units DTA, sparse and dense run on 16K-token paths with 2048-token chunks, heads of
Qwen2-0.5B (14 query, 2 kv, head dim 64) unless --heads says otherwise:
- path_16k: the 8 chunks of one 16K path in DFS order (prefix 0, 2048, ..., 14336; T = 2048);
- siblings: 8 children of 256 tokens under an 8192-token prefix (one DTA unit);
- sparse_tree: a packed 16K forest (4096-token prompt, 12 children of 1024), no prefix;
- dense: one causal 16K rollout.
Each row: first-call seconds (compilation, masks), median steady seconds over --repeats, peak
memory; a backend that cannot run is recorded with its reason. Rows are written as they finish.
"""

import argparse
import json
import statistics
import time

import torch

from megatron_dta.attention import AttentionBackendUnavailable, AttnSpec, get_attention_backend


def cases():
    tree_lengths = [4096] + [1024] * 12
    tree_seg = torch.repeat_interleave(torch.arange(13), torch.tensor(tree_lengths))
    tree_out = torch.where(tree_seg == 0, torch.tensor(13), tree_seg + 1)  # the prompt is everyone's ancestor
    sib = torch.repeat_interleave(torch.arange(8), 256)
    return {
        "path_16k": [lambda i=i: AttnSpec(2048 * i, 2048) for i in range(8)],
        "siblings": [lambda: AttnSpec(8192, 2048, sib, sib + 1)],
        "sparse_tree": [lambda: AttnSpec(0, 16384, tree_seg, tree_out)],
        "dense": [lambda: AttnSpec(0, 16384)],
    }


def run_case(fn, spec_makers, N, K, D, dtype, specs=None):
    """Forward + backward of every unit of a case; fresh specs unless given (then masks are cached)."""
    specs = specs or [make() for make in spec_makers]
    for spec in specs:
        T, S = spec.own_len, spec.prefix_len + spec.own_len
        q = torch.randn(T, N, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(S, K, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(S, K, D, device="cuda", dtype=dtype, requires_grad=True)
        fn(q, k, v, spec).sum().backward()
    return specs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="sdpa,flex,auto,cascade,te,flash")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--heads", type=int, nargs=3, default=[14, 2, 64], metavar=("N", "K", "D"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--budget-s", type=float, default=240, help="skip what would start after this many seconds"
    )
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    N, K, D = args.heads
    start = time.perf_counter()
    rows = []
    device = torch.cuda.get_device_name()
    for name in args.backends.split(","):
        try:
            fn = get_attention_backend(name, "cuda")
        except AttentionBackendUnavailable as e:
            rows.append({"backend": name, "unavailable": str(e)})
            continue
        for case, makers in cases().items():
            row = {"backend": name, "case": case, "dtype": args.dtype, "heads": [N, K, D], "device": device}
            if time.perf_counter() - start > args.budget_s:
                row["skipped"] = "time budget"
            else:
                try:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    specs = run_case(fn, makers, N, K, D, dtype)
                    torch.cuda.synchronize()
                    row["first_call_s"] = time.perf_counter() - t0
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        run_case(fn, makers, N, K, D, dtype, specs)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    row["steady_s"] = statistics.median(times)
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                except Exception as e:  # noqa: BLE001 (record and go on: one backend failing must not hide the rest)
                    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
