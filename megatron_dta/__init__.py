"""megatron_dta: Dynamic Tree Attention training backend for RL post-training."""

__version__ = "0.1.0"
__all__ = ["Trainer"]


def __getattr__(name: str):
    # imported on first use: `megatron-dta --help` should not pay for torch and megatron-core
    if name == "Trainer":
        from megatron_dta.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'megatron_dta' has no attribute {name!r}")
