"""megatron_dta: Dynamic Tree Attention training backend for RL post-training."""

__version__ = "0.1.0"
