"""Independent references for the exactness tests (tests only; the package never imports this).

1. HF transformers, dense, one rollout at a time, patched to stay in float64: HF computes RMSNorm,
   the rotary tables, eager softmax and the MoE router softmax in float32 even for a float64 model
   (~3e-7 error), so ``float64_hf()`` patches the norm, rotary and router forwards and uses sdpa
   attention (and eager experts: grouped_mm has no float64 kernel). The MoE load-balancing loss
   (docs/moe.md) is computed here from HF's router logits (``output_router_logits``).
2. ``naive_logprobs``: a second float64 forward written from the HF tensors with explicit loops and
   an explicit softmax, sharing no code with HF or with megatron_dta; it proves the patched HF.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

MODEL_KINDS = ("llama", "qwen2", "qwen3", "qwen3_moe")
AUX_COEF = 0.05  # the tiny MoE's router_aux_loss_coef: large enough that its gradients matter


def tiny_hf_config(kind: str, vocab=96, hidden=64, layers=2, heads=4, kv_heads=2, inter=96, theta=10000.0):
    import transformers

    common = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
    }
    if kind == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "qwen2":  # q/k/v bias and tied embeddings
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if kind == "qwen3_moe":  # 2 MoE layers around a dense one, 4 experts, top-2
        return transformers.Qwen3MoeConfig(
            **{**common, "num_hidden_layers": layers + 1},
            head_dim=hidden // heads,
            tie_word_embeddings=False,
            attention_bias=False,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            router_aux_loss_coef=AUX_COEF,
        )
    if kind == "qwen3":  # per-head q/k norm, explicit head_dim
        return transformers.Qwen3Config(
            **common,
            head_dim=hidden // heads,
            tie_word_embeddings=False,
            use_sliding_window=False,
            attention_bias=False,
        )
    raise ValueError(kind)


def make_hf_model(kind: str, seed: int = 0, dtype=torch.float64, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(kind, **kw)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    }[kind]
    extra = {"experts_implementation": "eager"} if kind == "qwen3_moe" else {}
    model = cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype, **extra)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise so they are tested
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _rms_forward(self, x):
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def _rotary_forward(self, x, position_ids):
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    base = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


_REPLAY: dict = {"routes": None, "layer": 0}  # routing replay of the rollout HF is running


def _router_forward(self, hidden_states):
    """HF's Qwen3MoeTopKRouter with the softmax in the logits' dtype (HF: float32); under routing
    replay the experts are the rollout's (``_REPLAY``), the gates still its probabilities there."""
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.topk(probs, self.top_k, dim=-1)
    if _REPLAY["routes"] is not None:
        idx = torch.as_tensor(_REPLAY["routes"][:, _REPLAY["layer"]])
        top = probs.gather(1, idx)
        _REPLAY["layer"] += 1
    if self.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, idx


@contextlib.contextmanager
def float64_hf():
    """Patch HF's RMSNorm, rotary embedding and MoE router forwards to compute in the input dtype."""
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.qwen2 import modeling_qwen2 as mq2
    from transformers.models.qwen3 import modeling_qwen3 as mq3
    from transformers.models.qwen3_moe import modeling_qwen3_moe as mqm

    targets = [
        (ml.LlamaRMSNorm, _rms_forward),
        (mq2.Qwen2RMSNorm, _rms_forward),
        (mq3.Qwen3RMSNorm, _rms_forward),
        (ml.LlamaRotaryEmbedding, _rotary_forward),
        (mq2.Qwen2RotaryEmbedding, _rotary_forward),
        (mq3.Qwen3RotaryEmbedding, _rotary_forward),
        (mqm.Qwen3MoeRMSNorm, _rms_forward),
        (mqm.Qwen3MoeRotaryEmbedding, _rotary_forward),
        (mqm.Qwen3MoeTopKRouter, _router_forward),
    ]
    saved = [(cls, cls.forward) for cls, _ in targets]
    try:
        for cls, fn in targets:
            cls.forward = fn
        yield
    finally:
        for cls, fn in saved:
            cls.forward = fn


def hf_logprobs_of(model, ids: np.ndarray, router_logits: list | None = None, routes=None) -> torch.Tensor:
    """Per-token log-probs [L] of one rollout (entry 0 = 0), with grad; an MoE model's router
    logits (one [L, E] per MoE layer) are appended to ``router_logits`` when given; ``routes``
    [L, MoE layers, K]: the experts to replay (inside ``float64_hf``)."""
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    _REPLAY.update(routes=routes, layer=0)
    try:
        out = model(input_ids=x, output_router_logits=router_logits is not None)
    finally:
        _REPLAY["routes"] = None
    if router_logits is not None:
        router_logits.append(out.router_logits)
    logits = out.logits[0].to(torch.float64)
    lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, x[0, 1:, None]).squeeze(1)
    return torch.cat([lp.new_zeros(1), lp])


def aux_loss_reference(router_logits: list, coef: float, top_k: int, routes=None) -> torch.Tensor:
    """The per-rollout load-balancing loss (docs/moe.md) written out from HF's router logits:
    c / (R M) * sum over rollouts r and MoE layers of E * sum_e f_e P_e, f_e the fraction of the
    rollout's n K routing slots on expert e (no gradient), P_e its mean router probability.
    ``routes``: per rollout [n, M, K], the replayed experts (else each token's top-k)."""
    total = router_logits[0][0].new_zeros(())
    for i, layers in enumerate(router_logits):
        for m, logits in enumerate(layers):
            probs = torch.softmax(logits.to(torch.float64), dim=-1)
            n, E = probs.shape
            chosen = torch.topk(probs.detach(), top_k, dim=-1).indices
            if routes is not None:
                chosen = torch.as_tensor(routes[i][:, m])
            f = torch.zeros(E, dtype=torch.float64).index_add_(
                0, chosen.reshape(-1), torch.ones(n * top_k, dtype=torch.float64)
            ) / (n * top_k)
            total = total + E * (f * probs.mean(0)).sum()
    return coef * total / (len(router_logits) * len(router_logits[0]))


