"""The one owner of the parallel layout: TP x PP x DP degrees and their process groups.

Process groups come from megatron-core's ``parallel_state`` (order tp-cp-ep-dp-pp), so its
tensor-parallel layers find their group; everything else in megatron_dta receives a
``ParallelLayout`` explicitly instead of reading globals. Works over gloo on CPU and NCCL on GPU.
A single process without torchrun gets a world of size 1 on a private TCP port.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store under a prefix per restart attempt. torchrun hands the workers it restarts
    the store their killed predecessors used, without a prefix, so a restarted rank can read a dead
    rank's address and gloo waits on it until the timeout (seen: connectFullMesh "Connection
    refused" after a rank was SIGKILLed under --max-restarts 1)."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_hosts and rank == 0,
        timeout=max(timeout, datetime.timedelta(minutes=10)),  # start-up skew is not a hung rank
    )
    store = dist.PrefixStore(f"megatron_dta/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    # every rank up before any connects: a short parallel.timeout_s then bounds collectives only
    store.set(f"started/{rank}", "1")
    store.wait([f"started/{r}" for r in range(world)])
    return store


def init_distributed(device: str = "cpu", timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from torchrun's environment, or as a world of one. A collective
    that waits longer than ``timeout_s`` for another rank fails instead of hanging."""
    if dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:  # under torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = _per_attempt_store(rank, world, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    elif "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:  # not under torchrun: a private world of one (the environment is left untouched for children)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


@dataclass
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    device: str = "cpu"
    microbatches_in_flight: int | None = None  # per pipeline stage (None: 2 x pp)

    @classmethod
    def create(
        cls,
        tp: int = 1,
        pp: int = 1,
        device: str | None = None,
        microbatches_in_flight: int | None = None,
        timeout_s: float = 600.0,
    ) -> ParallelLayout:
        """Initialise distributed state; DP is whatever the world size leaves after TP x PP."""
        from megatron.core import parallel_state as ps

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        init_distributed(device, timeout_s)
        world = dist.get_world_size()
        if world % (tp * pp):
            raise ValueError(
                f"world size {world} is not divisible by tp x pp = {tp} x {pp}: "
                f"launch with a multiple of {tp * pp} processes or change parallel.tp / parallel.pp"
            )
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=timeout_s / 60,  # its groups get the same deadline
        )
        return cls(
            tp=tp, pp=pp, dp=world // (tp * pp), device=device, microbatches_in_flight=microbatches_in_flight
        )

    # groups and ranks, read from megatron's parallel_state so that its layers agree with us
    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def is_main(self) -> bool:
        return dist.get_rank() == 0


def shutdown() -> None:
    """Tear down the process groups in step on every rank: a rank that exits while gloo still
    serves another one's collective aborts ("terminate called without an active exception")."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_last_stage(obj, layout: ParallelLayout):
    """``obj`` as the last pipeline stage has it, on every stage (pipeline results live there)."""
    if layout.pp == 1:
        return obj
    from megatron.core import parallel_state as ps

    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(), group=layout.pp_group)
    return box[0]


def all_reduce_grads(model: torch.nn.Module, group) -> None:
    """Sum gradients over ``group`` (data parallel); one flat buffer per dtype to keep calls few."""
    if group is None or dist.get_world_size(group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def all_reduce_over(t: torch.Tensor, *groups, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``t`` in place over each group in turn (groups of one rank, or None, are skipped)."""
    for group in groups:
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_scalar(value: float, group, op=dist.ReduceOp.SUM) -> float:
    return all_reduce_over(torch.tensor([value], dtype=torch.float64), group, op=op).item()


def shard_indices(n: int, world: int, rank: int) -> list[int]:
    """Contiguous near-equal split of ``range(n)`` (the simple DP split; the balancer does better)."""
    bounds = [n * r // world for r in range(world + 1)]
    return list(range(bounds[rank], bounds[rank + 1]))
