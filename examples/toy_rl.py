"""A toy RL loop that learns on a CPU in a few minutes: GRPO on a two-turn counting task, trained
with DTA through the Python API (``megatron_dta.Trainer``), sampled with transformers on the
trainer's current weights.

Task (digits 0..4, arithmetic modulo 5). A fixed system prompt, then ``BOS d``: the policy answers
n digits (turn 1), right if they count on from d (d+1, d+2, ...). The environment marks each digit
OK or BAD, then asks again from a new start, ``SEP e``, and the policy answers n digits once more
(turn 2). The reward, the fraction of right digits over both turns, is checked exactly. Every
rollout starts with the same system prompt and a group's rollouts share their first turn's prompt,
so each iteration's batch is one prefix tree: what DTA computes once and dense recomputes per
rollout. As the policy learns, its answers agree more, and the tree shares more.

Loop, per iteration: copy the trainer's weights into a transformers model
(``Trainer.hf_state_dict``, the weight sync an inference engine would get), sample ``--group``
trajectories for each of ``--prompts`` prompts, score each digit, and give it the GRPO advantage
of its position within its group (right or wrong against the group's mean, over the group's std:
per-token advantages in the rollout file format). Then ``Trainer.logprobs`` (the behaviour policy)
and ``--ppo-steps`` ``Trainer.step`` calls on the batch. The same training work is timed in dense
mode on the same rollouts (``dense_equivalent_seconds``), so DTA's speed-up is measured on what it
trained on. Both are CPU seconds of this single-threaded process, which a busy machine does not
inflate the way it inflates wall time.

    python examples/toy_rl.py --iterations 20 --out runs/toy_rl
writes DIR/rewards.jsonl (one line per iteration: iteration, mean_reward, sharing_ratio,
train_seconds, dense_equivalent_seconds), DIR/rewards.png and the trainer's run directory DIR/run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

DIGITS = 5  # tokens 0..4
BOS, SEP, OK, BAD, FILL = 5, 6, 7, 8, 9
VOCAB = 10


def config(out: Path, iterations: int, lr: float, seed: int) -> dict:
    """The trainer's config: a 2-layer Llama-shaped model of ~0.1M parameters, float32, DTA."""
    return {
        "model": {
            "preset": "tiny-llama",
            "arch": {
                "vocab_size": VOCAB,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
            },
        },
        "parallel": {"device": "cpu"},
        "optimizer": {"lr": lr, "min_lr": lr / 4, "warmup_steps": 2, "grad_clip": 1.0},
        "engine": {"mode": "dta"},
        "train": {"steps": iterations, "seed": seed, "dtype": "float32"},
        "checkpoint": {"run_dir": str(out / "run")},
    }


