"""Rollout records and the JSON Lines rollout file format.

One rollout per line: ``input_ids`` (list of int in [0, vocab)), ``loss_mask`` (0/1, entry 0 must be
0), ``advantages`` (a number or one per token), optional ``old_logprobs`` / ``ref_logprobs`` (one per
token, entry 0 ignored), optional ``group`` (any JSON scalar) and, for MoE models, optional
``routed_experts`` (per position, per MoE layer, the top-k expert ids the inference engine chose:
routing replay, docs/moe.md). Every record is validated while it
is read, so bad input is refused before any compute with one line naming file, line and field.
Loading streams line by line: memory is the parsed rollouts, not a copy of the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_dta.errors import UserError

OPTIONAL_LOGPROB_FIELDS = ("old_logprobs", "ref_logprobs")


class RolloutFormatError(UserError):
    """A user-input error in a rollout file; ``str()`` is the one-line message shown to users."""

    def __init__(self, path: str | Path, line: int, field_name: str, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field_name, problem
        super().__init__(f"{path}:{line}: field '{field_name}': {problem}")


@dataclass
class Rollout:
    """One validated rollout. Arrays have length L = len(input_ids)."""

    input_ids: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # int8 [L], entry 0 is 0
    advantages: np.ndarray  # float64 [L] (a scalar advantage is broadcast)
    old_logprobs: np.ndarray | None = None  # float64 [L], entry 0 ignored
    ref_logprobs: np.ndarray | None = None  # float64 [L], entry 0 ignored
    group: object = None
    extra: dict = field(default_factory=dict)  # unknown fields, written back unchanged
    routed_experts: np.ndarray | None = None  # int64 [L, MoE layers, top_k]: routing replay
    source: str | None = None  # "file:line" it was read from (error messages), not written back

    def __len__(self) -> int:
        return len(self.input_ids)

    def to_json(self) -> dict:
        out = dict(self.extra)
        out["input_ids"] = self.input_ids.tolist()
        out["loss_mask"] = self.loss_mask.tolist()
        adv = self.advantages
        out["advantages"] = float(adv[0]) if len(adv) and np.all(adv == adv[0]) else adv.tolist()
        for name in OPTIONAL_LOGPROB_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.tolist()
        if self.group is not None:
            out["group"] = self.group
        if self.routed_experts is not None:
            out["routed_experts"] = self.routed_experts.tolist()
        return out


def make_rollout(input_ids, loss_mask=None, advantages=1.0, **kw) -> Rollout:
    """Build a rollout from Python values (no validation beyond shapes); for generators and tests."""
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones(len(ids), dtype=np.int8) if loss_mask is None else np.array(loss_mask, dtype=np.int8)
    mask[0] = 0
    adv = np.broadcast_to(np.asarray(advantages, dtype=np.float64), ids.shape).copy()
    for name in OPTIONAL_LOGPROB_FIELDS:
        if kw.get(name) is not None:
            kw[name] = np.asarray(kw[name], dtype=np.float64)
    if kw.get("routed_experts") is not None:
        kw["routed_experts"] = np.asarray(kw["routed_experts"], dtype=np.int64)
    return Rollout(ids, mask, adv, **kw)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fits_float(x: float) -> bool:
    """False for a JSON integer too large for float64 (JSON integers have no size limit)."""
    try:
        float(x)
    except OverflowError:
        return False
    return True


def _float_list(values, length: int, fail) -> np.ndarray:
    if not isinstance(values, list):
        fail(f"expected a list of {length} numbers, got {type(values).__name__}")
    if len(values) != length:
        fail(f"length {len(values)} != len(input_ids) = {length}")
    if not all(_is_number(v) for v in values):
        fail("every entry must be a number")
    try:
        arr = np.asarray(values, dtype=np.float64)
    except OverflowError:
        j = next(j for j, v in enumerate(values) if not _fits_float(v))
        fail(f"integer at index {j} is too large for float64")
    if not np.all(np.isfinite(arr)):
        fail(f"NaN or infinite value at index {int(np.flatnonzero(~np.isfinite(arr))[0])}")
    return arr


def _routes(values, length: int, fail) -> np.ndarray:
    """``routed_experts``: [length][MoE layers][top_k] distinct non-negative expert ids per token."""
    shape_hint = "expected [len(input_ids)][MoE layers][top_k] integer expert ids"
    if not isinstance(values, list) or len(values) != length:
        fail(f"{shape_hint}: one entry per token ({length})")
    try:
        arr = np.asarray(values)
    except (ValueError, OverflowError):
        fail(f"{shape_hint} (a rectangular nested list)")
    if arr.ndim != 3 or arr.dtype.kind not in "iu" or arr.shape[1] == 0 or arr.shape[2] == 0:
        fail(f"{shape_hint} (a rectangular nested list)")
    if (arr < 0).any():
        j, m, _ = np.argwhere(arr < 0)[0]
        fail(f"negative expert id at position {j}, MoE layer {m}")
    same = np.sort(arr, axis=-1)
    dup = (same[..., 1:] == same[..., :-1]).any(-1)
    if dup.any():
        j, m = np.argwhere(dup)[0]
        fail(f"repeated expert id at position {j}, MoE layer {m}: a token's experts must be distinct")
    return arr.astype(np.int64)


def _all_finite(value) -> bool:
    """No NaN/inf float anywhere in a decoded JSON value (they are not valid JSON when written back)."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, dict):
            todo.extend(v.values())
    return True


