"""bfloat16 gradients accumulate over units as exactly as dense's (issue 13 defect 1).

Through tools/bench_bf16_grads.py's measurement, in process: a prompt shared by 48 completions,
a tiny model with bfloat16-valued weights, gradients of one forward+backward in bfloat16 with
float32 main grads (as training accumulates them) against float64 on the same weights. The same
batch runs as one unit (sparse: the packed forest) and as one unit per rollout or more (dense: 48,
dta with every completion its own unit: 49+), so the error of the sum over units is compared on
equal terms.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("bench_bf16_grads", ROOT / "tools/bench_bf16_grads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dta_bf16_gradient_no_worse_than_dense_and_flat_in_units(tool, single_process_world):
    torch.manual_seed(0)
    ms = tool.models(single_process_world, seed=0)
    rollouts = tool.group_of(48, seed=0)
    ref = tool.reference(ms, rollouts)
    err = {mode: tool.errors(ms, rollouts, ref, mode, "main") for mode in ("sparse", "dense", "dta")}
    assert err["sparse"]["units"] == 1 and err["dense"]["units"] == 48 and err["dta"]["units"] > 48
    one = err["sparse"]["grad_rel_err"]
    # ~5e-3: bfloat16's 2^-8 relative step, rounded once per matmul; a wrong gradient is O(1)
    assert 1e-3 < one < 2e-2
    # No growth with units: the sum of 48+ per-unit gradients (each rounded to bfloat16 once by its
    # own matmuls, summed in float32) is within 10% of one packed unit's (measured: 0.95x for
    # both); summed in a bfloat16 p.grad, as before main grads, it was 1.43x (dense), 1.26x (dta).
    for mode in ("dense", "dta"):
        assert err[mode]["grad_rel_err"] <= 1.1 * one, (mode, err)
    # No worse than dense: dta runs the shared prompt's backward once, where dense's 48 runs of it
    # round independently and partly average out, so 10% (measured 0.95-1.05x over 4-256 rollouts)
    assert err["dta"]["grad_rel_err"] <= 1.1 * err["dense"]["grad_rel_err"], err
    # the forward is the same computation in every mode: log-prob errors equal up to packing
    assert err["dta"]["logprob_max_err"] <= 1.1 * err["dense"]["logprob_max_err"], err
