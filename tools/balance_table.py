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

# workload -> overrides for R ranks: ~16 rollouts per rank, generator defaults otherwise.
SCALE = {
    "grpo": lambda r: {"num_prompts": 2 * r},  # 8 completions per prompt
    "multi_turn": lambda r: {"num_tasks": 2 * r},  # one tree: the system prompt opens every rollout
    "tree_search": lambda r: {"num_roots": 2 * r},
    "mixed": lambda r: {"num_small": max(96, 24 * r)},  # 3 huge trees among many small groups
    "long_paths": lambda r: {"num_paths": 4 * r},  # one tree, a 3K-token prompt
    "fanout": lambda r: {"num_completions": 16 * r},  # one tree, a 256-token prompt
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

    print(f"max_tokens_per_microbatch = {limit}; imbalance = max / mean predicted rank time; "
          "dup % = duplicated / unique tokens; LB = lower bound\n")
    print("| workload | ranks | rollouts | unique tokens | mb/rank | imbalance | LB | dup % | dup LB % "
          "| round-robin imb. (dup %) | token greedy imb. (dup %) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.workloads:
        for ranks in args.ranks:
            rollouts = make_workload(name, 32000, args.seed, **SCALE[name](ranks))
            forest = PrefixForest([r.input_ids for r in rollouts])
            start = time.perf_counter()
            plan = balance(forest, ranks, limit, model)
            seconds = time.perf_counter() - start
            rr = round_robin(forest, ranks, limit, model)
            greedy = token_count_greedy(forest, ranks, limit, model)

            def pct(p):
                return 100 * p.duplicated_tokens / p.unique_tokens

            print(f"| {name} | {ranks} | {len(rollouts):,} | {plan.unique_tokens:,} | {plan.num_microbatches} "
                  f"| **{plan.imbalance:.3f}** | {plan.lower_bound:.3f} | **{pct(plan):.2f}** "
                  f"| {100 * plan.duplication_lower_bound / plan.unique_tokens:.2f} "
                  f"| {rr.imbalance:.3f} ({pct(rr):.1f}) | {greedy.imbalance:.3f} ({pct(greedy):.1f}) "
                  f"| {seconds:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
