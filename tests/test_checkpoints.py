"""Tests of lib/checkpoints.py: .pt checkpoints saved and loaded, damaged or hostile ones refused.

Oracles: the model that was saved (identical logits, config, tokenizer and meta after load), the folder's
listing and the previous file's bytes (saves are atomic: no temporary file is left, a failed save keeps the
old file, temporary files of dead writers are removed), errors that name the path for files torch.load or the
config check refuses, and the peak resident memory (a hostile config is refused before anything is
allocated). Export (model.py export): the folder loads with the source model's logits, and a crash between
two files or a SIGKILL mid-write leaves the previous export's bytes, with no temporary file left after the next
export. Hugging Face folders and GGUF files loaded through checkpoints.load are tested in test_convert.py.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_checkpoints.py
"""
from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
from lib import checkpoints, cli, convert, rundir
from helpers import DemoArgs, ENC, EOT, random_tokens, tiny_model, watchdog

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------

def test_save_load_gives_identical_logits_tokenizer_and_meta(tmp_path):
    model = tiny_model(seed=12, ffn="moe", norm="layernorm", pos="learned", tie_embeddings=False)
    path = str(tmp_path / "run" / "model.pt")
    checkpoints.save(path, model, ENC, step=7, args={"lr": 0.1}, state=torch.arange(3))
    assert os.listdir(tmp_path / "run") == ["model.pt"]                  # no temporary file left behind
    loaded, enc, ckpt = checkpoints.load(path)
    tokens = random_tokens(0, 2, 9)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(tokens), model(tokens))
    assert loaded.config == model.config
    assert enc.name == ENC.name and enc.n_vocab == ENC.n_vocab
    assert enc.encode_ordinary("ü 12+3") == ENC.encode_ordinary("ü 12+3") and enc.eot_token == EOT
    assert ckpt["meta"]["step"] == 7 and ckpt["meta"]["args"] == {"lr": 0.1}
    assert torch.equal(ckpt["meta"]["state"], torch.arange(3))


def test_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    model = tiny_model(seed=13)
    path = str(tmp_path / "model.pt")
    checkpoints.save(path, model, ENC, step=1)
    before = open(path, "rb").read()
    with pytest.raises(Exception):
        checkpoints.save(path, model, ENC, step=2, unpicklable=lambda: None)
    assert os.listdir(tmp_path) == ["model.pt"] and open(path, "rb").read() == before
    assert checkpoints.load(path)[2]["meta"]["step"] == 1


def test_a_checkpoint_that_saves_also_loads(tmp_path):
    """save must not write a file that load (weights_only=True) refuses: either the meta is rejected
    when saving, or it loads back."""
    path = str(tmp_path / "model.pt")
    model = tiny_model(seed=13)
    try:
        checkpoints.save(path, model, ENC, best_accuracy=np.float64(0.5), args=DemoArgs())
    except (TypeError, ValueError):
        assert not os.path.exists(path)
        return
    try:
        checkpoints.load(path)
    except cli.CheckpointError as e:
        pytest.fail(f"BUG (requests_model.md #4): save accepted meta (numpy scalar, dataclass) that "
                    f"load(weights_only=True) cannot read: {e}")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "not_ours", "empty"])
def test_bad_checkpoint_raises_checkpoint_error_naming_the_path(tmp_path, damage):
    path = str(tmp_path / f"{damage}.pt")
    if damage != "missing":
        checkpoints.save(path, tiny_model(seed=14), ENC)
        data = open(path, "rb").read()
        if damage == "truncated":
            data = data[:len(data) // 2]
        elif damage == "garbage":
            data = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
        elif damage == "empty":
            data = b""
        with open(path, "wb") as f:
            f.write(data)
        if damage == "not_ours":
            torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(cli.CheckpointError) as info:
        checkpoints.load(path)
    assert path in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, cli.UserError)


# ----------------------------------------------------------------------------------------------
# Hostile, invalid or non-finite checkpoints; temporary files of dead writers
# ----------------------------------------------------------------------------------------------

def hostile_checkpoint(path, **config):
    """A tiny file whose config asks for a huge model: only the config, and a 2-tensor state dict."""
    cfg = dataclasses.asdict(M.Config())
    cfg.update(config)
    torch.save({"config": cfg, "model": {"wte.weight": torch.zeros(2, 2)}, "tokenizer": {"name": "bytes", "n_vocab": 258},
                "meta": {}}, path)


