"""Split a rollout file over N ranks and microbatches, against round-robin and token-count greedy.

    python tools/balance.py --rollouts FILE.jsonl --ranks N [--max-tokens-per-microbatch T]
                            [--cost-model FILE] --json OUT.json

Writes {"microbatches": [{"rank", "index", "sequences": [rollout indices in file order]}],
"imbalance", "duplicated_tokens", "baselines": {"round_robin", "token_count_greedy"}, ...}.
A bad rollout file prints its one-line error and exits with status 2.
"""

import argparse
import json
import sys
from pathlib import Path

from megatron_dta.balancer import CostModel, balance, round_robin, token_count_greedy
from megatron_dta.forest import PrefixForest
from megatron_dta.rollouts import RolloutFormatError, iter_rollouts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", required=True, help="rollout file (JSON Lines)")
    parser.add_argument("--ranks", type=int, required=True, help="data-parallel ranks to split over")
    parser.add_argument(
        "--max-tokens-per-microbatch",
        type=int,
        default=None,
        help="unique-token limit of one microbatch (default: none, one per rank)",
    )
    parser.add_argument(
        "--cost-model", default=None, help="CostModel JSON (tools/calibrate.py); default built in"
    )
    parser.add_argument("--json", required=True, help="where to write the plan")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    if args.max_tokens_per_microbatch is not None and args.max_tokens_per_microbatch < 1:
        parser.error(f"--max-tokens-per-microbatch must be >= 1, got {args.max_tokens_per_microbatch}")
    try:
        forest = PrefixForest([r.input_ids for r in iter_rollouts(args.rollouts)])
    except RolloutFormatError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        model = CostModel.load(args.cost_model) if args.cost_model else CostModel()
    except (OSError, ValueError) as exc:  # unreadable, malformed JSON, unknown keys or bad values
        print(f"--cost-model {args.cost_model}: {exc}", file=sys.stderr)
        return 2

    plans = {
        "balanced": balance(forest, args.ranks, args.max_tokens_per_microbatch, model),
        "round_robin": round_robin(forest, args.ranks, args.max_tokens_per_microbatch, model),
        "token_count_greedy": token_count_greedy(forest, args.ranks, args.max_tokens_per_microbatch, model),
    }
    plan = plans["balanced"]
    out = plan.to_json()
    out["baselines"] = {name: p.imbalance for name, p in plans.items() if name != "balanced"}
    Path(args.json).write_text(json.dumps(out) + "\n")

    print(
        f"{args.rollouts}: {len(forest.sequences):,} rollouts, {plan.unique_tokens:,} unique tokens, "
        f"{args.ranks} ranks x {plan.num_microbatches} microbatches"
    )
    print(f"{'plan':<20} {'imbalance':>10} {'slowest rank (s)':>17} {'duplicated':>12} {'dup %':>7}")
    for name, p in plans.items():
        print(
            f"{name:<20} {p.imbalance:>10.3f} {p.rank_costs.max():>17.4f} {p.duplicated_tokens:>12,} "
            f"{100 * p.duplicated_tokens / p.unique_tokens:>7.2f}"
        )
    print(
        f"lower bounds: imbalance {plan.lower_bound:.3f} (largest rollout alone on a rank), "
        f"duplicated ~{plan.duplication_lower_bound:,} tokens (trees that must be cut)"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
