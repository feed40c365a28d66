"""bfloat16 gradient and log-prob errors against float64, as the number of units grows.

    python tools/bench_bf16_grads.py [--rollouts 1,4,16,64,256,1000] [--json OUT.json]

For each N: one GRPO group (a prompt shared by N completions), a tiny model whose weights are
bfloat16 values, and one forward+backward of the default loss in float64 (the reference) and in
bfloat16 in three modes: sparse (the packed forest: one unit), dense (one unit per rollout) and dta
with every completion its own unit (N + 1 units). The bfloat16 gradients accumulate in float32 main
grads as training does (``main``), and, to show what they fix, in bfloat16 ``p.grad`` (``param``).
Errors: gradient ||g - g64|| / ||g64|| over all parameters; log-prob max |lp - lp64| over tokens.
Prints a table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.grads import MainGrads, grad_of
from megatron_dta.model.config import ModelConfig
from megatron_dta.model.transformer import Transformer
from megatron_dta.rollouts import Rollout, make_rollout
from megatron_dta.synthetic import make_workload

MODEL = ModelConfig(
    "qwen2", vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, qkv_bias=True
)
PROMPT_LEN, COMPLETION_LEN = 32, 8
# (mode, engine settings): pack_tokens=1 puts every completion in a unit of its own
MODES = {
    "sparse": EngineConfig(mode="sparse", attention="sdpa"),
    "dense": EngineConfig(mode="dense", attention="sdpa"),
    "dta": EngineConfig(mode="dta", block_size=PROMPT_LEN, pack_tokens=1, attention="sdpa"),
}


def models(layout, seed: int = 0) -> dict[torch.dtype, Transformer]:
    """The same weights (bfloat16 values) in a float64 and a bfloat16 model."""
    torch.manual_seed(seed)
    m64 = Transformer(MODEL, layout, dtype=torch.float64)
    with torch.no_grad():
        for p in m64.parameters():
            p.copy_(p.to(torch.bfloat16))
    m16 = Transformer(MODEL, layout, dtype=torch.bfloat16)
    with torch.no_grad():
        for p16, p64 in zip(m16.parameters(), m64.parameters(), strict=True):
            p16.copy_(p64)
    return {torch.float64: m64, torch.bfloat16: m16}


def group_of(n: int, seed: int = 0) -> list[Rollout]:
    """A prompt and ``n`` completions, each with a standard normal advantage (a group of one too)."""
    rng = np.random.default_rng(seed)
    kw = {"num_prompts": 1, "group_size": n, "prompt_len": PROMPT_LEN, "completion_len": COMPLETION_LEN}
    return [
        make_rollout(r.input_ids, r.loss_mask, rng.standard_normal())
        for r in make_workload("grpo", MODEL.vocab_size, seed, **kw)
    ]


def step(model: Transformer, rollouts, mode: str) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """(units, flat float64 log-probs, {name: float64 grad}) of one forward+backward."""
    res = Engine(model, MODES[mode]).forward_backward(rollouts)
    grads = {n: grad_of(p).double() for n, p in model.named_parameters()}
    return res.plan.units, torch.cat([torch.from_numpy(lp) for lp in res.logprobs]), grads


def reference(ms: dict, rollouts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """float64 log-probs and grads (sparse: every mode equals it to round-off, see test_exactness)."""
    m64 = ms[torch.float64]
    m64.zero_grad(set_to_none=True)
    return step(m64, rollouts, "sparse")[1:]


def errors(ms: dict, rollouts, ref, mode: str, accumulate: str) -> dict:
    """bfloat16 ``mode`` against the float64 ``ref``, gradients accumulated in ``main`` grads
    (float32, as training does) or in ``param`` (bfloat16 p.grad)."""
    lp64, g64 = ref
    m16 = ms[torch.bfloat16]
    m16.zero_grad(set_to_none=True)
    main = MainGrads(list(m16.parameters())) if accumulate == "main" else None
    try:
        units, lp, g = step(m16, rollouts, mode)
    finally:
        if main is not None:
            main.remove()
    num = sum((g[n] - g64[n]).pow(2).sum() for n in g64).sqrt()
    den = sum(g.pow(2).sum() for g in g64.values()).sqrt()
    return {
        "units": units,
        "grad_rel_err": (num / den).item(),
        "logprob_max_err": (lp - lp64).abs().max().item(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", default="1,4,16,64,256,1000", help="comma-separated group sizes N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    from megatron_dta.parallel import ParallelLayout, shutdown

    torch.set_num_threads(1)
    ms = models(ParallelLayout.create(device="cpu"), args.seed)
    rows = []
    print(f"{'N':>5} {'mode':>6} {'accum':>5} {'units':>6} {'grad rel err':>13} {'logprob err':>12}")
    for n in map(int, args.rollouts.split(",")):
        rollouts = group_of(n, args.seed)
        ref = reference(ms, rollouts)
        for mode in MODES:
            for accumulate in ("main", "param"):
                row = {"rollouts": n, "mode": mode, "accumulate": accumulate}
                row.update(errors(ms, rollouts, ref, mode, accumulate))
                rows.append(row)
                print(
                    f"{n:>5} {mode:>6} {accumulate:>5} {row['units']:>6} "
                    f"{row['grad_rel_err']:>13.3e} {row['logprob_max_err']:>12.3e}",
                    flush=True,
                )
                if args.json:  # after every row: a long sweep cut short keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"model": MODEL.to_dict(), "rows": rows}, f, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
