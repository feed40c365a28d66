"""Architecture of the Llama / Qwen2 / Qwen3 decoder family, and named tiny-to-real presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

MODEL_TYPES = ("llama", "qwen2", "qwen3")
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before RoPE
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model.model_type '{self.model_type}' is not one of {MODEL_TYPES}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**d)

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
        raise ValueError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    return ModelConfig(**PRESETS[name].to_dict())
