"""The pipeline's links: one stage runs another, in its own process, to make a missing default input.

    synth.py -> data/*.jsonl -> sft.py -> runs/sft/model.pt -> grpo.py (and ppo.py, with reward.py's model)

A command line for another stage is built from that stage's own Args field names (stage_command), and
tests/test_pipeline.py parses every such command with the target's parser.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from lib import cli

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # where the stage scripts are

def stage_command(script: str, **options) -> list[str]:
    """The command line of another stage from its Args field names: stage_command("sft.py", init="a.pt",
    control=False) -> ["sft.py", "--init", "a.pt", "--no-control"]. tests/test_pipeline.py parses every
    command built this way with the target's own parser."""
    command = [script]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            command += [flag, str(value)]
    return command


def check_named_inputs(*inputs) -> None:
    """inputs: (path, default_path) pairs. Before a stage makes any missing default input (which can take
    minutes: data, then an SFT start), every input the user named must exist, so that a typo in the last one
    is one line at once, not an error after the upstream stages have run."""
    for path, default_path in inputs:
        if not os.path.exists(path) and os.path.normpath(path) != os.path.normpath(default_path):
            raise cli.UserError(f"{path}: no such file")


def ensure_inputs(*inputs) -> None:
    """inputs: (path, default_path, command) triples. Every input the user named is checked first
    (check_named_inputs), then each missing default is made in order (ensure_input)."""
    check_named_inputs(*((path, default_path) for path, default_path, _ in inputs))
    for path, default_path, command in inputs:
        ensure_input(path, default_path, command)


def ensure_input(path: str, default_path: str, command: list[str]) -> str:
    """A stage's input: if `path` exists, use it. If it is missing and is the stage's default, make it by
    running the upstream stage (`command` = script and its arguments, run with this Python, printed
    first). If the user named it explicitly, that is an error naming the path."""
    if os.path.exists(path):
        return path
    check_named_inputs((path, default_path))
    print(f"{path} is missing; making it with: {shell_line(command)}", flush=True)
    try:
        run_stage(command, echo=False)
    except cli.UserError as e:
        raise cli.UserError(f"{path}: could not make it: {e}") from None
    if not os.path.exists(path):
        raise cli.UserError(f"{path}: `{shell_line(command)}` finished without making it")
    return path


def shell_line(command: list[str]) -> str:
    """The command as a line a shell runs as given: `python` and each argument quoted where it must be (a system
    prompt with spaces or newlines stays one argument)."""
    return shlex.join(["python", *command])


def run_stage(command: list[str], echo: bool = True) -> None:
    """Run another stage of the pipeline in its own process: `command` = a script beside model.py and its
    arguments, run with this Python. A non-zero exit is a UserError naming the command."""
    script = os.path.join(PROJECT_ROOT, command[0])
    if echo:
        print(f"running: {shell_line(command)}", flush=True)
    result = subprocess.run([sys.executable, script, *command[1:]])
    if result.returncode != 0:
        raise cli.UserError(f"`{shell_line(command)}` failed with exit status {result.returncode}")

