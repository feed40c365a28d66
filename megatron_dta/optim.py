"""Optimizer step with data parallelism: AdamW, global-norm clipping, warmup + cosine LR.

Three backends behind one small interface (``accumulate()`` around the microbatches' backward
passes, then ``step(lr) -> grad_norm``, ``save(dir)``/``load(dir)``):
- ``torch``: AdamW (apex FusedAdam on CUDA when apex is already installed); gradients summed over
  data-parallel ranks with one all-reduce, then clipped by the global norm. Low-precision
  parameters get float32 master weights.
- ``deepspeed``: DeepSpeed ZeRO stage 1 (optimizer states partitioned over DP) or 2 (gradients too),
  on CPU with gloo as well as on GPU. The DFS engine runs many backward calls per step, so the
  reduction is coalesced into one pass per step (``coalesce_grad_reduction``).
- ``megatron``: megatron-core DistributedDataParallel + distributed optimizer (CUDA only).
Every backend accumulates the step's weight gradients in float32 main grads (``grads.py``), never
in a bfloat16 ``p.grad``: ``torch`` and ``deepspeed`` attach ``MainGrads``, megatron-core's DDP keeps
its own (``grad_reduce_in_fp32``). The DP all-reduce, the norm and the update read the main grads.
The loss is already normalized by the global denominator, so gradients are *summed* over DP ranks.
Invariant of the norm: a TP-sharded parameter counts once per TP rank (its shards are disjoint), a
replicated one (norms) counts once in all, an expert (``allreduce=False``, split over EP ranks) once
per EP rank, and DP replicas are not counted again; pipeline stages
add their own layers, and a tied embedding split over the first and last stage counts once.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from megatron_dta.errors import CheckpointError, ConfigError
from megatron_dta.grads import MainGrads, grad_of
from megatron_dta.parallel import ParallelLayout, all_reduce_grads, all_reduce_over

BACKENDS = ("torch", "deepspeed", "megatron")


@dataclass
class OptimizerConfig:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW)"})
    min_lr: float = field(default=0.0, metadata={"help": "where the cosine schedule ends"})
    warmup_steps: int = field(
        default=0, metadata={"help": "linear warmup from lr / warmup_steps to lr, then cosine to min_lr"}
    )
    betas: tuple[float, float] = field(
        default=(0.9, 0.999), metadata={"help": "AdamW moment decay rates, each in [0, 1)"}
    )
    eps: float = field(default=1e-8, metadata={"help": "AdamW denominator epsilon"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled (AdamW); never on norms or biases"})
    grad_clip: float | None = field(default=1.0, metadata={"help": "max global grad norm; null: no clipping"})
    backend: str = field(
        default="torch",
        metadata={
            "help": (
                "torch (AdamW, DP all-reduce), deepspeed (ZeRO, CPU or GPU) or megatron (distributed "
                "optimizer, CUDA only)"
            )
        },
    )
    zero_stage: int = field(
        default=1, metadata={"help": "deepspeed: 1 partitions optimizer states over DP, 2 gradients too"}
    )

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr must be in [0, optimizer.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must both be in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"optimizer.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"optimizer.backend '{self.backend}' must be one of {BACKENDS}")
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"optimizer.zero_stage must be 1 or 2, got {self.zero_stage}")


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine from lr to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (norm weights and biases are 1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def global_grad_norm(params: list[torch.Tensor], layout: ParallelLayout) -> float:
    """L2 norm of the full model's gradient (see the module invariant), in float64. ``params`` are
    this stage's, without the last stage's copy of a tied embedding (its grad is the first stage's)."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sq = torch.zeros((), dtype=torch.float64, device=layout.device)
    sq_experts = torch.zeros((), dtype=torch.float64, device=layout.device)  # split over EP ranks too
    for p in params:
        g = grad_of(p)
        if g is not None and param_is_not_tensor_parallel_duplicate(p, layout.tp_group):
            (sq if getattr(p, "allreduce", True) else sq_experts).add_(g.detach().double().pow(2).sum())
    sq += all_reduce_over(sq_experts, layout.ep_group)
    return math.sqrt(all_reduce_over(sq, layout.tp_group, layout.pp_group).item())


def norm_params(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters the global norm counts: all but a pipeline's last-stage copy of a tied embedding."""
    copy = model.lm_head.weight if model.cfg.tie_embeddings and model.is_last and not model.is_first else None
    return [p for p in model.parameters() if p.requires_grad and p is not copy]


def _adamw(groups: list[dict], cfg: OptimizerConfig, device: str) -> torch.optim.Optimizer:
    if device == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
        except ImportError:
            pass
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class TorchOptimizer:
    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, layout: ParallelLayout):
        self.model, self.cfg, self.layout = model, cfg, layout
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = param_groups(model, cfg.weight_decay)
        # float32 master weights for low-precision parameters: bf16 cannot hold small updates
        self.master = {
            p: p.detach().float().clone() for p in self.params if p.dtype in (torch.bfloat16, torch.float16)
        }
        for g in groups:
            g["params"] = [self.master.get(p, p) for p in g["params"]]
        self.opt = _adamw(groups, cfg, layout.device)
        self.main_grads = MainGrads(self.params)

    def accumulate(self):
        return contextlib.nullcontext()

    def step(self, lr: float) -> float:
        all_reduce_grads(self.model, self.layout.grad_group)
        norm = global_grad_norm(norm_params(self.model), self.layout)
        scale = min(1.0, self.cfg.grad_clip / (norm + 1e-6)) if self.cfg.grad_clip is not None else 1.0
        for p in self.params:
            if scale < 1.0:
                p.main_grad.mul_(scale)
            # the main grad has the master's dtype (float32) or the parameter's (float32, float64)
            self.master.get(p, p).grad = p.main_grad
        _set_lr(self.opt, lr)
        self.opt.step()
        with torch.no_grad():
            for p, m in self.master.items():
                p.copy_(m)
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)  # unlinks the main grads lent to the update
        for p in self.params:
            p.grad = None
        self.main_grads.zero()

    def _file(self, directory: Path) -> Path:
        layout = self.layout
        pp = f"_pp{layout.pp_rank}" if layout.pp > 1 else ""
        ep = f"_ep{layout.ep_rank}" if layout.ep > 1 else ""  # EP ranks hold different experts
        return directory / f"torch_tp{layout.tp_rank}{pp}{ep}.pt"

    def save(self, directory: Path) -> None:
        """Optimizer states are the same on every DP and CP rank: DP rank 0, CP rank 0 of each (TP, PP,
        EP) rank writes them."""
        if self.layout.dp_rank == 0 and self.layout.cp_rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"optimizer": self.opt.state_dict(), "master": list(self.master.values())},
                self._file(directory),
            )

    def load(self, directory: Path) -> None:
        state = torch.load(self._file(directory), map_location=self.layout.device, weights_only=False)
        self.opt.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for m, saved in zip(self.master.values(), state["master"]):
                m.copy_(saved)


