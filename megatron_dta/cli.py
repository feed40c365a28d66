"""`megatron-dta` (also `python -m megatron_dta`): train, logprobs, export, demo.

Run it directly for one process, or under `torchrun --nproc-per-node N` (one or many nodes) for
tensor and data parallelism. Mistakes in the config, the overrides, a rollout file or a checkpoint
(``errors.UserError``) end the command with one line on stderr and exit code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

CONFIG_HELP = """\
configuration: a YAML file of sections, each a mapping of keys; the defaults are the CPU demo.
Override any key after the options: section.key=value (e.g. optimizer.lr=1e-5 train.steps=100).
Data parallel = world size / (parallel.tp x parallel.cp x parallel.ep x parallel.pp). Every key, its
type, default and meaning:

"""


class _Parser(argparse.ArgumentParser):
    """Appends the config keys (generated from the config dataclasses) to an epilog of
    ``CONFIG_HELP`` only when help is printed: building it imports torch, which ``--help`` need not."""

    def format_help(self) -> str:
        if self.epilog == CONFIG_HELP:
            from megatron_dta.config import config_help

            self.epilog = CONFIG_HELP + config_help()
        return super().format_help()


FMT = argparse.RawDescriptionHelpFormatter


def _config_command(sub, name: str, help: str, description: str, config: str) -> argparse.ArgumentParser:
    """A subcommand that reads a config: ``--config FILE.yaml`` (``config`` says which parts it uses)
    and ``section.key=value`` overrides, the config keys listed in its help."""
    p = sub.add_parser(name, help=help, formatter_class=FMT, epilog=CONFIG_HELP, description=description)
    p.add_argument("--config", metavar="FILE.yaml", help=config)
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config values replacing the file's"
    )
    return p


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="megatron-dta", description=__doc__, formatter_class=FMT)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = _config_command(
        sub,
        "train",
        help="train for the configured steps",
        description="Train on a rollout file or a synthetic workload. Writes RUN_DIR/metrics.jsonl "
        "(one JSON object per step), RUN_DIR/config.yaml and checkpoints under "
        "RUN_DIR/checkpoints (RUN_DIR is checkpoint.run_dir).",
        config="YAML config (default: the built-in CPU demo config)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in checkpoint.run_dir (from scratch if none)",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="check the job as launched (world size, device memory) with `plan`, then exit: no weight loads",
    )

    lp = _config_command(
        sub,
        "logprobs",
        help="forward-only log-probs and entropy of a rollout file",
        description="No-grad DTA forward of the config's model over a rollout file; writes each "
        "rollout back with 'logprobs' and 'entropy' (one per token, entry 0 = 0.0), "
        "e.g. to fill old_logprobs or ref_logprobs.",
        config="YAML config: its model, train.dtype, parallel, engine and "
        "data.microbatch_tokens are used (default: the built-in demo config)",
    )
    lp.add_argument("--rollouts", required=True, metavar="IN.jsonl", help="rollout file to score")
    lp.add_argument("--out", required=True, metavar="OUT.jsonl", help="where to write the scored rollouts")

    ex = sub.add_parser(
        "export",
        help="a trained checkpoint as an HF checkpoint directory",
        formatter_class=FMT,
        description="Copy the model of a complete checkpoint of a run out as an HF checkpoint "
        "(config.json + model.safetensors) that transformers loads.",
    )
    ex.add_argument(
        "--run-dir", required=True, metavar="DIR", help="the run's directory (checkpoint.run_dir)"
    )
    ex.add_argument(
        "--step", type=int, metavar="N", help="the checkpoint of step N (default: the newest complete one)"
    )
    ex.add_argument("--hf-out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    ex.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        help="convert the weights (default: the training dtype)",
    )

    pl = _config_command(
        sub,
        "plan",
        help="memory per rank, step time and communication of a layout, without weights or GPUs",
        description="Build every rank position of the config's layout at --world-size on the meta device "
        "(fake process groups), balance and plan the first step's batch, run the pipeline schedule and "
        "price it on a hardware profile. Prints a table; exits 2 naming the rank and memory term when "
        "the layout does not fit (docs/scaling.md).",
        config="YAML config (default: the built-in CPU demo config)",
    )
    pl.add_argument("--world-size", type=int, required=True, metavar="N", help="number of GPUs (processes)")
    pl.add_argument(
        "--gpu", default="h100", metavar="h100|h200|cpu|PROFILE.json", help="hardware profile (default: h100)"
    )
    pl.add_argument("--json", metavar="OUT.json", help="write the full report here")
    pl.add_argument(
        "--allow-oom", action="store_true", help="report a layout that does not fit instead of exit 2"
    )

    d = sub.add_parser(
        "demo",
        help="train the tiny CPU demo, then time dta against dense",
        formatter_class=FMT,
        description="Train the built-in default config (tiny model, synthetic multi-turn workload, "
        "CPU), print the loss by step, then time one forward+backward of the same batch "
        "in dense and dta modes and print the speed-up.",
    )
    d.add_argument(
        "--run-dir",
        default="runs/demo",
        metavar="DIR",
        help="where the demo run goes (default: %(default)s; replaced)",
    )
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    from megatron_dta.cli_util import user_errors
    from megatron_dta.parallel import shutdown

    with user_errors():
        rc = _run(args)
    shutdown()  # on success only: it waits for every rank, which a failed rank must not do
    return rc


def _run(args) -> int:
    from megatron_dta import train as t
    from megatron_dta.config import Config

    if args.command == "train" and args.dry_run:
        from megatron_dta.planner.command import dry_run

        dry_run(Config.from_yaml(args.config, args.overrides))
    elif args.command == "train":
        t.train(Config.from_yaml(args.config, args.overrides), resume=args.resume)
    elif args.command == "plan":
        from megatron_dta.planner.command import run_plan

        cfg = Config.from_yaml(args.config, args.overrides)
        run_plan(cfg, args.world_size, args.gpu, args.json, args.allow_oom)
    elif args.command == "logprobs":
        n = t.compute_logprobs(Config.from_yaml(args.config, args.overrides), args.rollouts, args.out)
        if int(os.environ.get("RANK", "0")) == 0:  # the file is written once, by global rank 0
            print(f"wrote {args.out}: {n} rollouts with logprobs and entropy")
    elif args.command == "export":
        used = t.export(args.run_dir, args.hf_out, args.step, args.dtype)
        print(f"exported {used} to {args.hf_out}")
    else:
        t.demo(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