def test_hostile_config_is_refused_before_anything_is_allocated(tmp_path):
    """48 layers of width 8192 would be ~39 B parameters (~150 GB); the check compares shapes on the meta
    device, so it fails fast and allocates nothing (the peak resident set stays far below one such layer)."""
    path = str(tmp_path / "hostile.pt")
    hostile_checkpoint(path, n_layer=48, n_embd=8192, n_head=64, n_kv_head=64)
    before = rundir.peak_memory_mb("cpu")
    with watchdog(20), pytest.raises(cli.CheckpointError, match="do not match its config"):
        checkpoints.load(path)
    assert rundir.peak_memory_mb("cpu") - before < 200     # one 8192x8192 fp32 matrix alone is 256 MB


@pytest.mark.parametrize("change, message", [
    ({"n_layer": -3}, "invalid config"), ({"n_head": "4"}, "invalid config"), ({"surprise": 1}, "unknown field"),
    ({"ffn": "mystery"}, "invalid config"), ({"dropout": float("nan")}, "invalid config"),
    ({"n_head": True}, r"invalid config \(n_head must be int, not True\)"),          # a bool is not an int
    ({"tie_embeddings": 1}, r"invalid config \(tie_embeddings must be bool"), ({"block_size": 64.0}, "block_size"),
    ({"n_layer": 10**6}, "claims 1000000 layers, the file holds the tensors of 2"),
    ({"n_layer": 1}, "claims 1 layers, the file holds the tensors of 2"),
])
def test_checkpoint_with_an_invalid_config_is_a_checkpoint_error(tmp_path, change, message):
    path = str(tmp_path / "bad.pt")
    checkpoints.save(path, tiny_model(seed=1), ENC)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(change)
    torch.save(ckpt, path)
    with pytest.raises(cli.CheckpointError, match=message):
        checkpoints.load(path)


def test_a_config_claiming_a_million_layers_is_refused_without_building_them(tmp_path):
    """The layer count is held to the layer indices among the tensor names before any block is built (on the
    meta device one block costs milliseconds; 10**6 of them took hours): refused at once."""
    path = str(tmp_path / "deep.pt")
    checkpoints.save(path, tiny_model(seed=1), ENC)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["n_layer"] = 10**9
    torch.save(ckpt, path)
    with watchdog(10), pytest.raises(cli.CheckpointError, match="claims 1000000000 layers"):
        checkpoints.load(path)


def test_weights_that_are_stride_zero_views_are_refused_before_allocation(tmp_path):
    """torch.save keeps strides: every tensor the right shape, yet each a view of one stored number. The bytes
    the shapes claim (a tied lm_head once) exceed the storages' bytes: refused, the claimed model never built."""
    model = tiny_model(seed=1)
    one = torch.zeros(1)
    state = {name: one.expand(t.shape) for name, t in model.state_dict().items()}
    path = str(tmp_path / "views.pt")
    torch.save({"config": dataclasses.asdict(model.config), "model": state,
                "tokenizer": {"name": "bytes", "n_vocab": 258}, "meta": {}}, path)
    claimed = 4 * model.num_params()
    with pytest.raises(cli.CheckpointError, match=rf"claim {claimed} bytes but their storages hold 4\)$"):
        checkpoints.load(path)


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(tmp_path):
    """A full tokenizer spec whose ids reach beyond the model's vocab_size (here an added token at 299 of a
    258-row embedding) would index past the embedding at the first encode: refused at load."""
    from lib import tokenizer_files
    path = str(tmp_path / "tok.pt")
    checkpoints.save(path, tiny_model(seed=1), ENC)
    ckpt = torch.load(path, weights_only=True)
    ckpt["tokenizer"] = {**tokenizer_files.tokenizer_spec_from_encoding(ENC, 258), "vocab_size": 300,
                         "added_tokens": {"<|tool|>": 299}}
    torch.save(ckpt, path)
    with pytest.raises(cli.CheckpointError, match="tokenizer has 300 token ids, the model only 258"):
        checkpoints.load(path)


