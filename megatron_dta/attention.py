"""Attention backends, and the one place that picks one.

Every execution mode describes a chunk of work the same way: keys are ``[prefix ; own]`` where the
``P`` prefix keys (ancestors' K/V in DTA) are visible to every query, and own key ``k`` is visible
to own query ``q`` iff ``k <= q`` and k's segment is an ancestor-or-self of q's segment
(``seg_in[k] <= seg_in[q] < seg_out[k]``, segments numbered in DFS pre-order). One segment and no
prefix is plain causal attention; a prefix makes it causal aligned to the bottom right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttnSpec:
    prefix_len: int
    own_len: int
    seg_in: torch.Tensor | None = None  # [T] int64; None: all own tokens in one segment (causal)
    seg_out: torch.Tensor | None = None  # [T] int64
    cache: dict = field(default_factory=dict, repr=False)  # per-backend prepared masks, built once per chunk

    def own_mask(self, device) -> torch.Tensor:
        """[T, T] bool visibility among own tokens."""
        idx = torch.arange(self.own_len, device=device)
        causal = idx[None, :] <= idx[:, None]
        if self.seg_in is None:
            return causal
        s_in, s_out = self.seg_in.to(device), self.seg_out.to(device)
        return causal & (s_in[None, :] <= s_in[:, None]) & (s_in[:, None] < s_out[None, :])

    def full_mask(self, device) -> torch.Tensor:
        """[T, P + T] bool visibility of all keys."""
        own = self.own_mask(device)
        if not self.prefix_len:
            return own
        return torch.cat([own.new_ones(self.own_len, self.prefix_len), own], dim=1)


def sdpa_attention(q_TND, k_SKD, v_SKD, spec: AttnSpec):
    """torch scaled_dot_product_attention: the exact reference on CPU and GPU."""
    q, k, v = (t.transpose(0, 1) for t in (q_TND, k_SKD, v_SKD))  # [heads, tokens, D]
    if spec.prefix_len == 0 and spec.seg_in is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = spec.cache.get("sdpa")
        if mask is None:
            mask = spec.cache["sdpa"] = spec.full_mask(q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1)


BACKENDS = {"sdpa": sdpa_attention}


def get_attention_backend(name: str = "auto", device: str = "cpu"):
    """The attention function for ``attention.backend``; ``auto`` picks the fastest exact one."""
    if name == "auto":
        name = "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attention.backend '{name}' is unknown; choose one of {['auto', *BACKENDS]}")
    return BACKENDS[name]
