"""Benchmark the data path: forest build speed and the rollout loader's peak memory.

    python tools/bench_forest.py [--tokens 1000000] [--file-mb 100] [--vocab-size 32000]

Prints seconds per 100K tokens to build a PrefixForest over ``--tokens`` total tokens of the
multi_turn workload, then writes a ~``--file-mb`` MB rollout file and loads it in a fresh process,
printing that process's peak RSS (resource.getrusage) against the file size. A measurement to read,
not a test: nothing here asserts a time.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_dta.forest import PrefixForest
from megatron_dta.metrics import current_rss_bytes, peak_rss_bytes
from megatron_dta.rollouts import load_rollouts, write_rollouts
from megatron_dta.synthetic import make_workload


def bench_build(tokens: int, vocab_size: int, repeats: int = 3) -> None:
    probe = sum(map(len, make_workload("multi_turn", vocab_size, num_tasks=8)))
    num_tasks = math.ceil(tokens / (probe / 8))
    seqs = [r.input_ids for r in make_workload("multi_turn", vocab_size, num_tasks=num_tasks)]
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        forest = PrefixForest(seqs)
        best = min(best, time.perf_counter() - start)
    stats = forest.stats()
    print(
        f"forest build: {stats['total_tokens']:,} tokens in {stats['sequences']:,} rollouts "
        f"({stats['unique_tokens']:,} unique, sharing {stats['sharing_ratio']:.2f}, {stats['nodes']:,} nodes)"
    )
    print(f"  best of {repeats}: {best:.3f} s = {best / stats['total_tokens'] * 1e5:.4f} s per 100K tokens")


def write_file(path: Path, megabytes: int, vocab_size: int) -> None:
    """Stream multi_turn batches (successive seeds) to ``path`` until it holds about ``megabytes``."""
    sample = make_workload("demo", vocab_size)[0]
    bytes_per_token = len(json.dumps(sample.to_json())) / len(sample)
    target_tokens = megabytes * 1e6 / bytes_per_token

    def batches():
        written, seed = 0, 0
        while written < target_tokens:
            for r in make_workload("multi_turn", vocab_size, seed=seed):
                written += len(r)
                yield r
            seed += 1

    write_rollouts(path, batches())


def measure_load(path: str) -> None:
    """Run in a fresh process so that the peak RSS is the loader's alone."""
    before = current_rss_bytes()
    rollouts = load_rollouts(path)
    arrays = sum(r.input_ids.nbytes + r.loss_mask.nbytes + r.advantages.nbytes for r in rollouts)
    print(
        json.dumps(
            {
                "before": before,
                "peak": peak_rss_bytes(),
                "arrays": arrays,
                "rollouts": len(rollouts),
                "tokens": sum(map(len, rollouts)),
            }
        )
    )


def bench_load(megabytes: int, vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rollouts.jsonl"
        write_file(path, megabytes, vocab_size)
        size = path.stat().st_size
        out = subprocess.run(
            [sys.executable, __file__, "--measure-load", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    m = json.loads(out)
    mb = 1e6
    print(f"loader: {size / mb:.1f} MB file, {m['rollouts']:,} rollouts, {m['tokens']:,} tokens")
    print(
        f"  peak RSS {m['peak'] / mb:.1f} MB = {m['peak'] / size:.2f}x file size "
        f"(after imports {m['before'] / mb:.1f} MB; loading added {(m['peak'] - m['before']) / size:.2f}x; "
        f"the parsed arrays alone are {m['arrays'] / size:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="total tokens for the forest build")
    parser.add_argument("--file-mb", type=int, default=100, help="size of the rollout file to load")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--measure-load", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_load:
        measure_load(args.measure_load)
        return
    bench_build(args.tokens, args.vocab_size)
    bench_load(args.file_mb, args.vocab_size)


if __name__ == "__main__":
    main()
