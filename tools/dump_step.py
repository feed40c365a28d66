"""One forward+backward of the default loss, dumped for parity checks (an interface).

    python tools/dump_step.py --hf-checkpoint DIR --rollouts FILE.jsonl --mode {dense,sparse,dta}
        --dtype {float32,float64} --out OUT.pt [--block-size N] [--tp N] [--pp N] [--dp N]
        [--microbatches M] [--microbatches-in-flight K] [--activation-budget TOKENS] [--cp N] [--ep N]
    torchrun --nproc-per-node 2 tools/dump_step.py ... --tp 2
    torchrun --nproc-per-node 2 tools/dump_step.py ... --pp 2 [--microbatches M]
    torchrun --nproc-per-node 2 tools/dump_step.py ... --cp 2   (every unit split over 2 ranks)
    python tools/dump_step.py --assert-equal-to OTHER.pt --out OUT.pt   (compare two dumps)

Rank 0 writes {"logprobs": [float64 [L_i] per rollout, file order], "loss": 0-dim float64,
"grads": {HF parameter name: full unsharded float64 gradient}}. With DP > 1 the rollouts are
spread over data-parallel ranks, the loss is normalized by the global token count and the
gradients are all-reduced, so the dump equals the single-process one.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-checkpoint", help="local HF checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--rollouts", help="rollout file (JSON Lines)")
    ap.add_argument("--mode", choices=["dense", "sparse", "dta"], default="dta")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--block-size", type=int, default=2048, help="dta: max tokens per unit (chunk size)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--cp", type=int, default=1, help="context-parallel size (units split over ranks)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (DFS pipeline schedule)")
    ap.add_argument("--microbatches", type=int, default=1, help="pp > 1: microbatches per rank")
    ap.add_argument(
        "--microbatches-in-flight",
        type=int,
        default=None,
        help="pp > 1: microbatches a stage runs interleaved (default: 2 x pp)",
    )
    ap.add_argument(
        "--activation-budget",
        type=int,
        default=1 << 20,
        help="dta: kept tokens on the DFS path before recomputing (0: recompute every parent)",
    )
    ap.add_argument("--dp", type=int, default=None, help="data-parallel size (default: world / (tp cp pp))")
    ap.add_argument("--out", required=True, help="dump file (torch.save), or the dump to check")
    ap.add_argument(
        "--assert-equal-to", metavar="OTHER.pt", help="compare --out with OTHER.pt and exit 1 on a difference"
    )
    args = ap.parse_args(argv)

    if args.assert_equal_to:
        from megatron_dta.devtools.parity import TOLERANCES, compare

        a = torch.load(args.out, weights_only=False)
        b = torch.load(args.assert_equal_to, weights_only=False)
        dtype = a.get("dtype", args.dtype)
        bad = compare(a, b, TOLERANCES[dtype])
        for line in bad[:20]:
            print(line)
        print("EQUAL" if not bad else f"DIFFERENT ({len(bad)} tensors beyond tolerance, dtype {dtype})")
        return 1 if bad else 0
    if not args.hf_checkpoint or not args.rollouts:
        ap.error("--hf-checkpoint and --rollouts are required unless --assert-equal-to is given")

    from megatron_dta.cli_util import user_errors
    from megatron_dta.parallel import shutdown
    from megatron_dta.devtools.parity import dump_step

    with user_errors():
        dump = dump_step(
            args.hf_checkpoint,
            args.rollouts,
            args.mode,
            args.dtype,
            args.block_size,
            args.tp,
            args.dp,
            args.pp,
            args.microbatches,
            args.activation_budget,
            args.microbatches_in_flight,
            args.cp,
            args.ep,
        )
        if dump is not None:
            torch.save(dump, args.out)
            print(f"wrote {args.out}: {len(dump['logprobs'])} rollouts, loss {dump['loss'].item():.12g}")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
