"""Vocab-parallel LM head fused with log-probabilities and entropy.

The logits of a chunk of tokens are computed, reduced to (logprob of the target, entropy) and
dropped; backward recomputes them chunk by chunk. So memory is O(chunk x vocab/tp), never
[tokens, vocab]. Across tensor-parallel ranks the vocabulary is split in contiguous ranges (as
megatron's VocabParallelEmbedding splits it); the max, the sum of exponentials, the expectation of
the logits and the target logit are all-reduced. Logits are computed in the model dtype (as HF does) and the
softmax statistics in at least float32 (float64 stays float64, so the float64 path is exact to
round-off); the weight gradient accumulates over chunks in at least float32. On CPU, when all of a
call's logits take at most ``KEEP_LOGITS_BYTES`` they are kept for backward instead of recomputed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

KEEP_LOGITS_BYTES = 64 << 20


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, vocab_start, group, chunk):
        cdtype = torch.promote_types(hidden_TH.dtype, torch.float32)
        T, V = hidden_TH.shape[0], weight_VH.shape[0]
        lse_T = hidden_TH.new_empty(T, dtype=cdtype)
        mean_z_T = hidden_TH.new_empty(T, dtype=cdtype)
        target_z_T = hidden_TH.new_empty(T, dtype=cdtype)
        local_t = targets_T - vocab_start
        owned = (local_t >= 0) & (local_t < V)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
        keep = hidden_TH.device.type == "cpu" and T * V * torch.finfo(cdtype).bits // 8 <= KEEP_LOGITS_BYTES
        kept = []
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            z_cV = (hidden_TH[a:b] @ weight_VH.t()).to(cdtype)
            if keep:
                kept.append(z_cV)
            m_c = _all_reduce(z_cV.max(dim=-1).values, dist.ReduceOp.MAX, group)
            e_cV = torch.exp(z_cV - m_c[:, None])
            zt_c = z_cV.gather(1, local_t[a:b, None]).squeeze(1) * owned[a:b]
            sums_3c = _all_reduce(torch.stack([e_cV.sum(-1), (e_cV * z_cV).sum(-1), zt_c]), dist.ReduceOp.SUM, group)
            lse_T[a:b] = m_c + torch.log(sums_3c[0])
            mean_z_T[a:b] = sums_3c[1] / sums_3c[0]
            target_z_T[a:b] = sums_3c[2]
        ctx.save_for_backward(hidden_TH, weight_VH, local_t, owned, lse_T, mean_z_T)
        ctx.chunk, ctx.kept = chunk, kept
        ctx.set_materialize_grads(False)  # an unused output (often entropy) then costs nothing
        return target_z_T - lse_T, lse_T - mean_z_T

    @staticmethod
    def backward(ctx, dlogprob_T, dentropy_T):
        hidden_TH, weight_VH, local_t, owned, lse_T, mean_z_T = ctx.saved_tensors
        cdtype = lse_T.dtype
        grad_h = torch.empty_like(hidden_TH) if ctx.needs_input_grad[0] else None
        grad_w = None
        T = hidden_TH.shape[0]
        for i, a in enumerate(range(0, T, ctx.chunk)):
            b = min(T, a + ctx.chunk)
            z_cV = ctx.kept[i] if ctx.kept else (hidden_TH[a:b] @ weight_VH.t()).to(cdtype)
            p_cV = torch.exp(z_cV - lse_T[a:b, None])
            # d logprob / dz = onehot(target) - p ;  d entropy / dz = -p * (z - E_p[z])
            coef_c = torch.zeros_like(lse_T[a:b]) if dlogprob_T is None else dlogprob_T[a:b].to(cdtype)
            if dentropy_T is None:
                dz_cV = p_cV * -coef_c[:, None]
            else:
                dz_cV = p_cV * -(coef_c[:, None] + (z_cV - mean_z_T[a:b, None]) * dentropy_T[a:b, None].to(cdtype))
            if dlogprob_T is not None:
                dz_cV.scatter_add_(1, local_t[a:b, None], (coef_c * owned[a:b])[:, None])
            dz_cV = dz_cV.to(hidden_TH.dtype)
            if grad_h is not None:
                grad_h[a:b] = dz_cV @ weight_VH
            if ctx.needs_input_grad[1]:
                g = (dz_cV.t() @ hidden_TH[a:b]).to(cdtype)
                grad_w = g if grad_w is None else grad_w.add_(g)
        if grad_w is not None:
            grad_w = grad_w.to(weight_VH.dtype)
        return grad_h, grad_w, None, None, None, None


def fused_logprob_entropy(hidden_TH, weight_VH, targets_T, vocab_start: int = 0, group=None, chunk: int = 1024):
    """(logprob of each target, entropy) of softmax(hidden @ weight.T) over the full vocabulary.

    ``weight_VH`` is this rank's vocab shard [V_local, H] starting at ``vocab_start`` (padding rows
    beyond the real vocabulary must already be sliced off). The caller routes ``hidden_TH`` through
    megatron's ``copy_to_tensor_model_parallel_region`` so the partial input gradients are summed.
    """
    if targets_T.numel() == 0:
        empty = hidden_TH.new_zeros(0, dtype=torch.promote_types(hidden_TH.dtype, torch.float32))
        return empty + 0 * hidden_TH.sum() + 0 * weight_VH.sum(), empty
    return _FusedLogprobEntropy.apply(hidden_TH, weight_VH, targets_T, vocab_start, group, chunk)