def _deepspeed_mpu(layout: ParallelLayout) -> SimpleNamespace:
    """The process-group interface DeepSpeed asks of a model-parallel library (TP is its model parallel)."""
    tp = {"rank": lambda: layout.tp_rank, "world_size": lambda: layout.tp, "group": lambda: layout.tp_group}
    dp = {"rank": lambda: layout.dp_rank, "world_size": lambda: layout.dp, "group": lambda: layout.dp_group}
    return SimpleNamespace(
        **{f"get_model_parallel_{k}": f for k, f in tp.items()},
        **{f"get_tensor_model_parallel_{k}": f for k, f in tp.items()},
        **{f"get_data_parallel_{k}": f for k, f in dp.items()},
    )


class DeepSpeedOptimizer:
    """DeepSpeed ZeRO 1/2 around a torch AdamW; DeepSpeed clips by the global norm (TP-aware via mpu)."""

    TAG = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, layout: ParallelLayout):
        import deepspeed

        if "RANK" not in os.environ:  # a world of one without torchrun; DeepSpeed insists on the variable
            os.environ["LOCAL_RANK"] = "0"
        if layout.device == "cpu":
            # gloo reduces CPU tensors already; DeepSpeed's shared-memory all-reduce op would only
            # speed that up, at the cost of a C++ JIT compile of minutes on a machine's first run
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.layout = layout
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.main_grads = MainGrads(self.params)
        dtype = self.params[0].dtype
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,  # a plain torch AdamW
            "gradient_clipping": cfg.grad_clip or 0.0,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,
        }
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=model,
            optimizer=_adamw(param_groups(model, cfg.weight_decay), cfg, layout.device),
            config=ds_config,
            mpu=_deepspeed_mpu(layout),
            dist_init_required=False,
        )

    @contextlib.contextmanager
    def accumulate(self):
        """Every backward of the step inside; one reduction over DP when it closes. The step's
        float32 sum goes to DeepSpeed's ``p.grad`` once, rounded to the parameter dtype once
        (DeepSpeed's ZeRO 1/2 reduce from ``p.grad``; its float32 accumulation needs BF16_Optimizer,
        which cannot coalesce the engine's many backward calls)."""
        with self.engine.coalesce_grad_reduction():
            yield
            # DeepSpeed averages over DP ranks; the loss is already normalized globally, so sum.
            for p in self.params:
                p.grad = (p.main_grad * self.layout.dp).to(p.dtype)
            self.main_grads.zero()

    def step(self, lr: float) -> float:
        _set_lr(self.opt, lr)
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        self.main_grads.zero()

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(
                f"{directory}: no DeepSpeed checkpoint '{self.TAG}' (was it saved with another backend?)"
            )


