"""The fused LM head's log-prob and entropy against torch's, as logits grow.

A constant added to every logit changes neither the log-probs nor the entropy; computed on raw
logits (``lse - E[z]``) both lose precision in proportion to the constant. Reference: torch's
``log_softmax`` and ``Categorical.entropy`` on the same logits in the same precision (float32
statistics; bfloat16 logits upcast as HF does), both against float64 on those logits; ours must
stay within 2x of torch's error (flash-attn's rule for a same-precision reference).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dta.model.lm_head import fused_logprob_entropy

T, H, V = 96, 32, 1000


def head_inputs(offset: float, dtype: torch.dtype):
    """hidden [T, H+1] and weight [V, H+1] whose product is random logits + ``offset``: the extra
    input column is 1 and the extra weight column ``offset``. A third of the rows are scaled up so
    that their distributions are peaked (entropy near 0, where a negative value would show)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    hidden[: T // 3] *= 40
    weight = torch.randn(V, H, generator=g) * 0.3
    hidden = torch.cat([hidden, torch.ones(T, 1)], 1).to(dtype)
    weight = torch.cat([weight, torch.full((V, 1), float(offset))], 1).to(dtype)
    return hidden, weight, torch.randint(0, V, (T,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset", [0, 30, 300, 1000])
def test_logprob_and_entropy_within_2x_of_torch_at_any_offset(dtype, offset):
    hidden, weight, targets = head_inputs(offset, dtype)
    lp, ent = fused_logprob_entropy(hidden, weight, targets)
    z = (hidden @ weight.t()).float()  # the head's logits: model dtype, statistics in float32
    exact_lp = torch.log_softmax(z.double(), -1).gather(1, targets[:, None]).squeeze(1)
    exact_ent = torch.distributions.Categorical(logits=z.double()).entropy()
    torch_lp = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    torch_ent = torch.distributions.Categorical(logits=z).entropy()
    for ours, theirs, exact, what in [
        (lp, torch_lp, exact_lp, "logprob"),
        (ent, torch_ent, exact_ent, "entropy"),
    ]:
        err = (ours.double() - exact).abs().max().item()
        ref_err = (theirs.double() - exact).abs().max().item()
        assert err <= 2 * ref_err, f"{what}: error {err:.2e}, torch's {ref_err:.2e}"
    assert (ent >= 0).all(), ent.min()
    assert exact_ent.min() < 1e-6 and exact_ent.max() > 1  # both regimes are covered
