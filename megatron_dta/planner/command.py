"""`megatron-dta plan` and `megatron-dta train --dry-run`: the planner's report, printed and checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_dta.errors import UserError
from megatron_dta.planner import check_fits, format_table, load_profile, plan


def detected_profile() -> str:
    """The profile of the device this process would train on: h100/h200 by CUDA device name, else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for profile in ("h200", "h100"):
        if profile in name:
            return profile
    raise UserError(
        f"no hardware profile for '{torch.cuda.get_device_name()}': run megatron-dta plan --gpu PROFILE.json "
        "(tools/calibrate.py --profile-out writes one)"
    )


def run_plan(
    cfg, world_size: int, profile: str, json_out: str | None, allow_oom: bool, show: bool = True
) -> dict:
    """Plan ``cfg`` on ``world_size`` devices; print the table, write the JSON, refuse an overflow."""
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    report = plan(cfg, world_size, load_profile(profile))
    if not allow_oom:
        check_fits(report)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=1) + "\n")
    if show:
        print(format_table(report))
        if json_out is not None:
            print(f"wrote {json_out}")
    return report


def dry_run(cfg) -> None:
    """The plan of the job as launched (torchrun's WORLD_SIZE, this machine's device), before any
    weight is loaded; only global rank 0 prints."""
    run_plan(
        cfg,
        int(os.environ.get("WORLD_SIZE", "1")),
        detected_profile(),
        None,
        allow_oom=False,
        show=int(os.environ.get("RANK", "0")) == 0,
    )
