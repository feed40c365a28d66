"""HF checkpoints (config.json + *.safetensors, sharded or not) <-> the tensor-parallel model.

One table, ``param_map``, says for each of our parameters which HF tensors it is made of and along
which dimension they are split over TP ranks; loading shards with it, gathering (weights for export,
gradients for parity dumps) inverts it. Fused tensors hold each rank's slice of every part:
qkv = [q heads of rank r; k heads of rank r; v heads of rank r], gate_up = [gate r; up r].
Qwen3-MoE experts use transformers 5's in-memory names (``mlp.experts.gate_up_proj`` [E, 2F, H],
``mlp.experts.down_proj`` [E, H, F], fused): ``read_hf_dir`` fuses the per-expert tensors of Hub
checkpoints (``mlp.experts.{e}.gate_proj.weight`` ...) into them and ``save_hf_checkpoint`` writes
them back per expert, unless the source stored them fused; expert tensors are split over EP ranks
along the expert dim before the TP split.
Anything the model cannot represent exactly is refused, never silently mis-loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dta.errors import CheckpointError
from megatron_dta.model.config import TORCH_DTYPES, ModelConfig
from megatron_dta.parallel import ParallelLayout


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF config dict; refuses what the model would get wrong."""
    mt = hf.get("model_type")
    if mt not in ("llama", "qwen2", "qwen3", "qwen3_moe"):
        raise CheckpointError(f"{where}: model_type '{mt}' is not supported (llama, qwen2, qwen3, qwen3_moe)")

    def refuse(cond, what):
        if cond:
            raise CheckpointError(f"{where}: {what} is not supported")

    refuse(
        hf.get("use_sliding_window") or (mt == "llama" and hf.get("sliding_window")),
        "sliding-window attention",
    )
    refuse(
        mt != "qwen3_moe"
        and any(k in hf and hf[k] for k in ("num_experts", "num_local_experts", "moe_intermediate_size")),
        f"mixture of experts in model_type '{mt}' (only qwen3_moe)",
    )
    refuse(
        any(hf.get(k) for k in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts")),
        "shared experts",
    )
    refuse(hf.get("scoring_func", "softmax") != "softmax", f"router scoring_func '{hf.get('scoring_func')}'")
    refuse(hf.get("hidden_act", "silu") != "silu", f"hidden_act '{hf.get('hidden_act')}'")
    refuse(hf.get("mlp_bias"), "mlp_bias")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    refuse(rope_type not in (None, "default"), f"rope scaling type '{rope_type}'")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    return ModelConfig(
        model_type=mt,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=(mt == "qwen2") or bool(hf.get("attention_bias", False)),
        qk_norm=mt in ("qwen3", "qwen3_moe"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **(_moe_from_hf(hf) if mt == "qwen3_moe" else {}),
    )


MOE_HF_KEYS = (
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "router_aux_loss_coef",
)


def _moe_from_hf(hf: dict) -> dict:
    """ModelConfig MoE fields of a qwen3_moe config (transformers 5 writes num_local_experts)."""
    out = {"num_experts": hf.get("num_experts") or hf.get("num_local_experts")}
    out.update({k: hf[k] for k in MOE_HF_KEYS if hf.get(k) is not None})
    out["mlp_only_layers"] = list(out.get("mlp_only_layers", []))
    return out


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
    }[cfg.model_type]
    out = {
        "architectures": [arch],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": 32768,
        "dtype": dtype,
        "attention_bias": cfg.qkv_bias,
    }
    if cfg.num_experts:
        out["num_experts"] = cfg.num_experts
        out.update({k: getattr(cfg, k) for k in MOE_HF_KEYS})
    return out


def param_map(cfg: ModelConfig, stage: tuple[int, int] = (0, 1)) -> list[tuple[str, list[str], int | None]]:
    """(our parameter name, HF tensors concatenated in it, TP split dim or None if replicated) of
    pipeline stage ``stage=(pp_rank, pp_size)`` (see ``Transformer``)."""
    pp_rank, pp = stage
    first, last, n_local = pp_rank == 0, pp_rank == pp - 1, cfg.num_layers // pp
    rows = [("embed.weight", ["model.embed_tokens.weight"], 0)] if first else []
    for j in range(n_local):
        hf, us = f"model.layers.{pp_rank * n_local + j}.", f"layers.{j}."
        attn = hf + "self_attn."
        rows += [
            (us + "input_norm.weight", [hf + "input_layernorm.weight"], None),
            (us + "qkv.weight", [attn + p + "_proj.weight" for p in "qkv"], 0),
            (us + "o_proj.weight", [attn + "o_proj.weight"], 1),
            (us + "post_norm.weight", [hf + "post_attention_layernorm.weight"], None),
        ]
        if cfg.is_moe_layer(pp_rank * n_local + j):  # expert tensors: EP split on dim 0 first
            rows += [
                (us + "moe.router", [hf + "mlp.gate.weight"], None),
                (us + "moe.fc1", [hf + "mlp.experts.gate_up_proj"], 1),
                (us + "moe.fc2", [hf + "mlp.experts.down_proj"], 2),
            ]
        else:
            rows += [
                (us + "gate_up.weight", [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"], 0),
                (us + "down.weight", [hf + "mlp.down_proj.weight"], 1),
            ]
        if cfg.qkv_bias:
            rows.append((us + "qkv.bias", [attn + p + "_proj.bias" for p in "qkv"], 0))
        if cfg.qk_norm:
            rows += [
                (us + "q_norm.weight", [attn + "q_norm.weight"], None),
                (us + "k_norm.weight", [attn + "k_norm.weight"], None),
            ]
    if last:
        rows.append(("final_norm.weight", ["model.norm.weight"], None))
        if not cfg.tie_embeddings:
            rows.append(("lm_head.weight", ["lm_head.weight"], 0))
        elif not first:  # the last stage's copy of the tied embedding
            rows.append(("lm_head.weight", ["model.embed_tokens.weight"], 0))
    return rows


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


def shard(hf_tensors: list[torch.Tensor], dim: int | None, tp: int, rank: int) -> torch.Tensor:
    if dim is None:
        return hf_tensors[0]
    return torch.cat([t.chunk(tp, dim=dim)[rank] for t in hf_tensors], dim=dim)


def unshard(shards: list[torch.Tensor], part_sizes: list[int], dim: int | None) -> list[torch.Tensor]:
    """Inverse of ``shard`` over all TP ranks' shards: the full HF tensors of each part."""
    if dim is None:
        return [shards[0]]
    tp = len(shards)
    pieces = [s.split([p // tp for p in part_sizes], dim=dim) for s in shards]
    return [torch.cat([pieces[r][j] for r in range(tp)], dim=dim) for j in range(len(part_sizes))]


def _part_sizes(cfg: ModelConfig, hf_names: list[str], padded_vocab: int) -> list[int]:
    sizes = []
    for n in hf_names:
        if "embed_tokens" in n or n == "lm_head.weight":
            sizes.append(padded_vocab)
        elif "q_proj" in n:
            sizes.append(cfg.num_heads * cfg.head_dim)
        elif "k_proj" in n or "v_proj" in n:
            sizes.append(cfg.num_kv_heads * cfg.head_dim)
        elif "o_proj" in n:
            sizes.append(cfg.num_heads * cfg.head_dim)
        elif "experts" in n:
            sizes.append(cfg.moe_intermediate_size)
        else:
            sizes.append(cfg.intermediate_size)
    return sizes


def _is_experts(name: str) -> bool:
    return ".mlp.experts." in name


def _split_parts(hf_names: list[str], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """A fused gate_up_proj [E, 2F, H] is two parts (gate, up) for the TP split, like gate_up."""
    if hf_names[0].endswith("experts.gate_up_proj"):
        return list(parts[0].chunk(2, dim=1))
    return parts


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(tensors: dict[str, torch.Tensor], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Per-expert tensors (Hub layout) -> transformers 5's fused ``gate_up_proj`` / ``down_proj``."""
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = t
        else:
            found.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
    for prefix, experts in found.items():
        n = max(experts) + 1
        for e in range(n):
            missing = {"gate_proj", "up_proj", "down_proj"} - set(experts.get(e, {}))
            if missing:
                raise CheckpointError(f"{where}: tensor '{prefix}.{e}.{min(missing)}.weight' is missing")
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in range(n)]
        )
        out[prefix + ".down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(n)])
    return out


def unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``fuse_experts``: the per-expert tensors Hub checkpoints store."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, (gate, up) in enumerate(x.chunk(2) for x in t):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            out.update({f"{prefix}{e}.down_proj.weight": x for e, x in enumerate(t)})
        else:
            out[name] = t
    return out


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, all tensors) of a local HF checkpoint directory."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF checkpoint directory)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[k] = sf.get_tensor(k)
    return hf_cfg, fuse_experts(tensors, str(path))


@torch.no_grad()
def load_hf_into(
    model, tensors: dict[str, torch.Tensor], tp_rank: int = 0, where: str = "checkpoint"
) -> None:
    cfg, tp = model.cfg, model.tp
    params = dict(model.named_parameters())
    for ours, hf_names, dim in param_map(cfg, model.stage):
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            raise CheckpointError(f"{where}: tensor '{missing[0]}' is missing")
        parts = [tensors[n] for n in hf_names]
        if ours in ("embed.weight", "lm_head.weight"):
            parts = [_pad_vocab(p, model.padded_vocab) for p in parts]
        if _is_experts(hf_names[0]):
            parts = [p.chunk(model.ep)[model.ep_rank] for p in parts]
        local = shard(_split_parts(hf_names, parts), dim, tp, tp_rank)
        if local.shape != params[ours].shape:
            raise CheckpointError(
                f"{where}: '{hf_names[0]}' has shape {tuple(parts[0].shape)}, "
                f"which does not fit the config (expected shard {tuple(params[ours].shape)})"
            )
        params[ours].copy_(local)


def load_hf_checkpoint(path, layout: ParallelLayout, dtype=torch.float32):
    """Build this rank's part of a Transformer under ``layout`` (its TP shard of its pipeline
    stage) from a local HF directory."""
    from megatron_dta.model.transformer import Transformer

    hf_cfg, tensors = read_hf_dir(path)
    cfg = config_from_hf(hf_cfg, str(Path(path) / "config.json"))
    model = Transformer(cfg, layout, dtype)
    load_hf_into(model, tensors, layout.tp_rank, str(path))
    return model, hf_cfg


def gather_hf(model, which: str = "param", group=None, pp_group=None) -> dict[str, torch.Tensor]:
    """Full, unsharded HF-named tensors of the parameters (``param``) or their grads (``grad``).

    Collective over the TP group (and over ``pp_group`` when given: every stage's tensors then
    reach every stage; a tied embedding's last-stage copy is left out, its grad having been summed
    into the first stage's): every rank of those groups must call it.
    """
    cfg = model.cfg
    params = dict(model.named_parameters())
    tp = model.tp
    out = {}
    for ours, hf_names, dim in param_map(cfg, model.stage):
        if ours == "lm_head.weight" and hf_names == ["model.embed_tokens.weight"]:
            continue
        p = params[ours]
        t = p.detach() if which == "param" else (p.grad if p.grad is not None else torch.zeros_like(p))
        if tp > 1 and dim is not None:
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t.contiguous(), group=group)
        else:
            shards = [t]
        fused = hf_names[0].endswith("experts.gate_up_proj")
        sizes = _part_sizes(cfg, hf_names * 2 if fused else hf_names, model.padded_vocab)
        full = unshard(shards, sizes, dim)
        if _is_experts(hf_names[0]):
            full = [_gather_experts(torch.cat(full, dim=1), model.ep_group)]
        for name, tensor in zip(hf_names, full):
            if "embed_tokens" in name or name == "lm_head.weight":
                tensor = tensor[: cfg.vocab_size]
            out[name] = tensor
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        stages = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(stages, out, group=pp_group)
        out = {k: v for part in stages for k, v in part.items()}
    return out


def _gather_experts(local: torch.Tensor, ep_group) -> torch.Tensor:
    """All experts [E, ...] from each EP rank's contiguous slice [E_local, ...]."""
    if ep_group is None or ep_group.size() == 1:
        return local
    slices = [torch.empty_like(local) for _ in range(ep_group.size())]
    dist.all_gather(slices, local.contiguous(), group=ep_group)
    return torch.cat(slices)


def save_hf_checkpoint(
    tensors: dict[str, torch.Tensor],
    hf_cfg: dict,
    out_dir,
    weight_map: dict | None = None,
    dtype: str | None = None,
) -> None:
    """Write config.json + safetensors atomically (temp dir, then rename). ``weight_map`` (name ->
    file, as in model.safetensors.index.json) reproduces a sharded layout."""
    from safetensors.torch import save_file

    if not any(n.endswith(".mlp.experts.gate_up_proj") for n in weight_map or {}):
        tensors = unfuse_experts(tensors)  # the Hub layout, unless the source stored experts fused
    out_dir = Path(out_dir)
    dtype = dtype or hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    tdtype = TORCH_DTYPES.get(dtype, torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        files: dict[str, dict] = {}
        for name, t in tensors.items():
            fname = (weight_map or {}).get(name, "model.safetensors")
            files.setdefault(fname, {})[name] = t.detach().to("cpu", tdtype).contiguous()
        for fname, group in files.items():
            save_file(group, str(tmp / fname), metadata={"format": "pt"})
        if len(files) > 1:
            index = {
                "metadata": {},
                "weight_map": {n: (weight_map or {}).get(n, "model.safetensors") for n in tensors},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def hf_weight_map(path) -> dict | None:
    index = Path(path) / "model.safetensors.index.json"
    return json.loads(index.read_text())["weight_map"] if index.is_file() else None
