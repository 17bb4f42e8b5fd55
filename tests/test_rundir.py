"""Tests of lib/rundir.py: the metrics logger, and one writer per run folder.

Oracles: the metrics file read back with json (one line per call, appended on resume) and the printed
progress lines; a second real process holding the folder's lock (claim_run_dir), whose death frees it;
the folder's listing and contents around atomic_folder (a whole folder or the old one) and the cleanup of
temporary folders left by a process that has exited. Atomic writes are tested through their users too:
checkpoints.save and export (test_checkpoints.py, with a writer killed mid-write) and tasks.write_jsonl
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

from lib import cli, rundir
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


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): a killed writer's."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_atomic_folder_replaces_a_folder_whole_or_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "export"
    with rundir.atomic_folder(str(target)) as folder:
        assert folder == rundir.temp_path(str(target)) and os.listdir(folder) == []   # named as cleanup expects
        (tmp_path / folder / "a.txt").write_text("first")
    assert os.listdir(tmp_path) == ["export"] and os.listdir(target) == ["a.txt"]
    with pytest.raises(RuntimeError, match="crash"):
        with rundir.atomic_folder(str(target)) as folder:
            (tmp_path / folder / "b.txt").write_text("second")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == ["export"] and os.listdir(target) == ["a.txt"]
    with rundir.atomic_folder(str(target)) as folder:
        (tmp_path / folder / "b.txt").write_text("second")
    assert os.listdir(tmp_path) == ["export"] and os.listdir(target) == ["b.txt"]   # a.txt went with the old folder


def test_stale_temp_folders_are_removed_and_a_folder_set_aside_is_put_back(tmp_path):
    """A dead writer's temporary folder is deleted, and one named with this process's pid (a pid reused after a
    restart), and a live one's kept; a dead writer's folder set aside (.old) comes back when the folder itself
    is missing (killed between atomic_folder's two renames), and is deleted when the new one made it in."""
    dead, live = dead_pid(), os.getppid()
    target = tmp_path / "export"
    for name in (f".export.{dead}.tmp", f".export.{live}.tmp", f".export.{os.getpid()}.tmp", f".export.{dead}.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    rundir.remove_stale_temps(str(target))
    assert sorted(os.listdir(tmp_path)) == sorted(["export", f".export.{live}.tmp"])
    assert (target / "config.json").read_text() == f".export.{dead}.old"
    (tmp_path / f".export.{dead}.old").mkdir()
    rundir.remove_stale_temps(str(target))
    assert sorted(os.listdir(tmp_path)) == sorted(["export", f".export.{live}.tmp"])
    assert (target / "config.json").read_text() == f".export.{dead}.old"


@pytest.mark.parametrize("existing", ["file", "folder of other things"])
def test_check_replaceable_refuses_what_the_writer_did_not_write(tmp_path, existing):
    target = tmp_path / "export"
    rundir.check_replaceable(str(target), "config.json")            # new: fine
    target.mkdir()
    rundir.check_replaceable(str(target), "config.json")            # empty: fine
    (target / "config.json").write_text("{}")
    rundir.check_replaceable(str(target), "config.json")            # an earlier export: fine
    (target / "config.json").unlink()
    (target / "notes.txt").write_text("mine")
    if existing == "file":
        (target / "notes.txt").rename(tmp_path / "notes.txt")
        target.rmdir()
        (tmp_path / "notes.txt").rename(target)
    with pytest.raises(cli.UserError, match=f"^{target}: exists and is not .*no config.json") as error:
        rundir.check_replaceable(str(target), "config.json")
    assert "\n" not in str(error.value)
