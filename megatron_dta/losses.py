"""RL policy losses over per-rollout, per-token values. They know nothing of trees.

A loss is a sum over (rollout r, position j >= 1) of ``weight[r, j] * term(lp[r, j], ...)``. The
weights carry the loss mask and the normalization (token mean over the global batch by default),
so they are fixed before any compute; each term depends only on its own position's log-prob and
entropy. That is what lets any execution order (dense, packed, DFS; any rank) produce exactly the
dense loss and gradients: a token shared by k rollouts contributes k terms, each with its own
rollout's advantage, old log-prob, mask and weight.

Per-token values live in flat tables (rollouts concatenated, ``seq_offset[r] + j``); engines
gather the elements they compute and call ``terms``. Anything computed across rollouts (GRPO group
statistics, the normalizer) must see the whole global batch, so it happens before the batch is
split over ranks and microbatches: ``prepare`` on the global batch, and ``local_denominator``
all-reduced over data-parallel ranks by the caller.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_dta.errors import ConfigError, UserError
from megatron_dta.rollouts import Rollout

NORMALIZATIONS = ("token_mean", "sequence_mean", "constant")
KL_ESTIMATORS = ("k1", "k3")


@dataclass
class LossConfig:
    eps_clip_low: float = field(
        default=0.2, metadata={"help": "PPO clip range below: the ratio is clipped at 1 - eps_clip_low"}
    )
    eps_clip_high: float = field(
        default=0.2, metadata={"help": "PPO clip range above: the ratio is clipped at 1 + eps_clip_high"}
    )
    dual_clip: float | None = field(
        default=None, metadata={"help": "c > 1: bound the loss of negative advantages by c * |A|; null: off"}
    )
    kl_coef: float = field(
        default=0.0,
        metadata={"help": "weight of the KL penalty to ref_logprobs (every rollout needs them); 0: off"},
    )
    kl_estimator: str = field(
        default="k3",
        metadata={
            "help": f"KL estimator per token: one of {', '.join(KL_ESTIMATORS)} "
            "(k1: log ratio; k3: exp(d) - d - 1)"
        },
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus"})
    normalization: str = field(
        default="token_mean",
        metadata={
            "help": (
                "token_mean: over the global batch's loss tokens; sequence_mean: each rollout's token mean,"
                " averaged over rollouts; constant: sum / constant_divisor"
            )
        },
    )
    constant_divisor: float = field(default=1.0, metadata={"help": "the divisor of normalization=constant"})
    group_normalize_advantages: bool = field(
        default=False,
        metadata={
            "help": (
                "GRPO: each rollout's scalar advantage becomes (A - group mean) / (group std + "
                "group_std_eps), population std over the rollouts of its group in the global batch"
            )
        },
    )
    group_std_eps: float = field(
        default=1e-6, metadata={"help": "added to the group std of group_normalize_advantages"}
    )

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"loss.normalization '{self.normalization}' must be one of {NORMALIZATIONS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"loss.kl_estimator '{self.kl_estimator}' must be one of {KL_ESTIMATORS}")
        if self.eps_clip_low < 0 or self.eps_clip_high < 0:
            raise ConfigError("loss.eps_clip_low and loss.eps_clip_high must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"loss.dual_clip must be > 1 (or null to disable), got {self.dual_clip}")
        if self.normalization == "constant" and self.constant_divisor <= 0:
            raise ConfigError("loss.constant_divisor must be > 0")


def group_normalized_advantages(rollouts: list[Rollout], eps: float) -> list[np.ndarray]:
    """GRPO: each rollout's scalar advantage minus its group's mean, over the group's std.

    A rollout without a ``group`` is a group of one (advantage 0: nothing to compare with).
    """
    groups: dict = {}
    for i, r in enumerate(rollouts):
        if np.any(r.advantages != r.advantages[0]):
            raise UserError(
                f"loss.group_normalize_advantages needs one scalar advantage (the reward) per rollout, but "
                f"rollout {i} has per-token advantages; normalize them upstream or set "
                f"loss.group_normalize_advantages=false"
            )
        groups.setdefault(("group", r.group) if r.group is not None else ("single", i), []).append(i)
    out = [r.advantages.copy() for r in rollouts]
    for members in groups.values():
        vals = np.array([rollouts[i].advantages[0] for i in members])
        mean, std = vals.mean(), vals.std()
        for i in members:
            out[i] = (rollouts[i].advantages - mean) / (std + eps)
    return out


class PolicyLoss:
    """PPO clipped objective (separate low/high eps, optional dual clip), KL penalty, entropy bonus."""

    def __init__(self, cfg: LossConfig | None = None):
        self.cfg = cfg or LossConfig()

    @property
    def needs_entropy(self) -> bool:
        """Always: the fused LM head computes entropy in its forward anyway, and it is a reported
        statistic; it enters the graph (and costs backward work) only when ``entropy_coef`` != 0."""
        return True

    def prepare(self, rollouts: list[Rollout]) -> list[Rollout]:
        """The global batch with GRPO group-normalized advantages if configured (call it before the
        batch is split over ranks or microbatches: group statistics need every member)."""
        if not self.cfg.group_normalize_advantages:
            return rollouts
        advs = group_normalized_advantages(rollouts, self.cfg.group_std_eps)
        return [dataclasses.replace(r, advantages=a) for r, a in zip(rollouts, advs)]

    def local_denominator(self, rollouts: list[Rollout]) -> float:
        """This rank's share of the normalizer: loss tokens (token_mean) or rollouts with at least one
        loss token (sequence_mean). The caller sums it over data-parallel ranks."""
        if self.cfg.normalization == "token_mean":
            return float(sum(int(r.loss_mask.sum()) for r in rollouts))
        if self.cfg.normalization == "sequence_mean":
            return float(sum(1 for r in rollouts if r.loss_mask.any()))
        return 0.0

    def token_table(
        self, rollouts: list[Rollout], denominator: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Flat float64 per-token tables: adv, old (NaN = on-policy), ref, weight, mask."""
        cfg = self.cfg
        if denominator is None:
            denominator = self.local_denominator(rollouts)
        if cfg.kl_coef:
            missing = [i for i, r in enumerate(rollouts) if r.ref_logprobs is None]
            if missing:
                raise UserError(
                    f"loss.kl_coef={cfg.kl_coef} needs 'ref_logprobs' in every rollout, but rollout "
                    f"{missing[0]} has none: compute them with `megatron-dta logprobs` using the "
                    f"reference model, or set loss.kl_coef=0"
                )
        weights = []
        for r in rollouts:
            mask = r.loss_mask.astype(np.float64)
            if cfg.normalization == "token_mean":
                weights.append(mask / max(denominator, 1.0))
            elif cfg.normalization == "sequence_mean":
                weights.append(mask / max(mask.sum(), 1.0) / max(denominator, 1.0))
            else:
                weights.append(mask / cfg.constant_divisor)

        def flat(arrays):
            return torch.from_numpy(np.concatenate(arrays).astype(np.float64))

        nan = [np.full(len(r), np.nan) for r in rollouts]
        return {
            "adv": flat([r.advantages for r in rollouts]),
            "old": flat([r.old_logprobs if r.old_logprobs is not None else n for r, n in zip(rollouts, nan)]),
            "ref": flat([r.ref_logprobs if r.ref_logprobs is not None else n for r, n in zip(rollouts, nan)]),
            "weight": flat(weights),
            "mask": flat([r.loss_mask for r in rollouts]),
        }

    def terms(self, lp: torch.Tensor, entropy: torch.Tensor | None, g: dict[str, torch.Tensor]):
        """(weighted loss sum, statistics sums) of gathered elements; ``g`` holds the gathered tables."""
        cfg = self.cfg
        dt = lp.dtype
        adv, weight, mask = g["adv"].to(dt), g["weight"].to(dt), g["mask"].to(dt)
        # Off the loss mask the weight is 0, but 0 * inf is NaN in the loss and its gradient: inference
        # engines often put placeholders there (0.0 for prompt tokens), so read the policy instead.
        on = mask > 0
        old = torch.where(on & ~torch.isnan(g["old"]), g["old"].to(dt), lp.detach())
        log_ratio = lp - old
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - cfg.eps_clip_low, 1 + cfg.eps_clip_high)
        pg = -torch.minimum(ratio * adv, clipped * adv)
        if cfg.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
        term = pg
        if cfg.kl_coef:
            d = torch.where(on, g["ref"].to(dt), lp.detach()) - lp
            kl = -d if cfg.kl_estimator == "k1" else torch.exp(d) - d - 1
            term = term + cfg.kl_coef * kl
        if cfg.entropy_coef:
            term = term - cfg.entropy_coef * entropy
        loss = (weight * term).sum()
        with torch.no_grad():
            stats = {
                "tokens": mask.sum(),
                "clipped": (mask * ((ratio - clipped).abs() > 0).to(dt)).sum(),
                "approx_kl": (mask * 0.5 * log_ratio.pow(2)).sum(),
            }
            if entropy is not None:
                stats["entropy"] = (mask * entropy.detach()).sum()
        return loss, stats
