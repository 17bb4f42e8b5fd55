"""Tests of lib/stages.py: a missing default input made by running its upstream stage, and the command
line that runs a stage.

Oracles: small scripts written by the test stand in for the upstream stage (ensure_input), and cli.parse_args
reads stage_command's arguments back to the same fields.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_stages.py
"""
from __future__ import annotations

import shlex

import pytest
import torch

from lib import cli, stages
from helpers import RuleArgs

torch.set_num_threads(1)


def test_ensure_input_user_named_missing_path_is_an_error_and_default_runs_upstream(tmp_path):
    named = str(tmp_path / "mine.jsonl")
    with pytest.raises(cli.UserError, match="mine.jsonl"):
        stages.ensure_input(named, str(tmp_path / "default.jsonl"), ["synth.py"])
    existing = tmp_path / "there.jsonl"
    existing.write_text("{}\n")
    assert stages.ensure_input(str(existing), "other", ["synth.py"]) == str(existing)
    default = tmp_path / "default.jsonl"
    maker = tmp_path / "maker.py"           # an absolute script path stands in for the upstream stage
    maker.write_text("import sys\nopen(sys.argv[1], 'w').write('{}\\n')\n")
    assert stages.ensure_input(str(default), str(default), [str(maker), str(default)]) == str(default)
    assert default.exists()
    failing = tmp_path / "fail.py"
    failing.write_text("raise SystemExit(3)\n")
    with pytest.raises(cli.UserError, match="default2.jsonl"):
        stages.ensure_input(str(tmp_path / "default2.jsonl"), str(tmp_path / "default2.jsonl"), [str(failing)])


def test_stage_command_parses_back_to_the_same_fields():
    command = stages.stage_command("x.py", lr=0.25, steps=3, top_p=0.5)
    assert command[0] == "x.py"
    args = cli.parse_args(RuleArgs, command[1:])
    assert (args.lr, args.steps, args.top_p) == (0.25, 3, 0.5)
    assert stages.stage_command("x.py", control=True, png=False) == ["x.py", "--control", "--no-png"]


def test_a_printed_command_line_splits_back_into_the_same_arguments():
    """shell_line quotes what a shell would split: a system prompt with spaces, quotes and newlines is one argument."""
    command = stages.stage_command("grpo.py", system_prompt="Solve it.\nQ: 1+1=?\nA: it's 2\n#### 2", out="runs/a b")
    assert shlex.split(stages.shell_line(command)) == ["python", *command]