class MegatronOptimizer:
    """megatron-core DDP (gradient buckets, reduce-scatter) and its distributed optimizer. CUDA only.

    DDP's hooks move each backward's gradients into its buffers, so the DFS engine's many backward
    calls per step accumulate there; ``finish_grad_sync`` reduces once. ``calculate_per_token_loss``
    makes the reduction a sum (our loss is normalized by the global denominator already).
    """

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, layout: ParallelLayout):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.transformer import TransformerConfig

        if layout.device != "cuda":
            raise ConfigError(
                "optimizer.backend=megatron needs CUDA: use optimizer.backend=torch or deepspeed on CPU"
            )
        mcfg = model.cfg
        dtype = next(model.parameters()).dtype
        bf16 = dtype == torch.bfloat16
        tcfg = TransformerConfig(
            num_layers=mcfg.num_layers,
            hidden_size=mcfg.hidden_size,
            num_attention_heads=mcfg.num_heads,
            tensor_model_parallel_size=layout.tp,
            params_dtype=dtype,
            bf16=bf16,
            calculate_per_token_loss=True,
        )
        self.ddp = DistributedDataParallel(
            tcfg,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
            ),
            module=model,
        )
        self.opt = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.betas[0],
                adam_beta2=cfg.betas[1],
                adam_eps=cfg.eps,
                clip_grad=cfg.grad_clip or 0.0,
                bf16=bf16,
                params_dtype=dtype,
                use_distributed_optimizer=True,
            ),
            [self.ddp],
        )
        self.layout = layout

    def accumulate(self):
        return contextlib.nullcontext()

    def step(self, lr: float) -> float:
        self.ddp.finish_grad_sync()
        _set_lr(self.opt, lr)
        _, grad_norm, _ = self.opt.step()
        self.zero_grad()
        return float(grad_norm or 0.0)

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # parameter states are gathered to DP rank 0 of each TP rank (a collective over DP)
        self.opt.save_parameter_state(str(directory / f"megatron_tp{self.layout.tp_rank}_params.pt"))
        if self.layout.dp_rank == 0:
            torch.save(self.opt.state_dict(), directory / f"megatron_tp{self.layout.tp_rank}.pt")

    def load(self, directory: Path) -> None:
        self.opt.load_state_dict(
            torch.load(directory / f"megatron_tp{self.layout.tp_rank}.pt", weights_only=False)
        )
        self.opt.load_parameter_state(str(directory / f"megatron_tp{self.layout.tp_rank}_params.pt"))


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, layout: ParallelLayout):
    cls = {"torch": TorchOptimizer, "deepspeed": DeepSpeedOptimizer, "megatron": MegatronOptimizer}[
        cfg.backend
    ]
    return cls(model, cfg, layout)
