"""Named hardware profiles: what one accelerator (or one CPU process) computes, holds and moves.

A profile turns the work of a unit event (``cost.Work``: matmul FLOPs, attention FLOPs, bytes of
memory-bound traffic, kernel calls) into seconds, and a collective's bytes into seconds on the
link it crosses. GPU profiles are data-sheet peaks times kernel efficiencies; the attention
efficiency is the one the project measured (docs/benchmarks.md, H200, dense causal 16K, head dim 64),
the matmul efficiency is an assumption (stated in docs/scaling.md). A CPU profile is fitted to
this machine by ``tools/calibrate.py --profile-out`` (the same ``Work`` features, least squares).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from megatron_dta.errors import UserError

GIB = 1 << 30


@dataclass
class HardwareProfile:
    name: str
    memory_bytes: float  # usable memory of one device (one process on CPU)
    peak_flops: float  # dense matmul peak in the training dtype, FLOP/s
    matmul_efficiency: float  # achieved / peak for the linear layers
    attention_efficiency: float  # achieved / peak for attention (forward + backward)
    memory_bytes_per_s: float  # HBM (or DRAM) bandwidth for memory-bound work
    call_seconds: float  # fixed cost of one layer's kernels for one unit event (launches, DFS push/pop)
    intra_node_bytes_per_s: float  # per device, one direction (NVLink; shared memory on CPU)
    inter_node_bytes_per_s: float  # per device, one direction (InfiniBand)
    collective_latency_s: float  # per collective or point-to-point message
    devices_per_node: int = 8
    reserved_bytes: float = (
        0.0  # never available to tensors: CUDA context, NCCL buffers; the interpreter on CPU
    )
    attention_scores_materialized: bool = False  # the attention kernel writes [T, P+T] scores (CPU sdpa)
    fit_error: float | None = None  # rms relative error of the fit that produced a fitted profile

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float) and not (isinstance(value, (int, float)) and value >= 0):
                raise UserError(
                    f"hardware profile {self.name}: {f.name} must be a number >= 0, got {value!r}"
                )
        for name in ("peak_flops", "matmul_efficiency", "attention_efficiency", "memory_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"hardware profile {self.name}: {name} must be > 0")
        if self.devices_per_node < 1:
            raise UserError(f"hardware profile {self.name}: devices_per_node must be >= 1")

    def seconds(self, linear_flops, attention_flops, memory_bytes, calls):
        """Seconds of compute for the given work (scalars or numpy arrays alike)."""
        return (
            linear_flops / (self.peak_flops * self.matmul_efficiency)
            + attention_flops / (self.peak_flops * self.attention_efficiency)
            + memory_bytes / self.memory_bytes_per_s
            + calls * self.call_seconds
        )

    def link_bytes_per_s(self, group_span: int) -> float:
        """Bandwidth of a collective whose ranks span ``group_span`` consecutive global ranks: NVLink
        while they share a node, InfiniBand once they do not (a ring is as fast as its slowest hop)."""
        return (
            self.intra_node_bytes_per_s
            if group_span <= self.devices_per_node
            else self.inter_node_bytes_per_s
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


# Data sheets: H100 SXM and H200 SXM share the compute die (989 TFLOP/s dense bf16); H200 has
# 141 GB of HBM3e at 4.8 TB/s. NVLink 4: 450 GB/s per direction; one 400 Gb/s InfiniBand NIC
# per GPU: 50 GB/s. Efficiencies: attention 0.40 measured (dense causal 16K on an H200, the
# best case; DTA chunks under long prefixes reached 0.15, which the per-call cost and the prefix
# K/V traffic account for); matmul 0.60 assumed; 5 us per collective; 4 GiB reserved for the CUDA
# context, NCCL and the caching allocator's fragmentation.
_GPU = dict(
    peak_flops=989e12,
    matmul_efficiency=0.60,
    attention_efficiency=0.40,
    call_seconds=60e-6,
    intra_node_bytes_per_s=450e9,
    inter_node_bytes_per_s=50e9,
    collective_latency_s=5e-6,
    devices_per_node=8,
    reserved_bytes=4 * GIB,
)
PROFILES = {
    "h100": HardwareProfile("h100", memory_bytes=80 * GIB, memory_bytes_per_s=3.35e12, **_GPU),
    "h200": HardwareProfile("h200", memory_bytes=141e9, memory_bytes_per_s=4.8e12, **_GPU),
}
CPU_PROFILE = Path(__file__).resolve().parents[2] / "docs" / "hardware_cpu.json"


def load_profile(name_or_path: str) -> HardwareProfile:
    """A named profile (h100, h200, cpu: the one fitted on this project's CPU machine) or a JSON file."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = CPU_PROFILE if name_or_path == "cpu" else Path(name_or_path)
    if not path.is_file():
        raise UserError(
            f"--gpu {name_or_path}: not a profile name ({', '.join([*PROFILES, 'cpu'])}) nor a JSON file; "
            "write one with tools/calibrate.py --profile-out FILE"
        )
    try:
        data = json.loads(path.read_text())
        return HardwareProfile(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{path}: not a hardware profile ({exc})") from None
