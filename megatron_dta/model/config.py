"""Architecture of the Llama / Qwen2 / Qwen3 / Qwen3-MoE decoder family, and named tiny-to-real presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from megatron_dta.errors import ConfigError

MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class ModelConfig:
    model_type: str = field(
        default="qwen2", metadata={"help": f"decoder family: one of {', '.join(MODEL_TYPES)}"}
    )
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size; every token id is below it"})
    hidden_size: int = field(default=256, metadata={"help": "width of the residual stream"})
    intermediate_size: int = field(default=704, metadata={"help": "inner width of the gated MLP"})
    num_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_heads: int = field(default=4, metadata={"help": "query heads"})
    num_kv_heads: int = field(
        default=2, metadata={"help": "key/value heads (grouped-query attention); divides num_heads"}
    )
    head_dim: int | None = field(
        default=None, metadata={"help": "per-head width (even, for RoPE); null: hidden_size // num_heads"}
    )
    rope_theta: float = field(default=10000.0, metadata={"help": "base of the rotary position embedding"})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "epsilon of every RMSNorm"})
    qkv_bias: bool = field(default=False, metadata={"help": "biases on the q, k and v projections (Qwen2)"})
    qk_norm: bool = field(default=False, metadata={"help": "per-head RMSNorm of q and k before RoPE (Qwen3)"})
    tie_embeddings: bool = field(default=False, metadata={"help": "the LM head reuses the embedding matrix"})
    init_std: float = field(
        default=0.02, metadata={"help": "std of the normal initialisation of weight matrices (random init)"}
    )
    # mixture of experts (model_type qwen3_moe; megatron_dta/model/moe.py, docs/moe.md)
    num_experts: int = field(
        default=0, metadata={"help": "qwen3_moe: routed experts per MoE layer; 0: dense"}
    )
    num_experts_per_tok: int = field(
        default=2, metadata={"help": "qwen3_moe: experts each token is routed to"}
    )
    moe_intermediate_size: int = field(default=0, metadata={"help": "qwen3_moe: inner width of each expert"})
    norm_topk_prob: bool = field(
        default=True, metadata={"help": "qwen3_moe: renormalise the top-k router probabilities to sum to 1"}
    )
    decoder_sparse_step: int = field(
        default=1, metadata={"help": "qwen3_moe: layer i is MoE when (i + 1) % decoder_sparse_step == 0"}
    )
    mlp_only_layers: list[int] = field(
        default_factory=list, metadata={"help": "qwen3_moe: layers that keep a dense MLP (take precedence)"}
    )
    router_aux_loss_coef: float = field(
        default=0.0,
        metadata={"help": "qwen3_moe: weight c of the per-rollout load-balancing loss (docs/moe.md); 0: off"},
    )

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model.model_type '{self.model_type}' is not one of {MODEL_TYPES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        self._check_moe()

    def _check_moe(self):
        if (self.model_type == "qwen3_moe") != (self.num_experts > 0):
            raise ConfigError(
                f"model.num_experts={self.num_experts} with model.model_type '{self.model_type}': experts "
                "need model_type qwen3_moe, and qwen3_moe needs num_experts >= 1"
            )
        if not self.num_experts:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"model.num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                f"= {self.num_experts}]"
            )
        if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
            raise ConfigError("model.moe_intermediate_size and model.decoder_sparse_step must be >= 1")
        if self.router_aux_loss_coef < 0:
            raise ConfigError(f"model.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

    def is_moe_layer(self, i: int) -> bool:
        """HF Qwen3-MoE's rule: layer ``i`` (global) has routed experts instead of a dense MLP."""
        return (
            self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        """Global indices of the MoE layers; a layer's place in this list is its MoE index."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        n_moe = len(self.moe_layers)
        experts = n_moe * self.num_experts * (3 * h * self.moe_intermediate_size + h)  # + router rows
        return self.num_layers * (attn + 2 * h) + (self.num_layers - n_moe) * mlp + experts + emb + h


PRESETS: dict[str, ModelConfig] = {
    # the CPU demo/test model (the reference measurements in shared/reference use it)
    "tiny": ModelConfig("qwen2", 4096, 256, 704, 4, 4, 2, qkv_bias=True),
    "tiny-llama": ModelConfig("llama", 4096, 256, 704, 4, 4, 2),
    "tiny-qwen3": ModelConfig("qwen3", 4096, 256, 704, 4, 4, 2, qk_norm=True),
    # long-context CPU benchmarks: attention-heavy
    "tiny-h128": ModelConfig("qwen3", 4096, 128, 352, 2, 2, 1, qk_norm=True),
    "small": ModelConfig("qwen3", 8192, 512, 1408, 8, 8, 4, qk_norm=True),
    # mixture of experts: the CPU test/demo MoE (8 experts, top-2, every layer MoE)
    "tiny-moe": ModelConfig(
        "qwen3_moe",
        4096,
        256,
        704,
        4,
        4,
        2,
        qk_norm=True,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        router_aux_loss_coef=0.001,
    ),
    # GPU benchmark scale (>= 0.5B parameters), Qwen2.5-0.5B-like and Qwen3-1.7B-like shapes
    "0.5b": ModelConfig(
        "qwen2", 151936, 896, 4864, 24, 14, 2, qkv_bias=True, tie_embeddings=True, rope_theta=1e6
    ),
    "1.7b": ModelConfig(
        "qwen3",
        151936,
        2048,
        6144,
        28,
        16,
        8,
        head_dim=128,
        qk_norm=True,
        tie_embeddings=True,
        rope_theta=1e6,
    ),
    # the planner's real sizes (megatron-dta plan, docs/scaling.md): the HF Qwen3-8B / Qwen3-32B shapes
    "qwen3-8b": ModelConfig(
        "qwen3", 151936, 4096, 12288, 36, 32, 8, head_dim=128, qk_norm=True, rope_theta=1e6, rms_norm_eps=1e-6
    ),
    "qwen3-32b": ModelConfig(
        "qwen3", 151936, 5120, 25600, 64, 64, 8, head_dim=128, qk_norm=True, rope_theta=1e6, rms_norm_eps=1e-6
    ),
    # the HF Qwen3-30B-A3B / Qwen3-235B-A22B shapes (configs/moe_qwen3_*.yaml)
    "qwen3-30b-a3b": ModelConfig(
        "qwen3_moe",
        151936,
        2048,
        6144,
        48,
        32,
        4,
        head_dim=128,
        qk_norm=True,
        rope_theta=1e6,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        router_aux_loss_coef=0.001,
    ),
    "qwen3-235b-a22b": ModelConfig(
        "qwen3_moe",
        151936,
        4096,
        12288,
        94,
        64,
        4,
        head_dim=128,
        qk_norm=True,
        rope_theta=1e6,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=1536,
        router_aux_loss_coef=0.001,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    return ModelConfig(**PRESETS[name].to_dict())
