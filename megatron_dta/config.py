"""Training configuration: one dataclass per component, filled from YAML plus `section.key=value`.

Each component owns its dataclass, documents every field next to it
(``field(metadata={"help": ...})``) and validates it in ``__post_init__``, raising ``ConfigError``
(loss: ``LossConfig``, engine: ``EngineConfig``, optimizer: ``OptimizerConfig``, ...); this module
only assembles them into ``Config`` and lists their keys for ``--help`` (``config_help``). Loading
checks every key and value type against the dataclass fields before any component sees them, so a
mistake is refused with one line naming the YAML file (or the override), the key and what to
change. The defaults are the CPU demo: a tiny model on the synthetic multi-turn workload.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_dta.checkpoint import CheckpointConfig
from megatron_dta.data import DataConfig
from megatron_dta.engine import EngineConfig
from megatron_dta.errors import ConfigError
from megatron_dta.losses import LossConfig
from megatron_dta.metrics import LoggingConfig
from megatron_dta.model.config import PRESETS, ModelConfig, preset
from megatron_dta.optim import OptimizerConfig

DTYPES = ("float32", "float64", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelSection:
    """Where the architecture and weights come from: a named preset (random init), a local HF
    checkpoint directory (architecture from its config.json), or neither: ``arch`` alone over the
    ModelConfig defaults. ``arch`` holds ModelConfig fields that replace the preset's."""

    preset: str | None = field(
        default="tiny",
        metadata={"help": f"a named architecture, randomly initialised: one of {', '.join(PRESETS)}"},
    )
    hf_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": (
                "a local HF checkpoint directory (config.json + *.safetensors): architecture and weights; "
                "set model.preset to null"
            )
        },
    )
    arch: dict = field(
        default_factory=dict,
        metadata={
            "help": (
                "ModelConfig fields replacing the preset's (model.arch.KEY, listed below); not with "
                "hf_checkpoint"
            )
        },
    )

    def __post_init__(self):
        if self.preset is not None and self.hf_checkpoint is not None:
            raise ConfigError(
                "set at most one of model.preset (random init) and model.hf_checkpoint "
                "(a local HF directory); set the other to null"
            )
        if self.hf_checkpoint is not None and self.arch:
            raise ConfigError(
                f"model.arch {sorted(self.arch)} cannot change an HF checkpoint's architecture: "
                "remove model.arch or use model.preset"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"model.preset '{self.preset}' is unknown; choose one of {sorted(PRESETS)}")
        if self.hf_checkpoint is None:
            self.model_config()  # validates arch now rather than when the model is built

    def model_config(self) -> ModelConfig:
        base = (preset(self.preset) if self.preset is not None else ModelConfig()).to_dict()
        if {"hidden_size", "num_heads"} & set(self.arch) and "head_dim" not in self.arch:
            base["head_dim"] = None  # recomputed from hidden_size // num_heads
        hints = typing.get_type_hints(ModelConfig)
        for key, value in self.arch.items():
            if key not in hints:
                raise ConfigError(f"unknown key model.arch.{key}; valid keys: {', '.join(sorted(hints))}")
            try:
                base[key] = _coerce(value, hints[key])
            except TypeError as exc:
                raise ConfigError(f"model.arch.{key}: expected {exc}, got {value!r}") from None
        return ModelConfig(**base)


