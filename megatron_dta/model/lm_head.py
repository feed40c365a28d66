"""Vocab-parallel LM head fused with log-probabilities and entropy.

The logits of a chunk of tokens are computed, reduced to (logprob of the target, entropy) and
dropped; backward recomputes them chunk by chunk. So memory is O(chunk x vocab/tp), never
[tokens, vocab]. Across tensor-parallel ranks the vocabulary is split in contiguous ranges (as
megatron's VocabParallelEmbedding splits it); the max, the sum of exponentials, the expectation of
the logits and the target logit are all-reduced. Logits are computed in the model dtype (as HF does) and the
softmax statistics in at least float32 (float64 stays float64, so the float64 path is exact to
round-off); the weight gradient accumulates over chunks in at least float32. The statistics are
taken on logits shifted by their row max (``z - m``, in place): entropy ``log s - E[z - m]`` with
``s = sum exp(z - m) >= 1`` is then a sum of two non-negative terms, never negative and without
the cancellation of ``lse - E[z]`` when logits are large (a constant offset of 300 cost float32
entropy 5.8e-4 that way; torch's entropy loses 3.3e-6). On CPU, when all of a
call's logits take at most ``KEEP_LOGITS_BYTES`` they are kept for backward instead of recomputed,
and so are their exponentials when both together fit.

On CPU a fresh [chunk, vocab] tensor costs more (page faults) than an elementwise pass over it, so
each pass writes into the chunk's logits or exponentials in place, and backward writes the logits'
gradient over the logits it consumes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dta.parallel import all_reduce_over

KEEP_LOGITS_BYTES = 64 << 20


def _logits(hidden_cH: torch.Tensor, weight_VH: torch.Tensor, out_cV: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` in the model dtype, written into ``out_cV`` (at least float32)."""
    if out_cV.dtype == hidden_cH.dtype:
        return torch.matmul(hidden_cH, weight_VH.t(), out=out_cV)
    return out_cV.copy_(hidden_cH @ weight_VH.t())


def _shift_exp(z_cV: torch.Tensor, m_c: torch.Tensor, out_cV: torch.Tensor) -> torch.Tensor:
    """Shift the logits by their row max in place (``z -= m``); exp of the result into ``out_cV``."""
    return torch.exp(z_cV.sub_(m_c[:, None]), out=out_cV)