def ppo_reference(lps, rollouts, eps_low=0.2, eps_high=0.2):
    """The default loss written out directly: sum over rollouts/positions of mask*term / sum(mask)."""
    total = sum(float(r.loss_mask.sum()) for r in rollouts)
    loss = lps[0].new_zeros(())
    for lp, r in zip(lps, rollouts):
        old = lp.detach() if r.old_logprobs is None else torch.as_tensor(r.old_logprobs)
        adv = torch.as_tensor(r.advantages)
        ratio = torch.exp(lp - old)
        term = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
        loss = loss + (torch.as_tensor(r.loss_mask, dtype=lp.dtype) * term)[1:].sum()
    return loss / max(total, 1.0)


def hf_dense_step(model, rollouts):
    """A parity dump (``megatron_dta.devtools.parity``: per-rollout log-probs, loss, {hf name: grad})
    of a plain dense forward/backward."""
    model.zero_grad(set_to_none=True)
    moe = getattr(model.config, "num_experts", 0) > 0
    router_logits = [] if moe else None
    routes = [r.routed_experts for r in rollouts] if rollouts[0].routed_experts is not None else None
    with float64_hf():
        lps = [
            hf_logprobs_of(model, r.input_ids, router_logits, None if routes is None else routes[i])
            for i, r in enumerate(rollouts)
        ]
        loss = ppo_reference(lps, rollouts)
        if moe:
            cfg = model.config
            loss = loss + aux_loss_reference(
                router_logits, cfg.router_aux_loss_coef, cfg.num_experts_per_tok, routes
            )
        loss.backward()
    grads = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for n, p in model.named_parameters()
    }
    return {"logprobs": [lp.detach().numpy() for lp in lps], "loss": loss.detach(), "grads": grads}


def naive_logprobs(sd: dict, cfg, ids: np.ndarray) -> np.ndarray:
    """A second float64 forward straight from the HF tensors: loops, explicit softmax, no HF code."""
    sd = {k: v.detach().to(torch.float64) for k, v in sd.items()}
    H, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or H // nh
    theta = cfg.rope_parameters["rope_theta"]
    eps = cfg.rms_norm_eps
    L = len(ids)

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(x):  # x [L, heads, d]
        out = torch.empty_like(x)
        for pos in range(L):
            for i in range(d // 2):
                ang = pos * theta ** (-2.0 * i / d)
                c, s = math.cos(ang), math.sin(ang)
                a, b = x[pos, :, i], x[pos, :, i + d // 2]
                out[pos, :, i] = a * c - b * s
                out[pos, :, i + d // 2] = b * c + a * s
        return out

    x = sd["model.embed_tokens.weight"][torch.as_tensor(ids)]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])

        def proj(name, h=h, p=p):
            y = h @ sd[p + f"self_attn.{name}.weight"].T
            return y + sd[p + f"self_attn.{name}.bias"] if p + f"self_attn.{name}.bias" in sd else y

        q, k, v = (
            proj("q_proj").view(L, nh, d),
            proj("k_proj").view(L, nkv, d),
            proj("v_proj").view(L, nkv, d),
        )
        if p + "self_attn.q_norm.weight" in sd:
            q, k = rms(q, sd[p + "self_attn.q_norm.weight"]), rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        att = torch.zeros(L, nh, d, dtype=torch.float64)
        for head in range(nh):
            kh = head // (nh // nkv)
            scores = (q[:, head] @ k[:, kh].T) / math.sqrt(d)
            scores = scores.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
            w = torch.exp(scores - scores.max(-1, keepdim=True).values)
            att[:, head] = (w / w.sum(-1, keepdim=True)) @ v[:, kh]
        x = x + att.reshape(L, nh * d) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate.weight" in sd:
            x = x + _naive_moe(sd, p + "mlp.", h, cfg)
            continue
        g, u = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (g * torch.sigmoid(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    w_out = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    logits = x @ w_out.T
    lse = torch.logsumexp(logits[:-1], dim=-1)
    lp = logits[:-1].gather(1, torch.as_tensor(ids[1:])[:, None]).squeeze(1) - lse
    return np.concatenate([[0.0], lp.numpy()])


def _naive_moe(sd: dict, p: str, h: torch.Tensor, cfg) -> torch.Tensor:
    """Qwen3-MoE's block token by token: explicit softmax, top-k by sorting, gate-weighted experts."""
    out = torch.zeros_like(h)
    F = cfg.moe_intermediate_size
    for t in range(h.shape[0]):
        logits = sd[p + "gate.weight"] @ h[t]
        w = torch.exp(logits - logits.max())
        probs = w / w.sum()
        chosen = sorted(range(len(probs)), key=lambda e: -float(probs[e]))[: cfg.num_experts_per_tok]
        gates = probs[chosen] / (probs[chosen].sum() if cfg.norm_topk_prob else 1.0)
        for gate, e in zip(gates, chosen):
            w1 = sd[p + "experts.gate_up_proj"][e]
            g, u = w1[:F] @ h[t], w1[F:] @ h[t]
            out[t] += gate * (sd[p + "experts.down_proj"][e] @ (g * torch.sigmoid(g) * u))
    return out