class CountTask:
    """Count on modulo DIGITS: after ``BOS d`` the right answer is d+1, d+2, ..., d+n; after the
    feedback turn ``OK|BAD x n, SEP, e`` it is e+1, ..., e+n for a new start digit e."""

    def __init__(self, digits: int, system_len: int, seed: int):
        self.n = digits
        self.rng = np.random.default_rng(seed)
        self.system = [int(t) for t in self.rng.choice([BOS, FILL], system_len)]

    def starts(self, prompts: int, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Start digits of both turns, [prompts * group] each; a group shares its turn-1 start."""
        first = np.repeat(self.rng.integers(0, DIGITS, prompts), group)
        return first, self.rng.integers(0, DIGITS, prompts * group)

    def targets(self, start: np.ndarray) -> np.ndarray:
        return (start[:, None] + np.arange(1, self.n + 1)) % DIGITS  # [B, n]


@torch.no_grad()
def sample(hf, prefix_BT: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` tokens per row sampled at temperature 1 from the transformers model ([B, n])."""
    out, cache, ids = [], None, prefix_BT
    for _ in range(n):
        res = hf(input_ids=ids, past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        probs = torch.softmax(res.logits[:, -1].double(), dim=-1)
        ids = torch.multinomial(probs, 1, generator=gen)
        out.append(ids)
    return torch.cat(out, dim=1)


def rollouts_of(task: CountTask, hf, prompts: int, group: int, gen, iteration: int):
    """(rollout dicts in the rollout-file format, rewards) of ``group`` trajectories per prompt."""
    n = task.n
    start1, start2 = task.starts(prompts, group)
    t1, t2 = task.targets(start1), task.targets(start2)
    turn1 = torch.tensor([[*task.system, BOS, int(d)] for d in start1])
    a1 = sample(hf, turn1, n, gen)
    feedback = torch.from_numpy(np.where(a1.numpy() == t1, OK, BAD))
    turn2 = torch.cat([turn1, a1, feedback, torch.tensor([[SEP, int(e)] for e in start2])], 1)
    a2 = sample(hf, turn2, n, gen)
    correct = np.concatenate([a1.numpy() == t1, a2.numpy() == t2], axis=1).astype(np.float64)  # [B, 2n]
    rewards = correct.mean(1)
    # GRPO per digit: each answer token's correctness against its group's mean at that position
    by_group = correct.reshape(prompts, group, 2 * n)
    adv = (by_group - by_group.mean(1, keepdims=True)) / (by_group.std(1, keepdims=True) + 1e-6)
    adv = adv.reshape(prompts * group, 2 * n)
    out = []
    for b in range(len(start1)):
        ids = [*turn2[b].tolist(), *a2[b].tolist()]
        mask, advantages = [0] * len(ids), [0.0] * len(ids)
        for k, begin in enumerate((turn1.shape[1], turn2.shape[1])):  # the policy's tokens, both turns
            mask[begin : begin + n] = [1] * n
            advantages[begin : begin + n] = adv[b, k * n : (k + 1) * n].tolist()
        out.append(
            {
                "input_ids": ids,
                "loss_mask": mask,
                "advantages": advantages,
                "group": f"{iteration}-{b // group}",
            }
        )
    return out, rewards


def dense_seconds(trainer, rollouts, ppo_steps: int) -> float:
    """CPU time of the work an iteration's training does (old log-probs, then ``ppo_steps``
    forward+backward passes) with the dense engine, every rollout computed in full: one forward and
    one forward+backward measured, the passes being the same work. Gradients are discarded (the
    next step zeroes them first)."""
    from megatron_dta.engine import Engine

    dense = Engine(trainer.model, dataclasses.replace(trainer.cfg.engine, mode="dense"))
    start = time.process_time()
    dense.logprobs(rollouts)
    forward = time.process_time() - start
    dense.forward_backward(rollouts, trainer.loss_fn)
    trainer.model.zero_grad(set_to_none=True)
    return forward + ppo_steps * (time.process_time() - start - forward)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    it = [r["iteration"] for r in records]
    ax.plot(it, [r["mean_reward"] for r in records], marker="o", ms=3)
    ax.set_xlabel("iteration (sample, then PPO passes)")
    ax.set_ylabel("mean reward (fraction of digits right)")
    ax.set_ylim(0, 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.set_title("toy_rl: two-turn counting task, GRPO with DTA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("runs/toy_rl"))
    ap.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=8, help="GRPO group size (trajectories per prompt)")
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=32, help="system prompt tokens (shared by all)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ppo-steps", type=int, default=4, help="PPO passes (optimizer steps) per batch")
    args = ap.parse_args(argv)

    import transformers

    from megatron_dta import Trainer
    from megatron_dta.rollouts import parse_rollout

    wall = time.perf_counter()
    # One thread, and timings in CPU seconds of this process (time.process_time): on a shared,
    # oversubscribed machine wall time measures the neighbours; CPU time measures the work.
    torch.set_num_threads(1)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    trainer = Trainer(config(args.out, args.iterations * args.ppo_steps, args.lr, args.seed))
    hf = transformers.AutoModelForCausalLM.from_pretrained(trainer.export_hf(args.out / "hf_init")).eval()
    task = CountTask(args.digits, args.system_len, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    records = []
    with (args.out / "rewards.jsonl").open("w") as log:
        for it in range(args.iterations):
            hf.load_state_dict(trainer.hf_state_dict())  # weight sync: the policy that samples
            batch, rewards = rollouts_of(task, hf, args.prompts, args.group, gen, it)
            rollouts = [parse_rollout(r, VOCAB) for r in batch]  # or pass the dicts to the trainer
            start = time.process_time()
            # the sampling policy's log-probs, so that every pass after the first is a PPO update
            old = trainer.logprobs(rollouts)
            rollouts = [dataclasses.replace(r, old_logprobs=lp) for r, lp in zip(rollouts, old)]
            metrics = [trainer.step(rollouts) for _ in range(args.ppo_steps)]
            rec = {
                "iteration": it,
                "mean_reward": float(rewards.mean()),
                "sharing_ratio": metrics[0]["sharing_ratio"],
                "train_seconds": time.process_time() - start,
                "dense_equivalent_seconds": dense_seconds(trainer, rollouts, args.ppo_steps),
            }
            records.append(rec)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(
                f"iteration {it:3d}  reward {rec['mean_reward']:.3f}  sharing {rec['sharing_ratio']:5.2f}  "
                f"train {rec['train_seconds']:.2f}s  dense {rec['dense_equivalent_seconds']:.2f}s",
                flush=True,
            )
    trainer.save()  # DIR/run/checkpoints/step_N: Trainer.load() continues from here
    plot(records, args.out / "rewards.png")
    k = max(1, len(records) // 5)
    first = np.mean([r["mean_reward"] for r in records[:k]])
    last = np.mean([r["mean_reward"] for r in records[-k:]])
    speedup = sum(r["dense_equivalent_seconds"] for r in records) / sum(r["train_seconds"] for r in records)
    print(
        f"mean reward, first {k} iterations {first:.3f} -> last {k} {last:.3f}; DTA {speedup:.2f}x faster "
        f"than dense on these rollouts; wall time {time.perf_counter() - wall:.0f} s, CPU time "
        f"{time.process_time():.0f} s; {args.out / 'rewards.jsonl'}, {args.out / 'rewards.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
