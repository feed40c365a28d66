"""Every loss option equals a dense reference written out here, per rollout and per position.

The reference runs the model on one rollout at a time (plain causal attention, no engine), takes
log-probabilities and entropies from an explicit log-softmax, and adds up the loss term of each
(rollout, position) in a Python loop with the formulas written out below, all in float64. The
engine runs the same batch as a prefix tree (dta, sparse) split into several microbatches with the
global normalizer, as the trainer does over data-parallel ranks. Tolerance: loss 1e-10 absolute
and gradients 1e-9 relative: both sides are float64 and differ only in summation order (~1e-15
per operation); any real difference (a wrong weight, a missed term) is of order 1e-3 or larger.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_dta.attention import AttnSpec, sdpa_attention
from megatron_dta.engine import Engine, EngineConfig
from megatron_dta.losses import LossConfig, PolicyLoss
from megatron_dta.model.config import ModelConfig
from megatron_dta.model.transformer import Transformer
from megatron_dta.rollouts import make_rollout

VOCAB = 128


class _Causal:
    """Plain causal attention of one whole sequence (the reference's KV context)."""

    def attend(self, layer, q_TND, k_TKD, v_TKD):
        return sdpa_attention(q_TND, k_TKD, v_TKD, AttnSpec(0, q_TND.shape[0]))


@pytest.fixture(scope="module")
def model(single_process_world):
    torch.manual_seed(0)
    cfg = ModelConfig("qwen3", VOCAB, 64, 96, 2, 4, 2, qk_norm=True)
    return Transformer(cfg, single_process_world, torch.float64)


def dense_logprobs_entropy(model, ids: np.ndarray):
    """[L] log p(token j | tokens < j) (entry 0 = 0) and [L] entropy of that distribution."""
    ids_T = torch.as_tensor(ids)
    hidden_TH = model(ids_T, torch.arange(len(ids)), _Causal())
    logp_TV = torch.log_softmax(hidden_TH[:-1] @ model.output_weight().T, dim=-1)
    lp = logp_TV.gather(1, ids_T[1:, None]).squeeze(1)
    ent = -(logp_TV.exp() * logp_TV).sum(-1)
    zero = lp.new_zeros(1)
    return torch.cat([zero, lp]), torch.cat([zero, ent])


def reference_step(model, rollouts, cfg: LossConfig):
    """(loss, {param name: grad}) of the loss written out term by term."""
    model.zero_grad(set_to_none=True)
    advantages = [r.advantages.copy() for r in rollouts]
    if cfg.group_normalize_advantages:
        for i, r in enumerate(rollouts):
            peers = [
                float(q.advantages[0])
                for k, q in enumerate(rollouts)
                if (q.group is not None and q.group == r.group) or k == i
            ]
            mean = sum(peers) / len(peers)
            std = math.sqrt(sum((x - mean) ** 2 for x in peers) / len(peers))
            advantages[i] = (r.advantages - mean) / (std + cfg.group_std_eps)
    loss_tokens = sum(int(r.loss_mask.sum()) for r in rollouts)
    sequences_with_loss = sum(1 for r in rollouts if r.loss_mask.sum() > 0)
    loss = torch.zeros((), dtype=torch.float64)
    for r, adv in zip(rollouts, advantages):
        lp, ent = dense_logprobs_entropy(model, r.input_ids)
        for j in range(1, len(r)):
            if not r.loss_mask[j]:
                continue
            a = float(adv[j])
            old = lp[j].detach() if r.old_logprobs is None else float(r.old_logprobs[j])
            ratio = torch.exp(lp[j] - old)
            surrogate = torch.minimum(
                ratio * a, torch.clamp(ratio, 1 - cfg.eps_clip_low, 1 + cfg.eps_clip_high) * a
            )
            term = -surrogate
            if cfg.dual_clip is not None and a < 0:
                term = torch.minimum(term, torch.tensor(-cfg.dual_clip * a, dtype=torch.float64))
            if cfg.kl_coef:
                log_ref_over_pi = float(r.ref_logprobs[j]) - lp[j]
                if cfg.kl_estimator == "k1":
                    kl = -log_ref_over_pi
                else:
                    kl = torch.exp(log_ref_over_pi) - log_ref_over_pi - 1
                term = term + cfg.kl_coef * kl
            term = term - cfg.entropy_coef * ent[j]
            if cfg.normalization == "token_mean":
                weight = 1.0 / loss_tokens
            elif cfg.normalization == "sequence_mean":
                weight = 1.0 / int(r.loss_mask.sum()) / sequences_with_loss
            else:
                weight = 1.0 / cfg.constant_divisor
            loss = loss + weight * term
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def engine_step(model, rollouts, cfg: LossConfig, mode: str, splits: int):
    """The trainer's recipe: prepare the global batch, global denominator, microbatches."""
    model.zero_grad(set_to_none=True)
    loss_fn = PolicyLoss(cfg)
    batch = loss_fn.prepare(rollouts)
    parts = [batch[k::splits] for k in range(splits)]  # interleaved: trees and groups are split
    denominator = sum(loss_fn.local_denominator(p) for p in parts)
    engine = Engine(model, EngineConfig(mode=mode, block_size=5))
    total = torch.zeros((), dtype=torch.float64)
    stats: dict = {}
    for part in parts:
        res = engine.forward_backward(part, loss_fn, denominator)
        total += res.loss
        for k, v in res.stats.items():
            stats[k] = stats.get(k, 0.0) + v
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return total, grads, stats


def make_batch(model, seed=0, old_noise=0.6):
    """A prefix-sharing batch: 3 groups under 2 prompts, partial masks, one all-zero mask, one
    rollout a prefix of another, off-policy old log-probs (ratios well outside the clip range) and
    reference log-probs; advantages of both signs."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, 6), rng.integers(0, VOCAB, 4)]
    seqs, groups = [], []
    for g in range(3):
        prompt = prompts[g % 2]
        branch = rng.integers(0, VOCAB, 3)
        for _ in range(3):
            seqs.append(np.concatenate([prompt, branch, rng.integers(0, VOCAB, rng.integers(1, 6))]))
            groups.append(g)
    seqs.append(seqs[0][:8])
    groups.append(0)
    rollouts = []
    for i, (s, g) in enumerate(zip(seqs, groups)):
        mask = (np.arange(len(s)) >= 4).astype(int) if i != 4 else np.zeros(len(s), dtype=int)
        with torch.no_grad():
            lp, _ = dense_logprobs_entropy(model, s)
        near = rng.random(len(s)) < 0.5  # half the tokens (nearly) on-policy, half far off
        old = lp.numpy() + rng.normal(0, old_noise, len(s)) * np.where(near, 0.01, 1.0)
        ref = lp.numpy() + rng.normal(0, old_noise, len(s))
        rollouts.append(
            make_rollout(s, mask, float(rng.normal()), old_logprobs=old, ref_logprobs=ref, group=g)
        )
    return rollouts


OPTIONS = {
    "ppo_symmetric": LossConfig(),
    "ppo_asymmetric": LossConfig(eps_clip_low=0.1, eps_clip_high=0.28),
    "dual_clip": LossConfig(eps_clip_low=0.05, eps_clip_high=0.05, dual_clip=1.5),
    "grpo_groups": LossConfig(group_normalize_advantages=True),
    "kl_k1": LossConfig(kl_coef=0.3, kl_estimator="k1"),
    "kl_k3": LossConfig(kl_coef=0.3, kl_estimator="k3"),
    "entropy_bonus": LossConfig(entropy_coef=0.05),
    "sequence_mean": LossConfig(normalization="sequence_mean"),
    "constant": LossConfig(normalization="constant", constant_divisor=37.0),
    "everything": LossConfig(
        eps_clip_low=0.1,
        eps_clip_high=0.3,
        dual_clip=2.0,
        kl_coef=0.1,
        entropy_coef=0.01,
        normalization="sequence_mean",
        group_normalize_advantages=True,
    ),
}


def assert_close(got_loss, got_grads, ref_loss, ref_grads):
    assert abs(got_loss.item() - ref_loss.item()) <= 1e-10 * max(1.0, abs(ref_loss.item()))
    for name, g in ref_grads.items():
        err = (got_grads[name] - g).norm().item()
        assert err <= 1e-9 * g.norm().item() + 1e-14, (
            f"{name}: relative grad error {err / g.norm().item():.2e}"
        )


@pytest.mark.parametrize("name", OPTIONS)
def test_loss_option_equals_dense_reference(model, name):
    cfg = OPTIONS[name]
    rollouts = make_batch(model)
    ref_loss, ref_grads = reference_step(model, rollouts, cfg)
    assert ref_loss.abs().item() > 1e-4  # the batch exercises the option (not a vacuous 0 = 0)
    for mode, splits in (("dta", 3), ("sparse", 2), ("dense", 1)):
        loss, grads, _ = engine_step(model, rollouts, cfg, mode, splits)
        assert_close(loss, grads, ref_loss, ref_grads)


def test_clipping_and_dual_clip_are_active(model):
    """The batch really reaches the clip and dual-clip branches (else the tests above prove less)."""
    rollouts = make_batch(model)
    _, _, stats = engine_step(model, rollouts, LossConfig(eps_clip_low=0.05, eps_clip_high=0.05), "dta", 1)
    assert 0 < stats["clipped"] < stats["tokens"]
    plain = reference_step(model, rollouts, LossConfig(eps_clip_low=0.05, eps_clip_high=0.05))[0]
    dual = reference_step(model, rollouts, OPTIONS["dual_clip"])[0]
    assert abs(plain.item() - dual.item()) > 1e-4


def test_on_policy_rollouts_without_old_logprobs(model):
    """Missing old log-probs mean on-policy (ratio 1): the loss is the plain policy gradient."""
    rollouts = [
        make_rollout(r.input_ids, r.loss_mask, r.advantages, group=r.group) for r in make_batch(model)
    ]
    cfg = LossConfig()
    ref_loss, ref_grads = reference_step(model, rollouts, cfg)
    loss, grads, stats = engine_step(model, rollouts, cfg, "dta", 2)
    assert_close(loss, grads, ref_loss, ref_grads)
    assert stats["clipped"] == 0 and stats["approx_kl"] == 0


def test_placeholders_off_the_mask_are_ignored(model):
    """Inference engines write 0.0 (or garbage) old/ref log-probs on prompt tokens: off the mask
    they must not turn the loss or its gradient into NaN (0 * inf)."""
    rollouts = make_batch(model)
    for r in rollouts:
        off = r.loss_mask == 0
        r.old_logprobs[off] = -1e4  # exp(lp - old) overflows
        r.ref_logprobs[off] = 1e4  # exp(ref - lp) overflows in k3
    cfg = LossConfig(kl_coef=0.2, kl_estimator="k3")
    ref_loss, ref_grads = reference_step(model, rollouts, cfg)
    loss, grads, _ = engine_step(model, rollouts, cfg, "dta", 2)
    assert math.isfinite(loss.item())
    assert_close(loss, grads, ref_loss, ref_grads)


def test_statistics_are_sums_over_loss_tokens(model):
    rollouts = make_batch(model)
    _, _, stats = engine_step(model, rollouts, LossConfig(), "dta", 3)
    assert stats["tokens"] == sum(int(r.loss_mask.sum()) for r in rollouts)
    expected_entropy = 0.0
    expected_kl = 0.0
    with torch.no_grad():
        for r in rollouts:
            lp, ent = dense_logprobs_entropy(model, r.input_ids)
            m = torch.as_tensor(r.loss_mask, dtype=torch.float64)
            expected_entropy += (m * ent).sum().item()
            expected_kl += (m * 0.5 * (lp - torch.as_tensor(r.old_logprobs)) ** 2).sum().item()
    assert abs(stats["entropy"] - expected_entropy) < 1e-9 * expected_entropy
    assert abs(stats["approx_kl"] - expected_kl) < 1e-9 * expected_kl


def test_user_errors_say_what_to_change(model):
    rollouts = make_batch(model)
    no_ref = [make_rollout(r.input_ids, r.loss_mask, r.advantages) for r in rollouts]
    with pytest.raises(ValueError, match="ref_logprobs.*loss.kl_coef=0"):
        engine_step(model, no_ref, LossConfig(kl_coef=0.1), "dta", 1)
    per_token = [
        make_rollout(r.input_ids, r.loss_mask, np.linspace(-1, 1, len(r)), group=0) for r in rollouts
    ]
    with pytest.raises(ValueError, match="per-token advantages"):
        PolicyLoss(LossConfig(group_normalize_advantages=True)).prepare(per_token)
    for bad, match in [
        ({"normalization": "mean"}, "token_mean"),
        ({"kl_estimator": "k2"}, "k1"),
        ({"dual_clip": 0.5}, "dual_clip"),
        ({"eps_clip_low": -0.1}, "eps_clip"),
    ]:
        with pytest.raises(ValueError, match=match):
            LossConfig(**bad)