@dataclass
class ParallelConfig:
    """Parallel degrees; data parallelism is whatever the world size leaves (world / (tp * cp * pp))."""

    tp: int = field(
        default=1,
        metadata={
            "help": "tensor-parallel degree; divides model.num_heads, num_kv_heads and intermediate_size"
        },
    )
    pp: int = field(
        default=1, metadata={"help": "pipeline stages (DFS pipeline schedule); divides model.num_layers"}
    )
    ep: int = field(
        default=1,
        metadata={
            "help": "expert-parallel degree (MoE): ranks sharing tokens, experts split; divides num_experts"
        },
    )
    microbatches_in_flight: int | None = field(
        default=None,
        metadata={"help": "pp > 1: microbatches a stage runs interleaved; null: 2 x pp (docs/pipeline.md)"},
    )
    cp: int = field(
        default=1,
        metadata={
            "help": (
                "context-parallel degree: ranks that share every unit's tokens and K/V stacks, for paths "
                "too long for one rank (docs/context_parallel.md); with tp and dp, not yet with pp"
            )
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": f"one of {', '.join(DEVICES)}; auto: cuda when a GPU is visible, else cpu"},
    )
    timeout_s: float = field(
        default=600.0,
        metadata={"help": "seconds a collective waits for another rank before failing, naming the operation"},
    )

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ConfigError(f"parallel.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.tp < 1:
            raise ConfigError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.pp < 1:
            raise ConfigError(f"parallel.pp must be >= 1, got {self.pp}")
        if self.ep < 1:
            raise ConfigError(f"parallel.ep must be >= 1, got {self.ep}")
        if self.cp < 1:
            raise ConfigError(f"parallel.cp must be >= 1, got {self.cp}")
        if self.cp > 1 and self.ep > 1:
            raise ConfigError(
                f"parallel.cp={self.cp} with parallel.ep={self.ep} is not supported yet: use one of them"
            )
        if self.microbatches_in_flight is not None and self.microbatches_in_flight < 1:
            raise ConfigError(
                f"parallel.microbatches_in_flight must be >= 1 or null (pp), "
                f"got {self.microbatches_in_flight}"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"parallel.device '{self.device}' must be one of {DEVICES}")


@dataclass
class TrainConfig:
    steps: int = field(default=6, metadata={"help": "optimizer updates"})
    seed: int = field(default=0, metadata={"help": "model initialisation (presets)"})
    dtype: str = field(
        default="float32",
        metadata={"help": "parameters and compute: float32, float64 (exactness checks) or bfloat16"},
    )
    max_bad_steps: int = field(
        default=3,
        metadata={"help": "consecutive steps skipped for a non-finite loss or gradient before the run stops"},
    )

    def __post_init__(self):
        if self.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"train.dtype '{self.dtype}' must be one of {DTYPES}")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.optimizer.backend == "deepspeed" and self.train.dtype == "float64":
            raise ConfigError(
                "optimizer.backend=deepspeed keeps float32 master weights, so train.dtype=float64 "
                "would not be float64: use optimizer.backend=torch or train.dtype=float32"
            )
        if self.parallel.pp > 1 and self.optimizer.backend != "torch":
            raise ConfigError(
                f"parallel.pp={self.parallel.pp} needs optimizer.backend=torch (its clipping norm spans "
                f"the pipeline stages); optimizer.backend={self.optimizer.backend} supports parallel.pp=1"
            )
        if self.parallel.ep > 1 and self.optimizer.backend != "torch":
            raise ConfigError(
                f"parallel.ep={self.parallel.ep} needs optimizer.backend=torch (its clipping norm sums the "
                f"experts over EP ranks); optimizer.backend={self.optimizer.backend} supports parallel.ep=1"
            )
        if self.parallel.cp > 1 and self.optimizer.backend != "torch":
            raise ConfigError(
                f"parallel.cp={self.parallel.cp} needs optimizer.backend=torch (gradients are summed over "
                f"DP x CP); optimizer.backend={self.optimizer.backend} supports parallel.cp=1"
            )
        if self.parallel.cp > 1 and self.engine.attention not in ("auto", "sdpa"):
            raise ConfigError(
                f"parallel.cp={self.parallel.cp} runs its own exact attention over gathered K/V: set "
                f"engine.attention to auto or sdpa (got {self.engine.attention})"
            )
        if self.engine.memory_budget_mib is not None and self.parallel.pp > 1:
            raise ConfigError(
                "engine.memory_budget_mib plans one whole model's memory: use parallel.pp=1 or set "
                "engine.memory_budget_mib to null"
            )
        if self.optimizer.backend == "megatron" and self.parallel.device == "cpu":
            raise ConfigError(
                "optimizer.backend=megatron needs CUDA: use optimizer.backend=torch or deepspeed on CPU"
            )

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
        """The defaults, replaced by the YAML file's values, replaced by ``section.key=value`` overrides."""
        raw: dict = {}
        source = "defaults"
        if path is not None:
            source = str(path)
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
            try:
                raw = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                where = f"{path}:{mark.line + 1}" if mark else str(path)
                raise ConfigError(f"{where}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
            if not isinstance(raw, dict):
                raise ConfigError(
                    f"{path}: expected a mapping of sections (model:, data:, ...), got {type(raw).__name__}"
                )
        origin = {}
        for item in overrides:
            key, value = _parse_override(item)
            _set_path(raw, key, value, item)
            origin[".".join(key.split(".")[:2])] = f"override '{item}'"
        return cls.from_dict(raw, source, origin)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", origin: dict | None = None) -> Config:
        origin = origin or {}
        hints = typing.get_type_hints(cls)
        _reject_unknown(raw, hints, source, origin, "", "section")
        sections = {}
        for name, section_cls in hints.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {values!r}")
            sections[name] = _build(section_cls, values, name, source, origin)
        try:
            return cls(**sections)
        except ConfigError as exc:
            raise ConfigError(f"{_where(str(exc), source, origin)}: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or key.count(".") < 1 or not all(key.split(".")):
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. optimizer.lr=1e-5)")
    try:
        return key, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key, value


def _set_path(raw: dict, key: str, value, item: str) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{p}' is not a section")
    node[last] = value


def _where(message: str, source: str, origin: dict) -> str:
    """The override a message is about (it names the key), else the YAML file."""
    return next((where for key, where in origin.items() if key in message), source)


def _reject_unknown(values: dict, hints: dict, source: str, origin: dict, prefix: str, kind: str) -> None:
    for key in values:
        if key not in hints:
            close = difflib.get_close_matches(str(key), hints, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            where = origin.get(f"{prefix}{key}") or next(
                (w for k, w in origin.items() if not prefix and k.split(".")[0] == key), source
            )
            raise ConfigError(
                f"{where}: unknown {kind} '{prefix}{key}'{hint}; valid {kind}s"
                f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(hints)}"
            )


def _build(section_cls, values: dict, name: str, source: str, origin: dict):
    hints = {
        k: v
        for k, v in typing.get_type_hints(section_cls).items()
        if k in {f.name for f in dataclasses.fields(section_cls) if f.init}
    }
    _reject_unknown(values, hints, source, origin, name + ".", "key")
    kwargs = {}
    for key, value in values.items():
        where = origin.get(f"{name}.{key}", source)
        try:
            kwargs[key] = _coerce(value, hints[key])
        except TypeError as exc:
            raise ConfigError(f"{where}: {name}.{key}: expected {exc}, got {value!r}") from None
    try:
        return section_cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{_where(str(exc), source, origin)}: {exc}") from None


def _coerce(value, hint):
    """``value`` as the annotated type; TypeError(description of the type) when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option)
            except TypeError:
                pass
        raise TypeError(_describe(hint))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)) and (not args or len(value) == len(args)):
            return tuple(_coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)
    elif (origin is dict or hint is dict) and isinstance(value, dict):
        return value
    raise TypeError(_describe(hint))


def _describe(hint) -> str:
    """The values a YAML key of type ``hint`` takes, in words ("an integer or null")."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        named = " or ".join(_describe(a) for a in args if a is not type(None))
        return named + (" or null" if type(None) in args else "")
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(typing.get_args(hint))} values"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
    }.get(hint, str(hint))


def config_help(width: int = 100) -> str:
    """Every key of every section, with its type, default and help (the key listing of ``--help``).

    Generated from the section dataclasses' fields, so it cannot drift from what loading accepts;
    ``model.arch.KEY`` lists the ModelConfig fields that ``model.arch`` may replace.
    """
    lines = []
    for name, section_cls in typing.get_type_hints(Config).items():
        lines.append(f"{name}:")
        lines += _keys_help(section_cls, name, width)
    lines.append("model.arch (over the preset's values; with no preset, over these defaults):")
    lines += _keys_help(ModelConfig, "model.arch", width)
    return "\n".join(lines)


def _keys_help(section_cls, prefix: str, width: int) -> list[str]:
    hints = typing.get_type_hints(section_cls)
    lines = []
    for f in dataclasses.fields(section_cls):
        if not f.init:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        lines.append(f"  {prefix}.{f.name}: {_describe(hints[f.name])}, default {json.dumps(default)}")
        indent = " " * 6
        lines += textwrap.wrap(
            f.metadata["help"], width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
        )
    return lines
