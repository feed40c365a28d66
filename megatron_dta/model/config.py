"""Architecture of the Llama / Qwen2 / Qwen3 decoder family, and named tiny-to-real presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from megatron_dta.errors import ConfigError

MODEL_TYPES = ("llama", "qwen2", "qwen3")
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

    def to_dict(self) -> dict:
        return asdict(self)

    def num_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * self.intermediate_size
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * h) + emb + h


PRESETS: dict[str, ModelConfig] = {
    # the CPU demo/test model (the reference measurements in shared/reference use it)
    "tiny": ModelConfig("qwen2", 4096, 256, 704, 4, 4, 2, qkv_bias=True),
    "tiny-llama": ModelConfig("llama", 4096, 256, 704, 4, 4, 2),
    "tiny-qwen3": ModelConfig("qwen3", 4096, 256, 704, 4, 4, 2, qk_norm=True),
    # long-context CPU benchmarks: attention-heavy
    "tiny-h128": ModelConfig("qwen3", 4096, 128, 352, 2, 2, 1, qk_norm=True),
    "small": ModelConfig("qwen3", 8192, 512, 1408, 8, 8, 4, qk_norm=True),
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
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    return ModelConfig(**PRESETS[name].to_dict())
