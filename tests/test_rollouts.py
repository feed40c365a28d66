"""Rollout file validation: every bad input is refused with one line naming file, line and field."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_dta.forest import PrefixForest
from megatron_dta.rollouts import RolloutFormatError, load_rollouts, make_rollout, write_rollouts
from megatron_dta.synthetic import make_workload

TOOLS = Path(__file__).resolve().parents[1] / "tools"
VOCAB = 10
GOOD = {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "advantages": 0.5}


def record(**changes) -> str:
    """GOOD with fields replaced (a value of ... removes the field), as one JSON line."""
    rec = {k: v for k, v in {**GOOD, **changes}.items() if v is not ...}
    return json.dumps(rec)  # allow_nan: writes the non-standard NaN / Infinity a buggy producer would


# (bad line, field named in the error). The bad line is line 3 of its file, after a good line and a
# blank one, so the test also checks that line numbers count physical lines.
BAD_LINES = {
    "malformed_json": ('{"input_ids": [1, 2', "<json>"),
    "not_a_json_object": ("[1, 2, 3]", "<record>"),
    "not_utf8": (b"\xff\xfe\x00\x81garbage", "<json>"),
    "missing_input_ids": (record(input_ids=...), "input_ids"),
    "missing_loss_mask": (record(loss_mask=...), "loss_mask"),
    "missing_advantages": (record(advantages=...), "advantages"),
    "empty_input_ids": (record(input_ids=[]), "input_ids"),
    "mask_too_short": (record(loss_mask=[0, 1]), "loss_mask"),
    "advantages_too_long": (record(advantages=[0.0, 1.0, 2.0, 3.0]), "advantages"),
    "old_logprobs_too_short": (record(old_logprobs=[0.0]), "old_logprobs"),
    "token_equal_to_vocab": (record(input_ids=[1, VOCAB, 3]), "input_ids"),
    "token_negative": (record(input_ids=[1, -1, 3]), "input_ids"),
    "mask_value_2": (record(loss_mask=[0, 2, 1]), "loss_mask"),
    "mask_float": (record(loss_mask=[0, 1.0, 1]), "loss_mask"),
    "mask_bool": (record(loss_mask=[0, True, 1]), "loss_mask"),
    "mask_first_is_1": (record(loss_mask=[1, 1, 1]), "loss_mask"),
    "advantage_nan": (record(advantages=float("nan")), "advantages"),
    "advantage_list_inf": (record(advantages=[0.0, float("inf"), 1.0]), "advantages"),
    "ref_logprob_minus_inf": (record(ref_logprobs=[0.0, -1.0, float("-inf")]), "ref_logprobs"),
    "group_nan": (record(group=float("nan")), "group"),
    "extra_field_nan": (record(reward={"score": [1.0, float("nan")]}), "reward"),
    "input_ids_string": (record(input_ids="1 2 3"), "input_ids"),
    "token_float": (record(input_ids=[1, 2.5, 3]), "input_ids"),
    "token_bool": (record(input_ids=[1, True, 3]), "input_ids"),
    "loss_mask_dict": (record(loss_mask={"0": 0}), "loss_mask"),
    "advantages_string": (record(advantages="high"), "advantages"),
    "advantages_bool_entries": (record(advantages=[True, False, True]), "advantages"),
    "group_list": (record(group=[1, 2]), "group"),
    # JSON integers have no size limit: beyond int64 / float64 they are refused, not an OverflowError
    "token_beyond_int64": (record(input_ids=[1, 2**64, 3]), "input_ids"),
    "token_below_int64": (record(input_ids=[1, -(2**64), 3]), "input_ids"),
    "advantage_int_beyond_float64": (record(advantages=10**400), "advantages"),
    "advantages_int_beyond_float64": (record(advantages=[0, 10**400, 1]), "advantages"),
    "old_logprob_int_beyond_float64": (record(old_logprobs=[0, -(10**400), 0]), "old_logprobs"),
}


def write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def assert_refused(path: Path, line: int, field_name: str) -> str:
    with pytest.raises(RolloutFormatError) as info:
        load_rollouts(path, vocab_size=VOCAB)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: field '{field_name}': "), message
    assert "\n" not in message
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field_name)
    return message


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_names_file_line_and_field(tmp_path, case):
    bad, field_name = BAD_LINES[case]
    path = write_lines(tmp_path / f"{case}.jsonl", [record(), "", bad, record()])
    assert_refused(path, 3, field_name)


def test_nan_message_says_what_is_wrong(tmp_path):
    path = write_lines(tmp_path / "nan.jsonl", [record(advantages=[0.0, 1.0, float("nan")])])
    assert "NaN or infinite value at index 2" in assert_refused(path, 1, "advantages")


def test_out_of_range_message_names_token_and_vocab(tmp_path):
    path = write_lines(tmp_path / "oov.jsonl", [record(input_ids=[1, 2, 99])])
    assert f"token 99 at index 2 is outside [0, {VOCAB})" in assert_refused(path, 1, "input_ids")


def test_huge_integer_messages_name_the_index(tmp_path):
    path = write_lines(tmp_path / "big.jsonl", [record(input_ids=[1, 2, 10**23])])
    assert f"token {10**23} at index 2 is outside [0, {VOCAB})" in assert_refused(path, 1, "input_ids")
    path = write_lines(tmp_path / "big.jsonl", [record(ref_logprobs=[0, 0, 10**400])])
    assert "integer at index 2 is too large for float64" in assert_refused(path, 1, "ref_logprobs")


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["zero_bytes", "blank_lines"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert "empty file" in assert_refused(path, 0, "<file>")


def test_missing_file(tmp_path):
    assert "cannot open" in assert_refused(tmp_path / "absent.jsonl", 0, "<file>")


def test_round_trip(tmp_path):
    rollouts = [
        make_rollout([1, 2, 3], [0, 1, 1], 0.25, group="task-7"),
        make_rollout(
            [4, 5], [0, 1], [0.0, -1.5], old_logprobs=[0.0, -0.1], ref_logprobs=[0.0, -0.2], group=3
        ),
        make_rollout([9], advantages=-2.0),
    ]
    rollouts[0].extra = {"meta": {"turns": [1, 2], "source": "sim"}}
    write_rollouts(tmp_path / "r.jsonl", rollouts)
    loaded = load_rollouts(tmp_path / "r.jsonl", vocab_size=VOCAB)
    assert [r.to_json() for r in loaded] == [r.to_json() for r in rollouts]
    for a, b in zip(loaded, rollouts):
        for name in ("input_ids", "loss_mask", "advantages", "old_logprobs", "ref_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), name
        assert a.group == b.group and a.extra == b.extra


def run_tool(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / name), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TOOLS.parent,
    )


@pytest.mark.parametrize(
    "bad, extra, message",
    [
        (
            record(loss_mask=[1, 1, 1]),
            ["--vocab-size", VOCAB],
            ":2: field 'loss_mask': loss_mask[0] must be 0: the first token is never predicted",
        ),
        # without --vocab-size the only bound on a token id is what int64 holds
        (
            record(input_ids=[1, 99999999999999999999999, 3]),
            [],
            f":2: field 'input_ids': token 99999999999999999999999 at index 1 is outside [0, {2**63})",
        ),
    ],
)
def test_tree_stats_bad_file_exits_2_with_one_line(tmp_path, bad, extra, message):
    path = write_lines(tmp_path / "bad.jsonl", [record(), bad])
    result = run_tool("tree_stats.py", path, *extra)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"{path}{message}"
    assert result.stdout == ""


def test_make_rollouts_then_tree_stats_json(tmp_path):
    out = tmp_path / "demo.jsonl"
    made = run_tool("make_rollouts.py", "--workload", "demo", "--vocab-size", 500, "--seed", 3, "--out", out)
    assert made.returncode == 0, made.stderr
    expected = make_workload("demo", 500, seed=3)
    assert [r.to_json() for r in load_rollouts(out, 500)] == [r.to_json() for r in expected]

    result = run_tool("tree_stats.py", out, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert stats == json.loads(json.dumps(PrefixForest([r.input_ids for r in expected]).stats()))
    assert {
        "sequences",
        "total_tokens",
        "unique_tokens",
        "sharing_ratio",
        "nodes",
        "max_depth",
        "trees",
    } <= set(stats)


def test_make_rollout_leaves_callers_mask_alone():
    mask = np.ones(3, dtype=np.int8)
    assert make_rollout([1, 2, 3], mask).loss_mask.tolist() == [0, 1, 1]
    assert mask.tolist() == [1, 1, 1]
