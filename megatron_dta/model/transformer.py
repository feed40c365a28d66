"""Decoder-only transformer (Llama / Qwen2 / Qwen3 / Qwen3-MoE) on megatron-core tensor-parallel layers.

The model knows nothing about trees. Tokens arrive flattened as one row ``[T]`` with their
position ids; attention hands (q, k, v) of layer ``i`` to ``kv.attend(i, q, k, v)`` and gets the
attention output back. The execution strategy behind ``kv`` (dense, packed tree mask, DFS with
ancestor K/V) decides which keys each query sees; see ``megatron_dta.engine``.

Legend: T tokens, H hidden, N local query heads, K local kv heads, D head dim, F local ffn,
V local vocab. Norms, rotary tables and softmax run in max(dtype, float32), so float64 stays
float64 end to end.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dta.errors import ConfigError
from megatron_dta.model.config import ModelConfig
from megatron_dta.model.lm_head import fused_logprob_entropy
from megatron_dta.model.moe import MoEMLP
from megatron_dta.parallel import ParallelLayout

# megatron-core 0.16's RowParallelLinear passes tp_group=None to its own linear function even when
# the layer has a group, which warns on every call; the group is correct, the warning is noise.
warnings.filterwarnings("ignore", message="Warning: tp_group is None", category=DeprecationWarning)


class KVContext(Protocol):
    def attend(
        self, layer: int, q_TND: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor
    ) -> torch.Tensor:
        """Attention output [T, N, D] of this chunk's queries over the keys the strategy provides."""

    def route(self, moe_index: int, probs_TE: torch.Tensor, top_k: int) -> torch.Tensor:
        """Expert ids [T, K] of MoE layer ``moe_index`` (``moe.top_k_route``, or replayed routes)."""


def _mp():
    from megatron.core import tensor_parallel

    return tensor_parallel


class RMSNorm(nn.Module):
    """RMSNorm computed in max(dtype, float32); ``tp_shared`` sums its grad over TP ranks."""

    def __init__(self, dim: int, eps: float, dtype, device, tp_group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps, self.tp_group = eps, tp_group

    def forward(self, x):
        cdtype = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(cdtype)
        xc = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        # per-head q/k norms see only this rank's heads: their weight grad is a partial sum
        w = (
            self.weight
            if self.tp_group is None
            else _mp().copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group)
        )
        return w * xc.to(x.dtype)


def rotary_tables(position_ids_T, head_dim: int, theta: float, dtype):
    cdtype = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=cdtype, device=position_ids_T.device) / head_dim)
    )
    freqs_TD2 = position_ids_T.to(cdtype)[:, None] * inv_freq[None, :]
    emb_TD = torch.cat([freqs_TD2, freqs_TD2], dim=-1)
    return emb_TD.cos().to(dtype)[:, None, :], emb_TD.sin().to(dtype)[:, None, :]


def apply_rotary(x_TND, cos_T1D, sin_T1D):
    half = x_TND.shape[-1] // 2
    rotated = torch.cat([-x_TND[..., half:], x_TND[..., :half]], dim=-1)
    return x_TND * cos_T1D + rotated * sin_T1D


