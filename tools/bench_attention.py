"""Cascade vs per-child attention for the sibling units of DTA (forward + backward).

    python tools/bench_attention.py [--device cpu] [--dtype float32] [--json out.json]

A node with ``g`` children of ``L`` tokens each under a ``P``-token prefix is attended three ways:
- per_child: one call per child over ``[prefix ; its own tokens]`` (what a varlen kernel does,
  the prefix K/V read once per child);
- packed_sdpa: one sdpa call for all children with a [g*L, P + g*L] mask (the sdpa backend);
- cascade: the prefix once for all g*L queries, own tokens under the sibling mask, merged by
  log-sum-exp (the cascade backend).
Prints median seconds per forward+backward and the speedup of cascade over per_child. A
measurement to read, not a test: nothing here asserts a time.
"""

import argparse
import json
import statistics
import time

import torch

from megatron_dta.attention import AttnSpec, cascade_attention, sdpa_attention


def per_child(q_TND, k_SKD, v_SKD, P: int, lengths: list[int]):
    outs, start = [], 0
    for n in lengths:
        keys = torch.cat([k_SKD[:P], k_SKD[P + start : P + start + n]])
        vals = torch.cat([v_SKD[:P], v_SKD[P + start : P + start + n]])
        outs.append(sdpa_attention(q_TND[start : start + n], keys, vals, AttnSpec(P, n)))
        start += n
    return torch.cat(outs)


def time_fwd_bwd(fn, q, k, v, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up (mask building, allocator)
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(qq, kk, vv).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument(
        "--heads",
        type=int,
        nargs=3,
        default=[14, 2, 64],
        metavar=("N", "K", "D"),
        help="query heads, kv heads, head dim (default: Qwen2-0.5B's 14 2 64)",
    )
    ap.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--children", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--child-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    N, K, D = args.heads
    rows = []
    print(
        f"{'P':>6} {'g':>3} {'L':>4} {'per_child':>10} {'packed_sdpa':>12} "
        f"{'cascade':>9} {'cascade speedup':>16}"
    )
    for P in args.prefix:
        for g in args.children:
            lengths = [args.child_len] * g
            T = sum(lengths)
            gen = torch.Generator().manual_seed(0)
            q, k, v = (
                torch.randn(n, h, D, generator=gen).to(args.device, dtype)
                for n, h in ((T, N), (P + T, K), (P + T, K))
            )
            seg = torch.repeat_interleave(torch.arange(g), torch.tensor(lengths))
            spec = AttnSpec(P, T, seg, seg + 1)
            ways = {
                "per_child_s": lambda a, b, c, P=P, lengths=lengths: per_child(a, b, c, P, lengths),
                "packed_sdpa_s": lambda a, b, c, spec=spec: sdpa_attention(a, b, c, spec),
                "cascade_s": lambda a, b, c, spec=spec: cascade_attention(a, b, c, spec),
            }
            row = {
                "prefix": P,
                "children": g,
                "child_len": args.child_len,
                "device": args.device,
                "dtype": args.dtype,
            }
            row.update(
                {way: time_fwd_bwd(fn, q, k, v, args.repeats, args.device) for way, fn in ways.items()}
            )
            rows.append(row)
            print(
                f"{P:>6} {g:>3} {args.child_len:>4} {row['per_child_s']:>10.4f} "
                f"{row['packed_sdpa_s']:>12.4f} "
                f"{row['cascade_s']:>9.4f} {row['per_child_s'] / row['cascade_s']:>15.2f}x"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
