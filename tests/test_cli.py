"""The command line's contract: a user error is one line on stderr and exit code 2, any other
exception is a bug and keeps its traceback; ``train --help`` lists every config key.

The user-error cases run ``cli.main`` in this process (no model is built before the error), the
bug case a subprocess, so that what a user sees (traceback, exit code) is what is checked.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megatron_dta import cli
from megatron_dta.cli_util import user_errors
from megatron_dta.config import Config
from megatron_dta.errors import UserError
from megatron_dta.model.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``megatron-dta ARGV`` run in this process."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml: cannot read config"),
        (
            ["train", "data.cost_model={tmp}/missing.json"],
            "data.cost_model '{tmp}/missing.json' is not a file",
        ),
        (["train", "engine.attention=xformers"], "engine.attention 'xformers' must be one of"),
        (
            ["export", "--run-dir", "{tmp}/no_run", "--hf-out", "{tmp}/hf"],
            "{tmp}/no_run: no complete checkpoint",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    code, err = run_main([a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2
    assert err.splitlines() == [err.strip()] and err.startswith("error: "), err
    assert expected.format(tmp=tmp_path) in err


def test_malformed_cost_model_file_names_the_key(tmp_path, capsys):
    bad = tmp_path / "cost.json"
    bad.write_text('{"per_token": -1}')
    code, err = run_main(["train", f"data.cost_model={bad}"], capsys)
    assert code == 2 and err.startswith(f"error: data.cost_model {bad}: ") and "per_token" in err, err


def test_only_user_errors_are_caught():
    with pytest.raises(SystemExit) as info, user_errors():
        raise UserError("bad input")
    assert info.value.code == 2
    for bug in (ValueError("internal"), FileNotFoundError("internal"), RuntimeError("internal")):
        with pytest.raises(type(bug)), user_errors():
            raise bug


def test_an_internal_valueerror_keeps_its_traceback():
    """A plain ValueError from inside the train command (as a bug would raise it) is not a user error:
    the user sees the traceback and an exit code that is not 2."""
    patched = (
        "import sys\n"
        "import megatron_dta.train\n"
        "def broken(cfg, resume=False):\n"
        "    raise ValueError('internal invariant broken')\n"
        "megatron_dta.train.train = broken\n"
        "from megatron_dta.cli import main\n"
        "sys.exit(main(['train']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", patched], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert proc.returncode not in (0, 2), proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: internal invariant broken" in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


def config_sections() -> list[tuple[str, type]]:
    """(key prefix, dataclass) of every config section, and of the ModelConfig keys model.arch takes."""
    return [*typing.get_type_hints(Config).items(), ("model.arch", ModelConfig)]


@pytest.mark.parametrize("command", ["train", "logprobs"])
def test_help_lists_every_key_of_every_section(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # help text is wrapped to the terminal width
    keys = 0
    for prefix, section_cls in config_sections():
        for f in dataclasses.fields(section_cls):
            if not f.init:
                continue
            text = f.metadata.get("help", "")
            assert text, f"{prefix}.{f.name} has no help next to its field"
            assert f"\n  {prefix}.{f.name}: " in out, f"{prefix}.{f.name} is missing from --help"
            assert " ".join(text.split()) in flat, f"{prefix}.{f.name}: its help text is missing"
            keys += 1
    assert "\n  engine.pack_tokens: " in out and keys > 50
