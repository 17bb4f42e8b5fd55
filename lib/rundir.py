"""What a run writes: its folder (one writer at a time), files written atomically, metrics.jsonl.

Every stage writes into one run folder: model.pt, args.json and metrics.jsonl. claim_run_dir holds an
exclusive lock on the folder for the life of the process, so a second run on the same folder is refused
before it writes anything; atomic_write makes each file appear whole or not at all, and atomic_folder a folder
(an export). Temporary files and folders are named .<name>.<pid>.tmp, so that those of killed writers are found
and removed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

from lib import cli


def temp_path(path: str, kind: str = "tmp") -> str:
    """Where `path` is written before the rename that makes it appear whole: .<name>.<pid>.tmp beside it
    (a file or a folder; kind "old": where atomic_folder sets the previous folder aside). The pid in the name
    lets remove_stale_temps tell a killed writer's leftovers from a live writer's."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{kind}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):   # alive under another user, or a platform without signals
        return True
    return True


def remove_stale_temps(path: str) -> None:
    """Delete what killed writers of `path` left beside it: temporary files and folders (temp_path) whose pid is
    gone, or is this process's own (a pid reused since, as in a restarted container: this process has no
    temporary file of `path` open while it cleans). A folder set aside (.old) while `path` is missing, a writer
    killed between atomic_folder's two renames, is put back as `path` instead."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.(tmp|old)$")
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry)
        if not match or int(match.group(1)) != os.getpid() and pid_alive(int(match.group(1))):
            continue
        stale = os.path.join(folder, entry)
        with contextlib.suppress(OSError):
            if match.group(2) == "old" and not os.path.lexists(path):
                os.rename(stale, path)
            else:
                delete(stale)


def delete(path: str) -> None:
    """Remove a file, a link or a folder with all it holds (what is already gone is no error)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Open a temporary file beside `path`; on success rename it over `path` (os.replace is atomic), on
    any error delete it. Readers see the old file or the new one, never half of one; temporary files of
    killed writers are cleaned up first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def locked(folder: str):
    """Hold an exclusive lock on `folder` itself for the block (flock on its descriptor: no file is made);
    another process waits at the same call. Without advisory locks (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)                        # closing it releases the lock


@contextlib.contextmanager
def atomic_folder(path: str):
    """Write a folder whole or not at all: yield a new empty folder beside `path` (temp_path) to write into;
    when the block succeeds it takes the place of `path`, when it fails it is deleted and `path` is as it was.

    The swap is two renames, then a delete: `path` aside (.<name>.<pid>.old), the new folder in, the old one
    removed. A reader that looks `path` up sees the old folder, then for the microseconds between the two
    renames no folder at all, then the new one; never a mix of the two. (Files a reader opened before the
    swap stay those of the old folder.) A writer killed while writing leaves its temporary folder, and one
    killed between the renames leaves the old folder aside: the next atomic_folder or remove_stale_temps of
    `path` deletes the first and puts the second back. Two writers at once each swap in a whole folder, one
    after the other (a lock on the parent folder): the last one wins."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with locked(parent):
        remove_stale_temps(path)
    new, old = temp_path(path), temp_path(path, "old")
    os.mkdir(new)
    try:
        yield new
        with locked(parent):
            if os.path.lexists(path):
                os.rename(path, old)
            try:
                os.rename(new, path)
            except BaseException:
                if os.path.lexists(old):
                    os.rename(old, path)
                raise
        delete(old)
    finally:
        delete(new)


def check_replaceable(path: str, marker: str) -> None:
    """`path`, which atomic_folder is to replace whole, must be new, an empty folder, or a folder holding
    `marker` (a file of what is written there, e.g. an export's config.json); anything else (a file, a folder
    of other things) is a UserError naming it, so that no one's files are deleted by mistake."""
    if os.path.lexists(path) and not (os.path.isdir(path) and (os.path.isfile(os.path.join(path, marker))
                                                               or not os.listdir(path))):
        raise cli.UserError(f"{path}: exists and is not a folder this writes (no {marker}); it would be replaced "
                            "whole, so name a new or empty folder")

