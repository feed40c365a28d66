"""Summarise the prefix forest of a rollout file: how much the rollouts share, and its shape.

    python tools/tree_stats.py ROLLOUTS.jsonl [--vocab-size V] [--json]

Invalid input prints the one-line RolloutFormatError message and exits with status 2.
"""

import argparse
import json
import sys

from megatron_dta.forest import PrefixForest
from megatron_dta.rollouts import RolloutFormatError, iter_rollouts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rollouts", help="rollout file (JSON Lines)")
    parser.add_argument("--vocab-size", type=int, default=None, help="also check token ids are < V")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        forest = PrefixForest([r.input_ids for r in iter_rollouts(args.rollouts, args.vocab_size)])
    except RolloutFormatError as exc:
        print(exc, file=sys.stderr)
        return 2
    stats = forest.stats()
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"{args.rollouts}")
    print(f"  rollouts        {stats['sequences']:>12,}")
    print(f"  total tokens    {stats['total_tokens']:>12,}   (what padded training would run)")
    print(f"  unique tokens   {stats['unique_tokens']:>12,}   (what tree training runs)")
    print(f"  sharing ratio   {stats['sharing_ratio']:>12.2f}   (total / unique)")
    print(f"  trees           {stats['trees']:>12,}")
    print(f"  nodes           {stats['nodes']:>12,}")
    print(f"  max depth       {stats['max_depth']:>12,}   (nodes on the deepest root-to-leaf path)")
    print(f"  longest rollout {stats['max_path_tokens']:>12,}   tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
