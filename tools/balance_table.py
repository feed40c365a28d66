"""Balancer sweep: imbalance and duplicated tokens per synthetic workload and rank count, against
round-robin and token-count greedy, as a Markdown table (the one in docs/balancer.md).

    python tools/balance_table.py [--ranks 2 8 64 256 1024] [--workloads grpo ...]
                                  [--max-tokens-per-microbatch 16384] [--cost-model FILE]

Each workload is scaled with the rank count (SCALE below) so that every rank has work to do.
"""

import argparse
import sys
import time

from megatron_dta.balancer import CostModel, balance, round_robin, token_count_greedy
from megatron_dta.forest import PrefixForest
from megatron_dta.synthetic import make_workload

# workload -> its size for R ranks (generator defaults otherwise): per rank about
SCALE = {
    "grpo": lambda r: {"num_prompts": 2 * r},  # 2 prompts x 8 completions
    "multi_turn": lambda r: {
        "num_tasks": 2 * r
    },  # 2 tasks; one tree, as every rollout opens with the system prompt
    "tree_search": lambda r: {"num_roots": 2 * r},  # 2 search trees of 1..81 leaves
    "mixed": lambda r: {
        "num_small": max(96, 12 * r)
    },  # 12 small groups; 3 huge trees (from 8 ranks on, each > 1 rank)
    "long_paths": lambda r: {"num_paths": 4 * r},  # 4 ~8K-token paths; one tree under a 3K-token prompt
    "fanout": lambda r: {"num_completions": 16 * r},  # 16 completions; one tree under a 256-token prompt
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 64, 256, 1024])
    parser.add_argument("--workloads", nargs="+", default=list(SCALE), choices=list(SCALE))
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=16384)
    parser.add_argument("--cost-model", default=None, help="CostModel JSON; default built in")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = CostModel.load(args.cost_model) if args.cost_model else CostModel()
    limit = args.max_tokens_per_microbatch

    print(
        f"max_tokens_per_microbatch = {limit}. imb. = max / mean predicted rank time; LB = its lower "
        "bound (the largest rollout alone on a rank); dup % = duplicated / unique tokens; dup floor % = "
        "what cutting the trees that must be cut costs at least; step x = the baseline's slowest rank "
        "over ours.\n"
    )
    print(
        "| workload | ranks | rollouts | unique tokens | mb/rank | imb. | LB | dup % | dup floor % "
        "| round-robin imb. / dup % / step x | token greedy imb. / dup % / step x | seconds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.workloads:
        for ranks in args.ranks:
            rollouts = make_workload(name, 32000, args.seed, **SCALE[name](ranks))
            forest = PrefixForest([r.input_ids for r in rollouts])
            start = time.perf_counter()
            plan = balance(forest, ranks, limit, model)
            seconds = time.perf_counter() - start

            pct = 100 / plan.unique_tokens
            versus = [
                f"{p.imbalance:.3f} / {pct * p.duplicated_tokens:.1f} / "
                f"{p.rank_costs.max() / plan.rank_costs.max():.2f}"
                for p in (
                    round_robin(forest, ranks, limit, model),
                    token_count_greedy(forest, ranks, limit, model),
                )
            ]
            print(
                f"| {name} | {ranks} | {len(rollouts):,} | {plan.unique_tokens:,} | {plan.num_microbatches} "
                f"| **{plan.imbalance:.3f}** | {plan.lower_bound:.3f} | "
                f"**{pct * plan.duplicated_tokens:.2f}** "
                f"| {pct * plan.duplication_lower_bound:.2f} | {versus[0]} | {versus[1]} | {seconds:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
