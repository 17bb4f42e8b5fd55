"""The bad-input harness the scripts' tests share: make a malformed file, option or checkpoint in a fresh
folder, run the script on it (as a subprocess, in-process, or many cases in one interpreter), and check the
contract: exit status 2, one line naming the file:line or the option, no traceback, nothing written."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
from lib import cli, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = tokenizer.get_tokenizer("bytes")


def bad_jsonl_cases(good_row, missing_key_row, wrong_type_row):
    """{kind: (file content, None for no file or "dir" for a folder; the suffix after the path in the error)}."""
    return {
        "missing": (None, ""), "directory": ("dir", ""), "empty": (b"", ""),
        "not JSON": (good_row + b"{not json\n", ":2"), "missing key": (missing_key_row, ":1"),
        "wrong type": (good_row + wrong_type_row, ":2"), "non-UTF-8": (good_row + b'{"prompt": "\xff\xfe"}\n', ":2"),
        "deep nesting": (b"[" * 100000 + b"\n", ":1"), "5000-digit integer": (b'{"n": ' + b"9" * 5000 + b"}\n", ":1"),
    }


def write_bad_input(folder, name, content):
    path = folder / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return str(path)


def hostile_checkpoint(source, path):
    """About 1 KB on disk; its config asks for 48 layers of width 8192 (about 40 GB of weights)."""
    config = dataclasses.asdict(M.Config(n_layer=48, n_embd=8192, n_head=64, n_kv_head=64))
    torch.save({"config": config, "model": {"wte.weight": torch.zeros(2, 2)}, "tokenizer": tokenizer.tokenizer_spec(ENC),
                "meta": {}}, path)


def truncated_checkpoint(source, path):
    data = open(source, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def nan_weights_checkpoint(source, path):
    ckpt = torch.load(source, weights_only=True)
    ckpt["model"]["wte.weight"][0, 0] = math.nan
    torch.save(ckpt, path)


def file_case(flag, name, content, where=""):
    def make(folder, inputs):
        path = write_bad_input(folder, name, content)
        return [flag, path], path + where
    return make


def option_case(argv, flag):
    return lambda folder, inputs: (argv, flag)


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*"))


def run_case(make, folder, inputs, base_argv, run):
    """Make the case's bad input in `folder`, run it -> (exit status, stderr lines, expected text, files before,
    files after)."""
    extra, expected = make(folder, inputs)
    before = files_under(folder)
    status, stderr = run([*base_argv(inputs, folder), *extra], folder)
    return status, stderr.strip().splitlines(), expected, before, files_under(folder)


def run_script(script):
    def run(argv, folder):
        result = subprocess.run([sys.executable, str(script), *argv], cwd=folder, capture_output=True, text=True,
                                errors="replace", timeout=300)
        return result.returncode, result.stderr
    return run


def run_in_process(main, monkeypatch, capsys):
    def run(argv, folder):
        monkeypatch.chdir(folder)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            cli.run(lambda: main(argv))
        return stopped.value.code, capsys.readouterr().err
    return run


def check_one_line_error(status, err, expected, before, after):
    assert status == 2, (status, err[-5:])
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err[-5:]
    assert expected in err[0], (expected, err[0])
    assert after == before, sorted(set(after) - set(before))


SCRIPT_CASES_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
root, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
results = {}
for name, (cwd, argv) in json.loads(sys.stdin.read()).items():
    os.chdir(cwd)
    sys.argv = [script, *argv]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(os.path.join(root, script), run_name="__main__")
            status = 0
        except SystemExit as e:                  # as the interpreter: None is 0, text is printed and 1
            status = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
        except BaseException:                    # an uncaught exception: its traceback, status 1
            traceback.print_exc()
            status = 1
    results[name] = [status, stderr.getvalue()]
print(json.dumps(results))
"""


def run_script_cases(script, cases, timeout=300):
    """`python <script> <argv>` for every case, all in ONE fresh Python process (a fresh interpreter per
    case costs ~1.5 s of torch import): each case runs the script as __main__ (runpy) in its own working
    folder, and its exit status and stderr are what the interpreter would give (SystemExit's code; an
    uncaught exception prints its traceback, status 1). cases {name: (cwd, argv)} -> {name: (status, stderr)}.
    test_the_case_driver_agrees_with_a_real_process checks it against real processes."""
    result = subprocess.run([sys.executable, "-c", SCRIPT_CASES_DRIVER, ROOT, script], input=json.dumps(cases),
                            capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return {name: tuple(value) for name, value in json.loads(result.stdout.splitlines()[-1]).items()}


def make_files(folder, files):
    """files {relative path: bytes, or None for a folder}"""
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.write_bytes(content)


def case_name(argv):
    return " ".join(argv)
