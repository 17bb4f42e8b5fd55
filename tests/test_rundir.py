"""Tests of lib/rundir.py: the metrics logger, and one writer per run folder.

Oracles: the metrics file read back with json (one line per call, appended on resume) and the printed
progress lines; a second real process holding the folder's lock (claim_run_dir), whose death frees it.
Atomic writes are tested through their users: checkpoints.save (test_checkpoints.py) and tasks.write_jsonl
(test_tasks.py).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_rundir.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lib import rundir
from helpers import ROOT

torch.set_num_threads(1)


def test_metrics_logger_writes_one_json_line_per_call(tmp_path, capsys):
    logger = rundir.MetricsLogger(str(tmp_path), total=3)
    for step in (1, 2, 3):
        logger.log(step, loss=torch.tensor(1.5 / step), lr=0.1, note="ok")
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] == pytest.approx(0.75) and rows[0]["lr"] == 0.1 and rows[2]["note"] == "ok"
    out = capsys.readouterr().out
    assert out.count("\n") == 3 and "ETA" in out and "loss" in out
    again = rundir.MetricsLogger(str(tmp_path), append=True)
    again.log(4, echo=False, loss=0.1)
    again.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert capsys.readouterr().out == ""


CLAIM = "import sys, time; sys.path.insert(0, {root!r}); from lib import rundir; rundir.claim_run_dir({folder!r}); " \
        "print('claimed', flush=True); time.sleep(30)"


def test_a_second_writer_on_a_claimed_run_folder_is_refused(tmp_path):
    folder = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", CLAIM.format(root=ROOT, folder=folder)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        second = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); from lib import cli, rundir; "
                                 f"cli.run(lambda: rundir.save_args({folder!r}, {{'seed': 1}}))"], capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and f"pid {holder.pid}" in second.stderr and folder in second.stderr
        assert sorted(os.listdir(folder)) == [".lock"]          # nothing written by the refused writer
    finally:
        holder.kill()
        holder.wait()
    rundir.save_args(folder, {"seed": 2})                            # the lock died with its holder
    assert json.load(open(os.path.join(folder, "args.json"))) == {"seed": 2}
