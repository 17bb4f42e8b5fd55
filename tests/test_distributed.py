"""Tests of lib/distributed.py's set-up: the torchrun variables are checked, and a missing peer is a bounded wait.

Oracles: the variable each broken environment names (one line, exit status 2 from a real `sft.py`, nothing
written); the wall clock of a run whose peer never comes (DIST_JOIN_TIMEOUT_S of 3 s: it must give up in well
under a minute, where torch's default is an hour); and two real processes that do meet, whose all-reduce
waits longer than the join timeout for a late rank. FSDP and DDP training under torchrun are in test_fsdp.py.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_distributed.py
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from lib import cli, distributed
from helpers import ROOT

VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "DIST_JOIN_TIMEOUT_S")
VALID = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**variables):
    """os.environ without any torchrun variable, then `variables` (a value of None leaves the variable unset)."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update({k: v for k, v in variables.items() if v is not None})
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def torchrun_env(monkeypatch):
    def set_env(**variables):
        for name in VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            if value is not None:
                monkeypatch.setenv(name, value)
    return set_env


def test_one_process_needs_no_variables(torchrun_env):
    torchrun_env()
    assert distributed.setup_ddp() == (0, 1, False)
    torchrun_env(WORLD_SIZE="1", RANK="junk")                     # one process: the other variables are not read
    assert distributed.setup_ddp() == (0, 1, False)


def test_a_valid_environment_is_read_as_set(torchrun_env):
    torchrun_env(WORLD_SIZE="4", RANK="3", LOCAL_WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR=" node0 ",
                 MASTER_PORT="65535", DIST_JOIN_TIMEOUT_S="2.5")
    assert distributed.ddp_environment() == dict(world=4, rank=3, local_world=2, local_rank=1, addr="node0",
                                                 port=65535, join_s=2.5)
    torchrun_env(**VALID)
    assert distributed.ddp_environment()["join_s"] == distributed.JOIN_TIMEOUT_S


@pytest.mark.parametrize("change, named", [
    (dict(WORLD_SIZE="abc"), "WORLD_SIZE='abc'"),
    (dict(WORLD_SIZE="0"), "WORLD_SIZE='0'"),
    (dict(WORLD_SIZE="-2"), "WORLD_SIZE='-2'"),
    (dict(WORLD_SIZE="2.0"), "WORLD_SIZE='2.0'"),
    (dict(RANK=None), "RANK is not set"),
    (dict(RANK="2"), "RANK='2'.*0..1"),
    (dict(RANK="-1"), "RANK='-1'"),
    (dict(RANK=""), "RANK=''"),
    (dict(LOCAL_RANK="one"), "LOCAL_RANK='one'"),
    (dict(LOCAL_RANK="2"), "LOCAL_RANK='2'.*0..1"),
    (dict(LOCAL_WORLD_SIZE="3"), "LOCAL_WORLD_SIZE='3'.*1..2"),
    (dict(MASTER_ADDR=None), "MASTER_ADDR is not set"),
    (dict(MASTER_ADDR="  "), "MASTER_ADDR is not set"),
    (dict(MASTER_PORT=None), "MASTER_PORT is not set"),
    (dict(MASTER_PORT="0"), "MASTER_PORT='0'.*1..65535"),
    (dict(MASTER_PORT="65536"), "MASTER_PORT='65536'"),
    (dict(MASTER_PORT="http"), "MASTER_PORT='http'"),
    (dict(DIST_JOIN_TIMEOUT_S="0"), "DIST_JOIN_TIMEOUT_S='0'"),
    (dict(DIST_JOIN_TIMEOUT_S="nan"), "DIST_JOIN_TIMEOUT_S='nan'"),
    (dict(DIST_JOIN_TIMEOUT_S="inf"), "DIST_JOIN_TIMEOUT_S='inf'"),
    (dict(DIST_JOIN_TIMEOUT_S="-5"), "DIST_JOIN_TIMEOUT_S='-5'"),
])
def test_a_bad_variable_is_one_line_naming_it(torchrun_env, change, named):
    import torch.distributed as dist
    torchrun_env(**{**VALID, **change})
    with pytest.raises(cli.UserError, match=named) as error:
        distributed.setup_ddp()
    assert "\n" not in str(error.value)
    assert not dist.is_initialized()


def test_sft_under_a_broken_environment_exits_2_with_one_line_and_writes_nothing(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "sft.py")], cwd=tmp_path, capture_output=True,
                          text=True, env=environment(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "RANK is not set" in done.stderr
    assert os.listdir(tmp_path) == []


def test_a_missing_peer_is_one_line_within_the_join_timeout(tmp_path):
    """Rank 0 alone (its store waits for a rank 1 that never comes) and rank 1 alone (nobody listens at
    MASTER_ADDR:MASTER_PORT), each a real sft.py with DIST_JOIN_TIMEOUT_S=3: both exit 2 with one line naming
    what they waited for, in well under a minute (torch's default would be an hour), and write nothing."""
    runs = {}
    start = time.monotonic()
    for rank in (0, 1):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        env = environment(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                          DIST_JOIN_TIMEOUT_S="3")
        runs[rank] = (folder, subprocess.Popen([sys.executable, os.path.join(ROOT, "sft.py")], cwd=folder, env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for rank, (folder, process) in runs.items():
        try:
            _, stderr = process.communicate(timeout=90)
        finally:
            process.kill()
        assert process.returncode == 2, stderr[-2000:]
        assert stderr.count("\n") == 1, stderr[-2000:]
        assert f"rank {rank}: waited" in stderr and "WORLD_SIZE=2" in stderr and "MASTER_ADDR:MASTER_PORT" in stderr
        assert os.listdir(folder) == []
    assert time.monotonic() - start < 60          # start-ups included, on a loaded 2-core machine


JOIN_THEN_WAIT = """
import os, sys, time
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from lib import distributed
print("imported", flush=True)
sys.stdin.readline()                  # both processes start joining together, however slow their imports were
rank, world, ddp = distributed.setup_ddp()
if rank == 0:
    time.sleep(float(os.environ["DIST_JOIN_TIMEOUT_S"]) + 2)   # longer than the join timeout: a long evaluation
total = torch.tensor([rank + 1.0])
dist.all_reduce(total)
print(rank, world, ddp, int(total), flush=True)
distributed.cleanup_ddp()
"""


def test_two_processes_join_and_a_collective_outlasts_the_join_timeout():
    """Two real processes meet at MASTER_ADDR:MASTER_PORT; rank 1 then waits at an all-reduce while rank 0 works
    longer than DIST_JOIN_TIMEOUT_S: the join timeout bounds the meeting only, not the collectives after it."""
    port = str(free_port())
    processes = [subprocess.Popen([sys.executable, "-c", JOIN_THEN_WAIT.format(root=ROOT)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=environment(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=port, DIST_JOIN_TIMEOUT_S="2"))
                 for rank in (0, 1)]
    try:
        for process in processes:
            assert process.stdout.readline() == "imported\n"
        for process in processes:
            process.stdin.write("join\n")
            process.stdin.flush()
        for rank, process in enumerate(processes):
            stdout, stderr = process.communicate(timeout=90)
            assert process.returncode == 0, stderr[-2000:]
            assert stdout.split() == [str(rank), "2", "True", "3"]        # 1 + 2, summed over the two ranks
    finally:
        for process in processes:
            process.kill()
            process.wait()