def test_checkpoint_naming_an_unknown_tokenizer_is_refused(tmp_path):
    path = str(tmp_path / "tok.pt")
    checkpoints.save(path, tiny_model(seed=1), ENC)
    ckpt = torch.load(path, weights_only=True)
    ckpt["tokenizer"] = {"name": "https://example.com/evil", "n_vocab": 258}
    torch.save(ckpt, path)
    with pytest.raises(cli.CheckpointError, match="unknown tokenizer"):
        checkpoints.load(path)


def test_save_refuses_non_finite_weights_and_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "model.pt")
    model = tiny_model(seed=2)
    checkpoints.save(path, model, ENC, step=1)
    before = open(path, "rb").read()
    with torch.no_grad():
        model.blocks[0].attn.q.weight[0, 0] = float("nan")
    with pytest.raises(cli.NonFiniteError, match="blocks.0.attn.q.weight"):
        checkpoints.save(path, model, ENC, step=2)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["model.pt"]


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    (tmp_path / f".model.pt.{dead_pid}.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / f".model.pt.{live_pid}.tmp").write_bytes(b"someone else's, still writing")
    checkpoints.save(str(tmp_path / "model.pt"), tiny_model(seed=3), ENC)
    assert sorted(os.listdir(tmp_path)) == sorted(["model.pt", f".model.pt.{live_pid}.tmp"])


# ----------------------------------------------------------------------------------------------
# Export: a whole Hugging Face folder or nothing
# ----------------------------------------------------------------------------------------------

EXPORTED = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def folder_bytes(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def assert_loads_as(folder, model):
    """checkpoints.load reads `folder` back as a model with `model`'s logits."""
    loaded, _, _ = checkpoints.load(str(folder))
    tokens = random_tokens(5, 2, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def export_pair(tmp_path):
    """Two different exportable checkpoints, A and B, and A exported to tmp_path/out/hf."""
    (tmp_path / "out").mkdir()
    for name, seed in (("a.pt", 21), ("b.pt", 22)):
        checkpoints.save(str(tmp_path / name), tiny_model(seed=seed), ENC)
    checkpoints.export(["--checkpoint", str(tmp_path / "a.pt"), "--to", str(tmp_path / "out" / "hf")])
    return tmp_path / "out" / "hf", tiny_model(seed=21), tiny_model(seed=22)


def test_export_writes_a_folder_that_loads_as_the_source_model_and_replaces_an_earlier_one(tmp_path):
    folder, model_a, model_b = export_pair(tmp_path)
    assert sorted(os.listdir(folder)) == EXPORTED and os.listdir(tmp_path / "out") == ["hf"]
    assert_loads_as(folder, model_a)
    checkpoints.export(["--checkpoint", str(tmp_path / "b.pt"), "--to", str(folder)])
    assert sorted(os.listdir(folder)) == EXPORTED and os.listdir(tmp_path / "out") == ["hf"]
    assert_loads_as(folder, model_b)


def test_export_over_a_sharded_export_leaves_no_stale_shard_and_ordinary_permissions(tmp_path):
    """An earlier export in shards (model-0000N-of-M.safetensors and their index) is replaced whole: our own
    loader would otherwise follow the stale index. Files get the permissions the umask gives an ordinary file
    (not mkstemp's 0600), and no lock or temporary file is left in the folder or beside it."""
    folder, _, model_b = export_pair(tmp_path)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (folder / name).write_text("{}")
    checkpoints.export(["--checkpoint", str(tmp_path / "b.pt"), "--to", str(folder)])
    assert sorted(os.listdir(folder)) == EXPORTED and os.listdir(tmp_path / "out") == ["hf"]
    assert_loads_as(folder, model_b)
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(os.stat(folder / name).st_mode) for name in EXPORTED} == {0o666 & ~umask}


def test_a_crash_between_two_files_of_an_export_keeps_the_previous_export(tmp_path, monkeypatch):
    """model.safetensors written, then a crash before config.json: the folder is still export A, whole."""
    from lib import convert
    folder, model_a, _ = export_pair(tmp_path)
    before = folder_bytes(folder)
    write_safetensors = convert.formats.write_safetensors

    def then_crash(*args, **kwargs):
        write_safetensors(*args, **kwargs)
        raise OSError("the disk went away")
    monkeypatch.setattr(convert.formats, "write_safetensors", then_crash)
    with pytest.raises(OSError, match="disk went away"):
        checkpoints.export(["--checkpoint", str(tmp_path / "b.pt"), "--to", str(folder)])
    assert folder_bytes(folder) == before and os.listdir(tmp_path / "out") == ["hf"]
    assert_loads_as(folder, model_a)


KILLED_EXPORT = """
import os, sys, time
sys.path.insert(0, {root!r})
from lib import checkpoints
def stall(descriptor):      # write_safetensors has written every byte and syncs them: stop here, to be killed
    print("written", flush=True)
    time.sleep(60)
os.fsync = stall
checkpoints.export(["--checkpoint", {checkpoint!r}, "--to", {folder!r}])
"""


def test_an_export_killed_mid_write_keeps_the_previous_export_and_the_next_removes_its_leftovers(tmp_path):
    """SIGKILL while model.safetensors is being written: the folder is still export A; the dead writer's
    temporary folder (and the temporary file in it) are named .<name>.<pid>.tmp, so the next export, which
    finds the pid gone, removes them: no *.tmp is left anywhere."""
    from helpers import ROOT
    folder, model_a, model_b = export_pair(tmp_path)
    before = folder_bytes(folder)
    code = KILLED_EXPORT.format(root=ROOT, checkpoint=str(tmp_path / "b.pt"), folder=str(folder))
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert writer.stdout.readline() == "written\n"
    finally:
        writer.kill()
        writer.wait()
    temporary = f".hf.{writer.pid}.tmp"
    assert sorted(os.listdir(tmp_path / "out")) == [temporary, "hf"]
    assert os.listdir(tmp_path / "out" / temporary) == [f".model.safetensors.{writer.pid}.tmp"]
    assert folder_bytes(folder) == before
    assert_loads_as(folder, model_a)
    checkpoints.export(["--checkpoint", str(tmp_path / "b.pt"), "--to", str(folder)])
    assert os.listdir(tmp_path / "out") == ["hf"]
    assert not [name for _, _, names in os.walk(tmp_path) for name in names if name.endswith(".tmp")]
    assert_loads_as(folder, model_b)


@pytest.mark.parametrize("target", ["file", "folder of other things"])
def test_export_refuses_to_replace_what_is_not_an_export_before_reading_the_model(tmp_path, target):
    to = tmp_path / "target"
    if target == "file":
        to.write_text("notes")
    else:
        to.mkdir()
        (to / "notes.txt").write_text("mine")
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(cli.UserError) as error:     # a --checkpoint that does not exist: --to is checked first
        checkpoints.export(["--checkpoint", str(tmp_path / "missing.pt"), "--to", str(to)])
    assert str(to) in str(error.value) and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == listing
    assert (to.read_text() == "notes") if target == "file" else (os.listdir(to) == ["notes.txt"])


@dataclasses.dataclass
class StageArgs:
    lr: float = 1e-3
    max_steps: int = 1000


def test_a_pretrained_start_at_the_tiny_model_s_defaults_is_refused_naming_them(tmp_path):
    """ppo.py, reward.py and agent_env.py have no defaults for a real model: a pretrained --init with the options
    that size a run left at the tiny model's values is one line naming them; set, or a start of ours, it runs."""
    folder = tmp_path / "hf"
    convert.save_hf(str(folder), tiny_model(), ENC)
    with pytest.raises(cli.UserError, match=rf"--init {folder} is a pretrained model, and --lr 0.001, --max-steps 1000"):
        checkpoints.require_settings_for_pretrained(str(folder), StageArgs(), ("lr", "max_steps"))
    with pytest.raises(cli.UserError, match=r"and --max-steps 1000 are the defaults"):
        checkpoints.require_settings_for_pretrained(str(folder), StageArgs(lr=1e-5), ("lr", "max_steps"))
    checkpoints.require_settings_for_pretrained(str(folder), StageArgs(lr=1e-5, max_steps=5), ("lr", "max_steps"))
    checkpoints.save(str(tmp_path / "ours.pt"), tiny_model(), ENC)
    checkpoints.require_settings_for_pretrained(str(tmp_path / "ours.pt"), StageArgs(), ("lr", "max_steps"))
