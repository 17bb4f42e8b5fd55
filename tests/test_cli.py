"""Tests of lib/cli.py: arguments parsed from a dataclass, option checks, the cli.run entry point,
get_device and check_finite.

Oracles: the dataclass's own defaults and comments (parse_args and --help), each option rule's definition
(and numpy's own check for seeds), and a plain Python process: a rank run under torchrun (WORLD_SIZE 2) that
cli.run ends without the interpreter's shutdown gives the exit status, stdout and stderr of WORLD_SIZE 1; a
real SIGINT (the process signals itself) and a real Rust panic in tiktoken.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_cli.py
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from lib import cli
from helpers import DemoArgs, ROOT, RuleArgs

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Arguments from a dataclass, the entry point, devices, finite values
# ----------------------------------------------------------------------------------------------

def test_parse_args_defaults_flags_and_help(capsys):
    assert cli.parse_args(DemoArgs, []) == DemoArgs()
    args = cli.parse_args(DemoArgs, ["--lr", "0.1", "--group-size", "3", "--name", "x", "--no-compile"])
    assert args == DemoArgs(lr=0.1, group_size=3, name="x", compile=False)
    assert cli.parse_args(DemoArgs, ["--compile"]).compile is True
    with pytest.raises(SystemExit):
        cli.parse_args(DemoArgs, ["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for expected in ("peak learning rate", "completions sampled per prompt", "torch.compile the model",
                     "--group-size", "--no-compile", "0.0003", "default: 8"):
        assert expected in help_text
    with pytest.raises(SystemExit):
        cli.parse_args(DemoArgs, ["--group-size", "many"])


def test_get_device_and_cli(capsys):
    assert cli.get_device("cpu") == torch.device("cpu")
    with pytest.raises(cli.UserError):
        cli.get_device("tpu")

    def failing_main():
        raise cli.UserError("data.jsonl:3: bad line")
    with pytest.raises(SystemExit) as info:
        cli.run(failing_main)
    assert info.value.code == 2 and capsys.readouterr().err.strip() == "error: data.jsonl:3: bad line"


CLI_RANK = ("import atexit, sys; sys.path.insert(0, {root!r}); from lib import cli\n"
            "atexit.register(lambda: print('interpreter shutdown ran', flush=True))\n"
            "def main():\n"
            "    print('partial line, not yet flushed', end='')\n"
            "    {body}\n"
            "cli.run(main)\n")


@pytest.mark.parametrize("body, status, err", [
    ("pass", 0, ""),
    ("raise cli.UserError('rl.jsonl:2: bad line')", 2, "error: rl.jsonl:2: bad line"),
    ("raise SystemExit(130)", 130, ""),
    ("raise SystemExit('stopped')", 1, "stopped"),
    ("1 / 0", 1, "ZeroDivisionError"),
    ("raise KeyboardInterrupt", 130, "interrupted"),
    ("raise GeneratorExit('closed')", 1, "error: GeneratorExit: closed"),
])
@pytest.mark.parametrize("world_size", ["1", "2", "\u00b2"])     # "²" passes str.isdigit and fails int(): one process
def test_cli_ends_a_torchrun_rank_without_the_interpreter_shutdown_and_the_same_exit_status(body, status, err,
                                                                                           world_size):
    """A rank (WORLD_SIZE 2) skips the interpreter's shutdown, where a gloo worker thread that takes the GIL
    aborts the process: its atexit handlers do not run. Exit status, stdout (flushed) and stderr are what
    the interpreter gives a plain process (WORLD_SIZE 1), whose shutdown runs as usual."""
    done = subprocess.run([sys.executable, "-c", CLI_RANK.format(root=ROOT, body=body)], capture_output=True,
                          text=True, env={**os.environ, "WORLD_SIZE": world_size}, timeout=60)
    assert done.returncode == status, done.stderr
    shutdown = "interpreter shutdown ran\n" if world_size != "2" else ""
    assert done.stdout == "partial line, not yet flushed" + shutdown
    assert (err in done.stderr) if err else done.stderr == ""
    assert not (err.startswith("error: ") or err == "interrupted") or done.stderr == err + "\n"   # one line


@pytest.mark.parametrize("world_size", ["1", "abc", "\u00b2", "-2", ""])
def test_fsdp_outside_torchrun_is_one_line_naming_world_size(monkeypatch, world_size):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    args = type("Args", (), {"fsdp": True, "compile_train": False})()
    with pytest.raises(cli.UserError, match=f"WORLD_SIZE={world_size!r}"):
        cli.check_fsdp(args)


SIGINT_SCRIPT = ("import os, signal, sys, time; sys.path.insert(0, {root!r})\n"
                 "{start_up}\n"
                 "from lib import cli\n"
                 "def main():\n"
                 "    os.kill(os.getpid(), signal.SIGINT)\n"
                 "    time.sleep(1)\n"
                 "    print('main ran to its end', flush=True)\n"
                 "cli.run(main)\n"
                 "os.kill(os.getpid(), signal.SIGINT)\n"
                 "print('a SIGINT after cli.run did nothing', flush=True)\n")


@pytest.mark.parametrize("start_up, status, stdout, stderr", [
    ("signal.signal(signal.SIGINT, signal.default_int_handler)", 130, "",         # Python's own handler, set
     "interrupted\n"),                                  # here: a background job (CI under nohup) inherits SIG_IGN
    ("signal.signal(signal.SIGINT, signal.SIG_DFL)", 130, "", "interrupted\n"),   # a script's start-up setting
    ("signal.signal(signal.SIGINT, signal.SIG_IGN)", 0,                            # a background job's: kept
     "main ran to its end\na SIGINT after cli.run did nothing\n", ""),
])
def test_a_real_sigint_during_main_is_one_line_and_status_130_unless_the_process_ignores_it(start_up, status,
                                                                                            stdout, stderr):
    """main() signals its own process, as Ctrl-C does: "interrupted" and exit status 130 (128 + SIGINT), with
    Python's handler or SIG_DFL in place before cli.run; a process that ignores SIGINT (SIG_IGN: how a shell
    starts a background job) goes on ignoring it."""
    done = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT.format(root=ROOT, start_up=start_up)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (status, stdout, stderr)


def test_sig_dfl_is_back_after_main_so_a_later_sigint_ends_the_process_at_once():
    """A script that sets SIG_DFL before its imports gets it back once main() is done: a SIGINT then ends the
    process at once, silently (the default action: killed by SIGINT), as it would during the imports."""
    script = SIGINT_SCRIPT.format(root=ROOT, start_up="signal.signal(signal.SIGINT, signal.SIG_DFL)")
    script = script.replace("    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(1)\n", "")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (-signal.SIGINT, "main ran to its end\n", "")


def test_a_rust_panic_in_tiktoken_is_one_line_not_a_traceback():
    """pyo3's PanicException is a BaseException, not an Exception: cli.run prints it as one line (status 1)
    after the message that Rust itself writes to the stderr file descriptor."""
    body = ("import tiktoken\n"   # a split regex that matches the empty string makes tiktoken panic
            "def main():\n"
            "    tiktoken.Encoding(name='x', pat_str='', mergeable_ranks={b'a': 0}, special_tokens={}).encode('a')\n")
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from lib import cli\n"
                           + body + "cli.run(main)\n"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: PanicException: "), done.stderr


def test_check_finite_names_the_place_and_the_value():
    cli.check_finite("step 3", loss=torch.tensor(1.5), grad_norm=2.0)
    for bad in (float("nan"), float("inf"), torch.tensor([1.0, float("-inf")])):
        with pytest.raises(cli.NonFiniteError, match="step 3: loss"):
            cli.check_finite("step 3", loss=bad)


# ----------------------------------------------------------------------------------------------
# Option values: one-line errors, each rule's definition, resumed arguments
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [(["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--steps", "x"], "--steps"),
                                        (["--top-p", "-inf"], "--top-p")])
def test_non_finite_and_malformed_option_values_are_one_line_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(RuleArgs, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and flag in err and "usage" not in err


@given(value=st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_each_option_rule_matches_its_definition_and_nan_fails_all(value):
    args = RuleArgs(lr=value, top_p=value)
    definitions = {"positive": value > 0, "non_negative": value >= 0, "probability": 0 <= value <= 1,
                   "open_unit": 0 < value < 1}
    for rule, holds in definitions.items():
        if holds:
            cli.check_options(args, **{rule: ("lr",)})
        else:
            with pytest.raises(cli.UserError, match=r"^--lr must be"):
                cli.check_options(args, **{rule: ("lr",)})
    if math.isnan(value):
        assert not any(definitions.values())


@pytest.mark.parametrize("seed, ok", [(0, True), (2 ** 32 - 1, True), (-1, False), (2 ** 32, False)])
def test_seed_rule_is_what_numpy_accepts(seed, ok):
    args = RuleArgs(seed=seed)
    if ok:
        cli.check_options(args, seed=("seed",))
        np.random.seed(seed)
    else:
        with pytest.raises(cli.UserError, match="--seed"):
            cli.check_options(args, seed=("seed",))
        with pytest.raises(ValueError):
            np.random.seed(seed)


def test_resume_args_keeps_saved_values_and_announces_overrides(capsys):
    saved = {"lr": 0.5, "steps": 7, "top_p": 0.9, "seed": 3, "from_an_older_version": 1}
    args = cli.resume_args(RuleArgs, saved, ["--steps", "9"])
    assert (args.lr, args.steps, args.top_p, args.seed) == (0.5, 9, 0.9, 3)
    out = capsys.readouterr().out
    assert out.strip() == "--steps 9 given: overrides the saved 7"
