"""Vocab-parallel LM head fused with log-probabilities and entropy.

The logits of a chunk of tokens are computed, reduced to (logprob of the target, entropy) and
dropped; backward recomputes them chunk by chunk. So memory is O(chunk x vocab/tp), never
[tokens, vocab]. Across tensor-parallel ranks the vocabulary is split in contiguous ranges (as
megatron's VocabParallelEmbedding splits it); the max, the sum of exponentials, the expectation of
the logits and the target logit are all-reduced. Logits are upcast to at least float32 (float64
stays float64, so the float64 path is exact to round-off).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            z_cV = (hidden_TH[a:b] @ weight_VH.t()).to(cdtype)
            m_c = _all_reduce(z_cV.max(dim=-1).values, dist.ReduceOp.MAX, group)
            e_cV = torch.exp(z_cV - m_c[:, None])
            zt_c = z_cV.gather(1, local_t[a:b, None]).squeeze(1) * owned[a:b]
            sums_3c = _all_reduce(torch.stack([e_cV.sum(-1), (e_cV * z_cV).sum(-1), zt_c]), dist.ReduceOp.SUM, group)
            lse_T[a:b] = m_c + torch.log(sums_3c[0])
            mean_z_T[a:b] = sums_3c[1] / sums_3c[0]
            target_z_T[a:b] = sums_3c[2]
        ctx.save_for_backward(hidden_TH, weight_VH, local_t, owned, lse_T, mean_z_T)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)  # an unused output (often entropy) then costs nothing
        return target_z_T - lse_T, lse_T - mean_z_T

    @staticmethod
    def backward(ctx, dlogprob_T, dentropy_T):
        hidden_TH, weight_VH, local_t, owned, lse_T, mean_z_T = ctx.saved_tensors
        cdtype = lse_T.dtype
        grad_h = torch.zeros_like(hidden_TH) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight_VH) if ctx.needs_input_grad[1] else None
        T = hidden_TH.shape[0]
        for a in range(0, T, ctx.chunk):
            b = min(T, a + ctx.chunk)
            z_cV = (hidden_TH[a:b] @ weight_VH.t()).to(cdtype)
            p_cV = torch.exp(z_cV - lse_T[a:b, None])
            # d logprob / dz = onehot(target) - p ;  d entropy / dz = -p * (z - E_p[z])
            dz_cV = torch.zeros_like(z_cV)
            if dlogprob_T is not None:
                dlp_c = dlogprob_T[a:b].to(cdtype)
                dz_cV -= p_cV * dlp_c[:, None]
                dz_cV.scatter_add_(1, local_t[a:b, None], (dlp_c * owned[a:b])[:, None])
            if dentropy_T is not None:
                dz_cV -= p_cV * (z_cV - mean_z_T[a:b, None]) * dentropy_T[a:b, None].to(cdtype)
            dz_cV = dz_cV.to(hidden_TH.dtype)
            if grad_h is not None:
                grad_h[a:b] = dz_cV @ weight_VH
            if grad_w is not None:
                grad_w += dz_cV.t() @ hidden_TH[a:b]
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