def parse_rollout(
    record: object, vocab_size: int | None, path: str | Path = "<rollouts>", line: int = 1
) -> Rollout:
    """Validate one decoded JSON record; raises RolloutFormatError naming ``path:line`` and the field."""

    def fail(field_name: str, problem: str):
        raise RolloutFormatError(path, line, field_name, problem)

    if not isinstance(record, dict):
        fail("<record>", f"expected a JSON object, got {type(record).__name__}")
    for name in ("input_ids", "loss_mask", "advantages"):
        if name not in record:
            fail(name, "missing required field")

    ids = record["input_ids"]
    if not isinstance(ids, list) or not ids:
        fail("input_ids", "expected a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        fail("input_ids", "every entry must be an integer token id")
    length = len(ids)
    upper = vocab_size if vocab_size is not None else 2**63  # no vocabulary: the ids int64 holds
    try:
        input_ids = np.asarray(ids, dtype=np.int64)
    except OverflowError:  # JSON integers have no size limit: find the first bad token in Python
        bad = np.array([not 0 <= t < upper for t in ids])
    else:
        bad = (input_ids < 0) | (input_ids >= vocab_size) if vocab_size is not None else input_ids < 0
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        fail("input_ids", f"token {ids[j]} at index {j} is outside [0, {upper})")

    mask = record["loss_mask"]
    if not isinstance(mask, list):
        fail("loss_mask", "expected a list of 0/1")
    if len(mask) != length:
        fail("loss_mask", f"length {len(mask)} != len(input_ids) = {length}")
    if not all(type(m) is int and m in (0, 1) for m in mask):
        fail("loss_mask", "every entry must be 0 or 1")
    if mask[0] == 1:
        fail("loss_mask", "loss_mask[0] must be 0: the first token is never predicted")
    loss_mask = np.asarray(mask, dtype=np.int8)

    adv = record["advantages"]
    if _is_number(adv):
        if not _fits_float(adv):
            fail("advantages", "integer too large for float64")
        if not math.isfinite(adv):
            fail("advantages", "NaN or infinite value")
        advantages = np.full(length, float(adv), dtype=np.float64)
    else:
        advantages = _float_list(adv, length, lambda p: fail("advantages", p))

    optional = {}
    for name in OPTIONAL_LOGPROB_FIELDS:
        if record.get(name) is not None:
            optional[name] = _float_list(record[name], length, lambda p, n=name: fail(n, p))

    group = record.get("group")
    if group is not None and not isinstance(group, (str, int, float, bool)):
        fail("group", "must be a JSON scalar (string, number or boolean)")
    if isinstance(group, float) and not math.isfinite(group):
        fail("group", "NaN or infinite value")

    if record.get("routed_experts") is not None:
        optional["routed_experts"] = _routes(
            record["routed_experts"], length, lambda p: fail("routed_experts", p)
        )

    known = {"input_ids", "loss_mask", "advantages", "group", "routed_experts", *OPTIONAL_LOGPROB_FIELDS}
    extra = {k: v for k, v in record.items() if k not in known}
    for name, value in extra.items():
        if not _all_finite(value):
            fail(name, "NaN or infinite value")
    return Rollout(
        input_ids, loss_mask, advantages, group=group, extra=extra, source=f"{path}:{line}", **optional
    )


def iter_rollouts(path: str | Path, vocab_size: int | None = None) -> Iterator[Rollout]:
    """Stream validated rollouts from a JSONL file (blank lines are skipped)."""
    path = Path(path)
    try:
        handle = path.open("rb")  # json.loads decodes each line, so a binary file is a format error
    except OSError as exc:
        raise RolloutFormatError(path, 0, "<file>", f"cannot open: {exc.strerror}") from None
    seen = 0
    with handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                # NaN/Infinity decode to floats so that the field check below can name the field.
                record = json.loads(text)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise RolloutFormatError(path, line_no, "<json>", f"malformed JSON: {exc}") from None
            seen += 1
            yield parse_rollout(record, vocab_size, path, line_no)
    if seen == 0:
        raise RolloutFormatError(path, 0, "<file>", "empty file: no rollouts")


def load_rollouts(path: str | Path, vocab_size: int | None = None) -> list[Rollout]:
    return list(iter_rollouts(path, vocab_size))


def write_rollouts(path: str | Path, rollouts: Iterable[Rollout | dict]) -> None:
    """Write rollouts as JSON Lines atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rollouts:
            f.write(json.dumps(r.to_json() if isinstance(r, Rollout) else r) + "\n")
    tmp.replace(path)