def kept_logits(T: int, V: int, cdtype: torch.dtype, device_type: str) -> tuple[bool, bool]:
    """(logits kept, exponentials kept) for backward by a call over ``T`` rows of ``V`` columns;
    ``engine.memory`` counts them in a unit's memory with this same rule."""
    logits_bytes = T * V * torch.finfo(cdtype).bits // 8
    keep_z = device_type == "cpu" and logits_bytes <= KEEP_LOGITS_BYTES
    return keep_z, keep_z and 2 * logits_bytes <= KEEP_LOGITS_BYTES


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, vocab_start, group, chunk):
        cdtype = torch.promote_types(hidden_TH.dtype, torch.float32)
        T, V = hidden_TH.shape[0], weight_VH.shape[0]
        c = min(T, chunk)
        log_s_T = hidden_TH.new_empty(T, dtype=cdtype)
        mean_zs_T = hidden_TH.new_empty(T, dtype=cdtype)  # E_p[z - m] <= 0
        target_zs_T = hidden_TH.new_empty(T, dtype=cdtype)
        m_T = hidden_TH.new_empty(T, dtype=cdtype)
        r_T = hidden_TH.new_empty(T, dtype=cdtype)
        local_t = targets_T - vocab_start
        owned = (local_t >= 0) & (local_t < V)
        local_t = torch.where(owned, local_t, torch.zeros_like(local_t))
        keep_z, keep_e = kept_logits(T, V, cdtype, hidden_TH.device.type)
        z_buf = None if keep_z else hidden_TH.new_empty(c, V, dtype=cdtype)
        e_buf = None if keep_e else hidden_TH.new_empty(c, V, dtype=cdtype)
        kept_z, kept_e = [], []
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            z_out = hidden_TH.new_empty(b - a, V, dtype=cdtype) if keep_z else z_buf[: b - a]
            z_cV = _logits(hidden_TH[a:b], weight_VH, z_out)
            m_T[a:b] = all_reduce_over(z_cV.amax(dim=-1), group, op=dist.ReduceOp.MAX)
            # z_cV holds z - m from here on (kept that way for backward)
            e_cV = _shift_exp(z_cV, m_T[a:b], torch.empty_like(z_cV) if keep_e else e_buf[: b - a])
            zt_c = z_cV.gather(1, local_t[a:b, None]).squeeze(1) * owned[a:b]
            s_c = e_cV.sum(-1)
            if keep_e:
                kept_e.append(e_cV)
                ez_c = torch.einsum("cv,cv->c", e_cV, z_cV)  # no [c, V] temporary
            else:
                ez_c = e_cV.mul_(z_cV).sum(-1)  # e is not needed again: the product overwrites it
            if keep_z:
                kept_z.append(z_cV)
            sums_3c = all_reduce_over(torch.stack([s_c, ez_c, zt_c]), group)
            log_s_T[a:b] = torch.log(sums_3c[0])
            mean_zs_T[a:b] = sums_3c[1] / sums_3c[0]
            target_zs_T[a:b] = sums_3c[2]
            r_T[a:b] = 1 / sums_3c[0]  # softmax = exp(z - m) * r: kept exponentials need no second exp
        ctx.save_for_backward(hidden_TH, weight_VH, local_t, owned, m_T, r_T, mean_zs_T)
        ctx.chunk, ctx.kept_z, ctx.kept_e = chunk, kept_z, kept_e
        ctx.set_materialize_grads(False)  # an unused output (often entropy) then costs nothing
        return target_zs_T - log_s_T, log_s_T - mean_zs_T

    @staticmethod
    def backward(ctx, dlogprob_T, dentropy_T):
        hidden_TH, weight_VH, local_t, owned, m_T, r_T, mean_zs_T = ctx.saved_tensors
        # Backward overwrites what it was given; a second backward (retain_graph) recomputes it.
        kept_z, kept_e = ctx.kept_z, ctx.kept_e
        ctx.kept_z = ctx.kept_e = []
        cdtype = r_T.dtype
        T, V = hidden_TH.shape[0], weight_VH.shape[0]
        c = min(T, ctx.chunk)
        z_buf = None if kept_z else hidden_TH.new_empty(c, V, dtype=cdtype)
        e_buf = None if kept_e else hidden_TH.new_empty(c, V, dtype=cdtype)
        grad_h = torch.empty_like(hidden_TH) if ctx.needs_input_grad[0] else None
        grad_w = None
        for i, a in enumerate(range(0, T, ctx.chunk)):
            b = min(T, a + ctx.chunk)
            if kept_z:
                z_cV = kept_z[i]  # already shifted
                e_cV = kept_e[i] if kept_e else torch.exp(z_cV, out=e_buf[: b - a])
            else:
                z_cV = _logits(hidden_TH[a:b], weight_VH, z_buf[: b - a])
                e_cV = _shift_exp(z_cV, m_T[a:b], e_buf[: b - a])
            # z_cV is z - m.  d logprob / dz = onehot(target) - p ;  d entropy / dz = -p * (z - E_p[z])
            # = -p * ((z - m) - E_p[z - m]) ;  p = e * r
            coef_c = torch.zeros_like(r_T[a:b]) if dlogprob_T is None else dlogprob_T[a:b].to(cdtype)
            neg_r_c1 = -r_T[a:b, None]
            dz_cV = z_cV  # the logits are not needed again: their gradient overwrites them
            if dentropy_T is None:
                torch.mul(e_cV, coef_c[:, None] * neg_r_c1, out=dz_cV)
            else:
                dent_c1 = dentropy_T[a:b, None].to(cdtype)
                z_cV.sub_(mean_zs_T[a:b, None])
                torch.addcmul(coef_c[:, None] * neg_r_c1, z_cV, dent_c1 * neg_r_c1, out=dz_cV)
                dz_cV.mul_(e_cV)
            if dlogprob_T is not None:
                dz_cV.scatter_add_(1, local_t[a:b, None], (coef_c * owned[a:b])[:, None])
            dz_cV = dz_cV.to(hidden_TH.dtype)
            if grad_h is not None:
                torch.matmul(dz_cV, weight_VH, out=grad_h[a:b])
            if ctx.needs_input_grad[1]:
                if grad_w is None:
                    grad_w = (dz_cV.t() @ hidden_TH[a:b]).to(cdtype)
                elif grad_w.dtype == dz_cV.dtype:
                    grad_w.addmm_(dz_cV.t(), hidden_TH[a:b])  # no [V, H] temporary
                else:
                    grad_w += (dz_cV.t() @ hidden_TH[a:b]).to(cdtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight_VH.dtype)
        return grad_h, grad_w, None, None, None, None


def fused_logprob_entropy(
    hidden_TH, weight_VH, targets_T, vocab_start: int = 0, group=None, chunk: int = 1024
):
    """(logprob of each target, entropy) of softmax(hidden @ weight.T) over the full vocabulary.

    ``weight_VH`` is this rank's vocab shard [V_local, H] starting at ``vocab_start`` (padding rows
    beyond the real vocabulary must already be sliced off). The caller routes ``hidden_TH`` through
    megatron's ``copy_to_tensor_model_parallel_region`` so the partial input gradients are summed.
    """
    if targets_T.numel() == 0:
        empty = hidden_TH.new_zeros(0, dtype=torch.promote_types(hidden_TH.dtype, torch.float32))
        return empty + 0 * hidden_TH.sum() + 0 * weight_VH.sum(), empty
    return _FusedLogprobEntropy.apply(hidden_TH, weight_VH, targets_T, vocab_start, group, chunk)