_RUN_LOCKS: dict = {}


def claim_run_dir(run_dir: str, lock_file: bool = True) -> None:
    """Make `run_dir` this process's folder to write: create it and hold an exclusive lock on
    run_dir/.lock (holding our pid) until the process exits. A second process that claims it gets a UserError
    naming the folder and the holder's pid, before it writes anything: a run folder has one writer.
    lock_file=False locks the folder's own descriptor instead and leaves no file behind (synth.py's outputs
    go into folders that are not runs: data/, or wherever --out names)."""
    key = os.path.realpath(run_dir)
    if key in _RUN_LOCKS:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        handle = open(os.path.join(run_dir, ".lock"), "a+") if lock_file else os.open(run_dir, os.O_RDONLY)
    except OSError as e:      # a file where the folder should be, no permission, ...
        raise cli.UserError(f"{run_dir}: cannot use it as a run folder ({e.strerror})") from None
    try:
        import fcntl
    except ImportError:          # no advisory locks on this platform: single-writer by convention only
        _RUN_LOCKS[key] = handle
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        if not lock_file:
            os.close(handle)
            raise cli.UserError(f"{run_dir}: another process is writing to this folder; wait for it to finish "
                                "or choose another output folder") from None
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise cli.UserError(f"{run_dir}: another run (pid {holder}) is writing to this folder; "
                            "wait for it to finish or choose another output folder") from None
    if lock_file:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    _RUN_LOCKS[key] = handle


def check_run_folder(flag: str, path: str) -> None:
    """A run folder that can be made, checked with the options (before anything is written): named, not a
    file, under a folder this process can write in. `flag` is the option that named it."""
    if not path.strip():
        raise cli.UserError(f"{flag}: name a run folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):              # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise cli.UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise cli.UserError(f"{flag} {path}: cannot write in {existing}")


def save_args(run_dir: str, args) -> None:
    """Claim the run folder (claim_run_dir) and write the arguments the run uses, atomically."""
    claim_run_dir(run_dir)
    with atomic_write(os.path.join(run_dir, "args.json")) as f:
        json.dump(asdict(args) if dataclasses.is_dataclass(args) else dict(args), f, indent=2)


def format_seconds(s: float) -> str:
    s = int(min(max(s, 0), 10 ** 9)) if math.isfinite(s) else 10 ** 9
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLogger:
    """One JSON line per log call into run_dir/metrics.jsonl, and a readable progress line with an ETA.
    `total` is the number of steps, or None when a time budget (`budget_s`) sets the end instead."""

    def __init__(self, run_dir: str, total: int | None = None, budget_s: float | None = None,
                 enabled: bool = True, append: bool = False):
        self.enabled, self.total, self.budget_s = enabled, total, budget_s
        self.start = time.time()
        self.file = None
        if enabled:
            claim_run_dir(run_dir)
            self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a" if append else "w")

    def log(self, step: int, echo: bool = True, **metrics) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        row = {"step": step, "time_s": round(elapsed, 3)}
        row.update({k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in metrics.items()})
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if echo:
            if self.budget_s:
                eta = self.budget_s - elapsed
            elif self.total:
                eta = elapsed / max(step, 1) * (self.total - step)
            else:
                eta = None
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                             if k not in ("step", "time_s") and not isinstance(v, (list, dict)))
            where = f"step {step}" + (f"/{self.total}" if self.total else "")
            tail = f" | {format_seconds(elapsed)} elapsed" + (f", ETA {format_seconds(eta)}" if eta is not None else "")
            print(f"{where} | {shown}{tail}", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()


def sha256(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in name order): proves that two runs
    started from the byte-identical checkpoint."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for name in files:
        if len(files) > 1:
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sparkline(values, width: int = 40) -> str:
    """A text plot: one block character per value, scaled between the min and the max."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    lo, hi = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def peak_memory_mb(device) -> float:
    """Peak memory of this process: CUDA's max_memory_allocated on a GPU, else the peak resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def sync(device) -> None:
    """Wait for the GPU's queued work (a timer reads the clock after it); nothing to wait for on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()

