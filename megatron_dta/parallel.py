"""The one owner of the parallel layout: TP x CP x PP x DP degrees, this rank's place in them, and the
process groups.

``ParallelLayout.create`` initialises megatron-core's ``parallel_state`` (order tp-cp-ep-dp-pp, so
megatron's layers and their fallbacks agree with us), reads its groups once and holds them; nothing
else in megatron_dta touches ``parallel_state``. The model, the pipeline schedule, the optimizer and
the checkpointer receive the layout (or one of its groups) explicitly, as megatron-core's layers take
``tp_group`` and its schedules ``pg_collection``. Works over gloo on CPU and NCCL on GPU. A single
process without torchrun gets a world of size 1 on a private TCP port.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_dta.errors import ConfigError
from megatron_dta.grads import grad_of


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


@dataclass(frozen=True)
class ParallelLayout:
    """This rank in the TP x CP x PP x DP grid. Each dimension is three fields: its size (``tp``), this
    rank's index in it (``tp_rank``) and its group, the ranks that differ from this one only in it
    (``tp_group``). Context parallelism (``cp``: the ranks sharing every unit's tokens, engine/
    context_parallel.py) defaults to 1; gradients are summed over ``dp_cp_group`` (DP x CP, megatron's
    ``with_context_parallel=True`` group). Expert parallelism (``ep``: ranks that share their tokens
    and split the experts, docs/moe.md) likewise; CP and EP are not combined yet. A layout is a value:
    ``dataclasses.replace(layout, pp=1, pp_rank=0)`` describes the
    whole model on this rank (a reference model beside a pipeline stage)."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: ProcessGroup
    pp_group: ProcessGroup
    dp_group: ProcessGroup
    embedding_group: ProcessGroup | None  # first and last stage (else None): a tied embedding's copies
    rank: int  # global
    device: str = "cpu"
    microbatches_in_flight: int | None = None  # per pipeline stage (None: 2 x pp)
    # expert parallelism: ranks that share their tokens (like TP) and split the experts (docs/moe.md)
    ep: int = 1
    ep_rank: int = 0
    ep_group: ProcessGroup | None = None
    cp: int = 1
    cp_rank: int = 0
    cp_group: ProcessGroup | None = None  # None: cp = 1
    dp_cp_group: ProcessGroup | None = None  # gradient reduction (DP x CP); None: dp_group

    @classmethod
    def create(
        cls,
        tp: int = 1,
        pp: int = 1,
        device: str | None = None,
        microbatches_in_flight: int | None = None,
        timeout_s: float = 600.0,
        cp: int = 1,
        ep: int = 1,
    ) -> ParallelLayout:
        """Initialise distributed state; DP is whatever the world size leaves after TP x CP x EP x PP
        (CP and EP are not combined yet)."""
        from megatron.core import parallel_state as ps

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        init_distributed(device, timeout_s)
        world = dist.get_world_size()
        if cp > 1 and ep > 1:
            raise ConfigError(f"parallel.cp={cp} with parallel.ep={ep} is not supported yet: use one of them")
        if world % (tp * cp * ep * pp):
            raise ConfigError(
                f"world size {world} is not divisible by tp x cp x ep x pp = {tp} x {cp} x {ep} x {pp}: "
                f"launch with a multiple of {tp * cp * ep * pp} processes or change parallel.tp/cp/ep/pp"
            )
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            distributed_timeout_minutes=timeout_s / 60,  # its groups get the same deadline
        )
        return cls._from_parallel_state(device, microbatches_in_flight)

    @classmethod
    def _from_parallel_state(cls, device: str, microbatches_in_flight: int | None = None) -> ParallelLayout:
        from megatron.core import parallel_state as ps

        ep_group = ps.get_expert_model_parallel_group()
        groups = {
            "tp": ps.get_tensor_model_parallel_group(),
            "pp": ps.get_pipeline_model_parallel_group(),
            # megatron's EP group is ep consecutive DP ranks; here they share their tokens, so data
            # (and every gradient's all-reduce) is split over the expert-data-parallel group. Without
            # EP that group would span DP x CP: the plain DP group then.
            "dp": ps.get_expert_data_parallel_group()
            if ep_group.size() > 1
            else ps.get_data_parallel_group(),
            "ep": ep_group,
        }
        cp_group = ps.get_context_parallel_group()
        return cls(
            **{dim: group.size() for dim, group in groups.items()},
            **{f"{dim}_rank": group.rank() for dim, group in groups.items()},
            **{f"{dim}_group": group for dim, group in groups.items()},
            embedding_group=ps.get_embedding_group(check_initialized=False),
            rank=dist.get_rank(),
            device=device,
            microbatches_in_flight=microbatches_in_flight,
            cp=cp_group.size(),
            cp_rank=cp_group.rank(),
            cp_group=cp_group if cp_group.size() > 1 else None,
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True)
            if cp_group.size() > 1
            else None,
        )

    @property
    def grad_group(self) -> ProcessGroup:
        """The group whose gradients are summed: DP x CP (each CP rank holds its tokens' share)."""
        return self.dp_cp_group if self.dp_cp_group is not None else self.dp_group

    @property
    def stage(self) -> tuple[int, int]:
        """(pp_rank, pp): which pipeline stage of how many this rank holds."""
        return self.pp_rank, self.pp

    @property
    def prev_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (None on the first)."""
        return None if self.pp_rank == 0 else dist.get_global_rank(self.pp_group, self.pp_rank - 1)

    @property
    def next_rank(self) -> int | None:
        """Global rank of the next pipeline stage (None on the last)."""
        return None if self.pp_rank == self.pp - 1 else dist.get_global_rank(self.pp_group, self.pp_rank + 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def simulated_rank(rank: int, world: int, tp: int, pp: int, cp: int = 1, ep: int = 1):
    """The layout global rank ``rank`` of ``world`` would build, over torch's fake process groups (no
    communication, nothing allocated): megatron-core's ``parallel_state`` and the model's layers see
    the real sizes and ranks. For the planner; a process already running torch.distributed cannot."""
    from megatron.core import parallel_state as ps
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "the planner simulates its own world: run it in a process without torch.distributed"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            create_gloo_process_groups=False,
        )
        yield ParallelLayout._from_parallel_state("meta")
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


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
    box = [obj]
    dist.broadcast_object_list(box, group=layout.pp_group, group_src=layout.pp - 1)
    return box[0]


def all_reduce_grads(model: torch.nn.Module, group) -> None:
    """Sum gradients (main grads where attached: ``grads.grad_of``) over ``group`` (data parallel);
    one flat buffer per dtype to keep calls few."""
    if group is None or dist.get_world_size(group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if grad_of(p) is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict = {}
    for g in map(grad_of, params):
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in gs:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


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
