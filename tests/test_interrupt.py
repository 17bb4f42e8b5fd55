"""Ctrl-C (SIGINT) at any moment of `python sft.py`: no traceback, at most one line on stderr, a non-zero exit
status, and a run folder whose files are whole.

Oracles: the files read back by their own readers (checkpoints.load, json), the operating system's lock on the
folder (free once the process is gone), and the process's own exit status and stderr.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_interrupt.py
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lib import checkpoints
from helpers import ROOT

SFT = os.path.join(ROOT, "sft.py")
# The start-up lines a concept file needs so that Ctrl-C while torch imports ends it at once, silently
# (cli.run turns SIGINT back into KeyboardInterrupt for main()); without them the import prints a traceback.
with open(SFT, encoding="utf-8") as source:
    SETS_START_UP_SIGINT = "signal.signal(signal.SIGINT, signal.SIG_DFL)" in source.read()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def start_sft(tmp_path, max_steps):
    """`python sft.py` on a tiny model and tiny data, its stdout unbuffered (so each line marks a moment).
    The final eval (16 greedy answers of 20 tokens, one at a time) lasts a second or more."""
    pairs = list(zip(range(10, 34), range(30, 54)))
    train = write_rows(tmp_path / "train.jsonl", [{"prompt": f"{a}+{b}=?\n", "completion": f"#### {a + b}"}
                                                  for a, b in pairs])
    heldout = write_rows(tmp_path / "heldout.jsonl", [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b)}
                                                      for a, b in pairs[:16]])
    argv = ["--data", train, "--test-data", train, "--eval-data", heldout, "--out", str(tmp_path / "run"),
            "--n-layer", "1", "--n-head", "2", "--n-kv-head", "2", "--n-embd", "32", "--block-size", "64",
            "--batch-size", "6", "--max-steps", str(max_steps), "--eval-every", "0", "--eval-minutes", "0",
            "--n-eval", "16", "--max-new-tokens", "20", "--eval-batch", "1", "--log-every", "1",
            "--device", "cpu", "--threads", "1"]
    # started as from a terminal, SIGINT at its default: a background job (pytest under nohup) inherits SIG_IGN
    return subprocess.Popen([sys.executable, SFT, *argv], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def interrupt(process, when):
    """Send SIGINT after `when` seconds (a number) or right after the stdout line that starts with `when`;
    -> (exit status, stdout, stderr)."""
    out = []
    try:
        if isinstance(when, str):
            for line in process.stdout:
                out.append(line)
                if line.startswith(when):
                    break
            else:
                pytest.fail(f"sft.py ended before printing {when!r}: {''.join(out)[-2000:]}")
        else:
            time.sleep(when)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:   # a run the signal did not end: no process outlives the test
            process.kill()
            process.wait()
    return process.returncode, "".join(out) + stdout, stderr


MOMENTS = {   # name -> (when to send SIGINT, steps of the run)
    "start-up: importing torch": (0.3, 10 ** 6),
    "set-up done, the first step starting": ("sft: ", 10 ** 6),
    "training": ("step 3/", 10 ** 6),
    "the final eval, before its save": ("step 4/4 | kind train", 4),
}


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
    """Every moment's run at once (each is mostly the interpreter importing torch): {moment: (folder, result)}."""
    folders = {moment: tmp_path_factory.mktemp("interrupt") for moment in MOMENTS}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(MOMENTS)) as pool:
        results = {moment: pool.submit(lambda m: interrupt(start_sft(folders[m], MOMENTS[m][1]), MOMENTS[m][0]), moment)
                   for moment in MOMENTS}
        return {moment: (folders[moment], results[moment].result()) for moment in MOMENTS}


@pytest.mark.parametrize("moment", [
    pytest.param(name, marks=pytest.mark.xfail(
        name.startswith("start-up") and not SETS_START_UP_SIGINT, strict=True,
        reason="sft.py does not yet set SIGINT to SIG_DFL before its imports (issue 36)")) for name in MOMENTS])
def test_sigint_at_any_moment_is_one_line_and_leaves_a_whole_run_folder(interrupted_runs, moment):
    """Whatever the moment: no traceback, at most one line on stderr ("interrupted" from cli.run, nothing at
    all where SIG_DFL ends the process, or sft.py's own message on stdout), a non-zero exit status; then the
    folder's files are whole (model.pt loads, args.json and every metrics line parse), no temporary file is
    left, and the lock is free for the next run."""
    folder, (status, stdout, stderr) = interrupted_runs[moment]
    assert status != 0 and "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, (status, stderr)
    run = folder / "run"
    if moment == "training":   # sft.py's own handler saved the last finished step for --resume
        assert "interrupted after step" in stdout and status == 130, stdout[-500:]
        assert checkpoints.load(str(run / "model.pt"))[2]["meta"]["step"] >= 3
    if not run.exists():
        return
    if (run / "model.pt").exists():
        checkpoints.load(str(run / "model.pt"))
    if (run / "args.json").exists():
        json.loads((run / "args.json").read_text())
    if (run / "metrics.jsonl").exists():
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [name for name in os.listdir(run) if name.endswith(".tmp")]
    with open(run / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # raises if a writer still held the folder
