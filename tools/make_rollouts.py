"""Write a synthetic workload (megatron_dta.synthetic) to a rollout file.

python tools/make_rollouts.py --workload NAME --vocab-size V --seed S --out FILE.jsonl
"""

import argparse
import sys

from megatron_dta.errors import UserError
from megatron_dta.rollouts import write_rollouts
from megatron_dta.synthetic import WORKLOADS, make_workload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--vocab-size", type=int, required=True, help="the model's vocabulary size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
    args = parser.parse_args(argv)
    try:
        rollouts = make_workload(args.workload, args.vocab_size, args.seed)
    except UserError as exc:  # a size the generator refuses
        parser.error(str(exc))
    write_rollouts(args.out, rollouts)
    print(f"wrote {len(rollouts)} rollouts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