class DecoderLayer(nn.Module):
    """``moe_index``: this layer's place among the model's MoE layers (its MLP is then ``MoEMLP``)."""

    def __init__(
        self, cfg: ModelConfig, index: int, mp_config, tp_group, dtype, device, moe_index=None, ep_group=None
    ):
        super().__init__()
        tpl = _mp()
        tp = tp_group.size()
        init = lambda w: nn.init.normal_(w, std=cfg.init_std)
        self.index = index
        self.n_local, self.k_local, self.d = cfg.num_heads // tp, cfg.num_kv_heads // tp, cfg.head_dim
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        # outputs stay sharded over the TP group; a row-parallel layer's input is already split
        column = partial(
            tpl.ColumnParallelLinear,
            config=mp_config,
            init_method=init,
            gather_output=False,
            tp_group=tp_group,
        )
        row = partial(
            tpl.RowParallelLinear,
            config=mp_config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        # fused q|k|v: each rank holds [its q heads, its k heads, its v heads] (hf.py lays it out)
        self.qkv = column(
            cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias
        )
        self.q_norm = (
            RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device, tp_group) if cfg.qk_norm else None
        )
        self.k_norm = (
            RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device, tp_group) if cfg.qk_norm else None
        )
        self.o_proj = row(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if moe_index is not None:
            self.moe = MoEMLP(cfg, moe_index, tp_group, ep_group, dtype, device)
            return
        self.moe = None
        self.gate_up = column(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # [gate rows, up rows]
        self.down = row(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x_TH, cos, sin, kv: KVContext):
        T = x_TH.shape[0]
        qkv_TX = self.qkv(self.input_norm(x_TH))[0]
        nq, nk, d = self.n_local * self.d, self.k_local * self.d, self.d
        q_TND = qkv_TX[:, :nq].view(T, self.n_local, d)
        k_TKD = qkv_TX[:, nq : nq + nk].view(T, self.k_local, d)
        v_TKD = qkv_TX[:, nq + nk :].view(T, self.k_local, d)
        if self.q_norm is not None:
            q_TND, k_TKD = self.q_norm(q_TND), self.k_norm(k_TKD)
        q_TND, k_TKD = apply_rotary(q_TND, cos, sin), apply_rotary(k_TKD, cos, sin)
        attn_TND = kv.attend(self.index, q_TND, k_TKD, v_TKD)
        x_TH = x_TH + self.o_proj(attn_TND.reshape(T, nq))[0]
        if self.moe is not None:
            return x_TH + self.moe(self.post_norm(x_TH), kv)
        gate_up_TF2 = self.gate_up(self.post_norm(x_TH))[0]
        gate_TF, up_TF = gate_up_TF2.chunk(2, dim=-1)
        return x_TH + self.down(F.silu(gate_TF) * up_TF)[0]


class Transformer(nn.Module):
    """This rank's part of the model under ``layout``: parameters sharded over ``layout.tp_group``,
    and the pipeline stage ``layout.stage = (pp_rank, pp)``: an even, contiguous slice of the layers
    (``layers.i`` is global layer ``layer_offset + i``), the embedding on the first stage, the final
    norm and LM head on the last. With tied embeddings and pp > 1 the last stage holds a copy of
    the embedding as ``lm_head``; ``megatron_dta.pipeline`` sums the two grads after backward.
    The model keeps only the TP group it communicates over, not the layout.
    """

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, dtype=torch.float32):
        super().__init__()
        from megatron.core import ModelParallelConfig

        tp, (pp_rank, pp), device = layout.tp, layout.stage, layout.device
        if cfg.num_heads % tp or cfg.num_kv_heads % tp or cfg.intermediate_size % tp:
            raise ConfigError(
                f"parallel.tp={tp} must divide model.num_heads ({cfg.num_heads}), model.num_kv_heads "
                f"({cfg.num_kv_heads}) and model.intermediate_size ({cfg.intermediate_size})"
            )
        if cfg.num_layers % pp:
            raise ConfigError(f"parallel.pp={pp} must divide model.num_layers ({cfg.num_layers})")
        ep = layout.ep
        if cfg.num_experts and (cfg.num_experts % ep or cfg.moe_intermediate_size % tp):
            raise ConfigError(
                f"parallel.ep={ep} must divide model.num_experts ({cfg.num_experts}) and parallel.tp={tp} "
                f"model.moe_intermediate_size ({cfg.moe_intermediate_size})"
            )
        self.ep, self.ep_rank, self.ep_group = ep, layout.ep_rank, layout.ep_group
        self.cfg, self.tp, self.dtype = cfg, tp, dtype
        self.stage, self.is_first, self.is_last = layout.stage, pp_rank == 0, pp_rank == pp - 1
        n_local = cfg.num_layers // pp
        self.layer_offset = pp_rank * n_local
        self.tp_group, self.tp_rank = layout.tp_group, layout.tp_rank
        self.padded_vocab = -(-cfg.vocab_size // tp) * tp  # megatron splits the vocab evenly
        if (tp - 1) * (self.padded_vocab // tp) >= cfg.vocab_size:
            raise ConfigError(
                f"parallel.tp={tp} leaves a tensor-parallel rank without any of the "
                f"{cfg.vocab_size} vocabulary rows: use a smaller tp"
            )
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            params_dtype=dtype,
            use_cpu_initialization=torch.device(device).type != "cuda",  # cpu, or meta (the planner)
            perform_initialization=True,
            gradient_accumulation_fusion=False,
        )
        tpl = _mp()
        init = lambda w: nn.init.normal_(w, std=cfg.init_std)
        self.embed = (
            tpl.VocabParallelEmbedding(
                self.padded_vocab, cfg.hidden_size, init_method=init, config=mp_config, tp_group=self.tp_group
            )
            if self.is_first
            else None
        )
        # the layer index a layer hands to kv.attend is local: each stage keeps K/V of its own layers
        moe_of = {g: m for m, g in enumerate(cfg.moe_layers)}
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg,
                i,
                mp_config,
                self.tp_group,
                dtype,
                device,
                moe_of.get(self.layer_offset + i),
                layout.ep_group,
            )
            for i in range(n_local)
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device) if self.is_last else None
        own_head = self.is_last and (not cfg.tie_embeddings or not self.is_first)
        self.lm_head = (
            tpl.ColumnParallelLinear(
                cfg.hidden_size,
                self.padded_vocab,
                config=mp_config,
                init_method=init,
                bias=False,
                gather_output=False,
                tp_group=self.tp_group,
            )
            if own_head
            else None
        )
        self.to(device)

    @property
    def vocab_start(self) -> int:
        return self.tp_rank * (self.padded_vocab // self.tp)  # megatron's even vocab split

    def forward_stage(self, x: torch.Tensor, position_ids_T: torch.Tensor, kv: KVContext) -> torch.Tensor:
        """This stage's output [T, H]: ``x`` is token ids [T] on the first stage, else the previous
        stage's hidden [T, H]; the last stage returns final-normed hidden states."""
        x_TH = self.embed(x) if self.is_first else x
        cos, sin = rotary_tables(position_ids_T, self.cfg.head_dim, self.cfg.rope_theta, x_TH.dtype)
        for layer in self.layers:
            x_TH = layer(x_TH, cos, sin, kv)
        return self.final_norm(x_TH) if self.is_last else x_TH

    def forward(self, input_ids_T: torch.Tensor, position_ids_T: torch.Tensor, kv: KVContext) -> torch.Tensor:
        """Final-normed hidden states [T, H] of a flat row of tokens (the whole model: one stage)."""
        assert self.is_first and self.is_last, "a pipeline stage runs forward_stage"
        return self.forward_stage(input_ids_T, position_ids_T, kv)

    def output_weight(self) -> torch.Tensor:
        """This rank's LM-head shard [V_local, H], padding rows past the real vocabulary removed."""
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return w[: max(0, min(w.shape[0], self.cfg.vocab_size - self.vocab_start))]

    def logprobs(self, hidden_PH: torch.Tensor, targets_P: torch.Tensor, chunk: int = 1024):
        """(log p(target), entropy) per row, computed in max(dtype, float32); [P] each."""
        h = _mp().copy_to_tensor_model_parallel_region(hidden_PH, group=self.tp_group)
        return fused_logprob_entropy(
            h, self.output_weight(), targets_P, self.vocab_start, self.tp_group, chunk
        )
