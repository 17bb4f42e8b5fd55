"""Hostile model files (issue 36): every field a loader reads is checked, and a file's claims are held to the
tensors it actually holds before anything is built, at every entry point that starts from a real model.

Every file here is written from one tiny byte-level Llama-family GPT (2 layers, width 32, about 100 KB) in
three formats: this project's .pt (checkpoints.save), a Hugging Face folder (convert.save_hf) and a GGUF file
laid out byte by byte from the GGUF spec (F32 tensors in llama.cpp's q/k row order, the byte tokenizer as
GGUF metadata). Unchanged, each loads to that model's logits: the oracle that every case below differs from a
file that loads in the one field it changes. Changed, each is refused as one line that names the path and the
field: in this process for every field, and through each entry point's command line (`sft.py --init`,
`sft.py --resume`, `grpo.py --init`, `ppo.py --init`, `reward.py --init`, `agent_env.py --init`,
`synth.py --from-model`, `model.py export`) with exit status 2 and nothing written. The bound itself: a file
of each kind claiming 10**9 layers, or a width and vocabulary far beyond its tensors (a .pt: tensors of the
claimed shapes that are stride-0 views of one number), is refused by a fresh `model.py export` within seconds
of CPU and far below 1 GB of peak resident memory (getrusage of the child).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_hostile_files.py
"""
import concurrent.futures
import dataclasses
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

import model as M
from lib import checkpoints, cli, convert, tokenizer, tokenizer_files
from badinput import files_under, run_script_cases
from helpers import watchdog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = tokenizer.get_tokenizer("bytes")
TINY = dict(vocab_size=ENC.n_vocab, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
DROP = object()                     # an edit that removes the key
torch.set_num_threads(1)


def tiny_model() -> M.GPT:
    torch.manual_seed(0)
    return M.GPT(M.Config(**TINY)).eval()


def edited(mapping: dict, edits: dict) -> dict:
    mapping = dict(mapping)
    for key, value in edits.items():
        if value is DROP:
            mapping.pop(key, None)
        else:
            mapping[key] = value
    return mapping


# ----------------------------------------------------------------------------------------------
# The three formats, written from the tiny model with some fields changed
# ----------------------------------------------------------------------------------------------

def write_pt(path, config=None, ckpt_edits=None):
    """checkpoints.save of the tiny model, then its config fields (and top-level entries) edited."""
    checkpoints.save(str(path), tiny_model(), ENC)
    if config or ckpt_edits:
        ckpt = torch.load(str(path), weights_only=True)
        ckpt["config"] = edited(ckpt["config"], config or {})
        torch.save(edited(ckpt, ckpt_edits or {}), str(path))
    return str(path)


def write_hf(folder, config=None, generation=None):
    """convert.save_hf of the tiny model, then config.json and generation_config.json edited."""
    convert.save_hf(str(folder), tiny_model(), ENC)
    for name, edits in (("config.json", config), ("generation_config.json", generation)):
        if edits:
            path = os.path.join(folder, name)
            with open(path) as f:
                content = edited(json.load(f), edits)
            with open(path, "w") as f:
                json.dump(content, f)
    return str(folder)


def gguf_value(value) -> tuple[int, bytes]:
    """(GGUF value type, its bytes) of a Python value (ggml/docs/gguf.md): bool, int (u32, u64 or i64),
    float (f64), str (u64 length + UTF-8), list (element type, u64 count, the elements)."""
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return ((4, struct.pack("<I", value)) if 0 <= value < 2**32 else
                (10, struct.pack("<Q", value)) if value >= 0 else (11, struct.pack("<q", value)))
    if isinstance(value, float):
        return 12, struct.pack("<d", value)
    if isinstance(value, str):
        return 8, struct.pack("<Q", len(value.encode())) + value.encode()
    items = [gguf_value(item) for item in value]
    return 9, struct.pack("<IQ", items[0][0] if items else 4, len(items)) + b"".join(raw for _, raw in items)


def gguf_metadata(cfg: M.Config) -> dict:
    """llama.cpp's keys for the tiny Llama, and the byte tokenizer as a GPT-2-style BPE with no merges."""
    tokens = [tokenizer_files.BYTE_TO_CHAR[b] for b in range(256)] + ["<|endoftext|>", "<|pad|>"]
    return {"general.architecture": "llama", "llama.block_count": cfg.n_layer, "llama.context_length": cfg.block_size,
            "llama.embedding_length": cfg.n_embd, "llama.feed_forward_length": cfg.ffn_width,
            "llama.attention.head_count": cfg.n_head, "llama.attention.head_count_kv": cfg.n_kv_head,
            "llama.attention.layer_norm_rms_epsilon": cfg.norm_eps, "llama.rope.freq_base": cfg.rope_base,
            "llama.vocab_size": cfg.vocab_size, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * 256 + [3, 3],
            "tokenizer.ggml.eos_token_id": 256, "tokenizer.ggml.padding_token_id": 257}


def write_gguf(path, metadata=None):
    """A GGUF v3 file of the tiny model, byte by byte: header, metadata, tensor infos (dims fastest-first),
    F32 data at 32-byte aligned offsets. q and k rows are permuted as llama.cpp's converter does
    (LlamaModel.permute: rows (heads, 2, D/2) -> (heads, D/2, 2))."""
    model = tiny_model()
    cfg = model.config
    gguf_names = {**convert.GGUF_NAMES, **{f"model.layers.{i}.{hf}": f"blk.{i}.{gguf}" for i in range(cfg.n_layer)
                                           for hf, gguf in convert.GGUF_LAYER_NAMES.items()}}
    tensors = {}
    for name, tensor in convert.state_dict_to_hf(model.state_dict(), cfg).items():
        heads = cfg.n_head if "q_proj" in name else cfg.n_kv_head if "k_proj" in name else 0
        if heads:
            tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        tensors[gguf_names[name]] = tensor.float().contiguous()
    kvs = edited(gguf_metadata(cfg), metadata or {})
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, value in kvs.items():
        value_type, raw = gguf_value(value)
        header += gguf_value(key)[1] + struct.pack("<I", value_type) + raw
    data = b""
    for name, tensor in tensors.items():
        dims = list(tensor.shape)[::-1]
        header += gguf_value(name)[1] + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, len(data))
        raw = tensor.numpy().tobytes()
        data += raw + bytes(-len(raw) % 32)
    with open(path, "wb") as f:
        f.write(header + bytes(-len(header) % 32) + data)
    return str(path)


WIDE = dict(n_layer=8, n_embd=8192, n_head=64, n_kv_head=64)       # about 6.4 B parameters


def write_stride_zero_pt(path, **config):
    """A .pt whose config claims a big model and whose tensors have exactly its shapes, each a stride-0 view
    of ONE stored number: shapes agree with the config, yet the file holds 4 bytes of weights."""
    cfg = M.Config(**{**TINY, **config})
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in M.GPT(cfg).state_dict().items()}
    one = torch.zeros(1)
    torch.save({"config": dataclasses.asdict(cfg), "model": {name: one.expand(shape) for name, shape in shapes.items()},
                "tokenizer": tokenizer.tokenizer_spec(ENC), "meta": {}}, str(path))
    return str(path)


WRITERS = {"pt": lambda path, edits: write_pt(str(path) + ".pt", **edits),
           "hf": lambda path, edits: write_hf(str(path) + "_hf", **edits),
           "gguf": lambda path, edits: write_gguf(str(path) + ".gguf", **edits)}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_the_unchanged_files_load_to_the_models_logits(tmp_path, kind):
    """Each writer's file, with no field changed, loads through checkpoints.load to the very model it was
    written from (the GGUF's q/k rows come back in Hugging Face's order): so each hostile case below is a
    loadable file with one field changed."""
    path = WRITERS[kind](tmp_path / "model", {})
    loaded, enc, _ = checkpoints.load(path)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens), tiny_model()(tokens), atol=1e-5, rtol=1e-5)
    assert tokenizer.encode(enc, "12+34=46") == ENC.encode_ordinary("12+34=46")
    assert tokenizer.stop_ids(enc) == (ENC.eot_token,)


# ----------------------------------------------------------------------------------------------
# Every field: one-line CheckpointErrors naming the path and the field (in this process)
# ----------------------------------------------------------------------------------------------

HUGE_LAYERS, HUGE_WIDTH, HUGE_VOCAB = 10**9, 10**6, 10**9
NO_V5_ROPE = {"rope_parameters": DROP}      # save_hf writes both; rope_parameters (transformers 5) would win


def spec_with(**changes) -> dict:
    """The byte tokenizer as a full spec (what a checkpoint of a real model stores), some fields changed."""
    return {**tokenizer_files.tokenizer_spec_from_encoding(ENC, ENC.n_vocab), **changes}


FIELD_CASES = {  # case: (format, edits, text the error names)
    # this project's .pt: Config's fields, each of its default's type; the tokenizer within the vocabulary
    "pt n_head zero": ("pt", {"config": {"n_head": 0}}, "n_head"),
    "pt n_head a bool": ("pt", {"config": {"n_head": True}}, "n_head"),
    "pt n_embd a string": ("pt", {"config": {"n_embd": "32"}}, "n_embd"),
    "pt block_size a float": ("pt", {"config": {"block_size": 64.0}}, "block_size"),
    "pt norm_eps NaN": ("pt", {"config": {"norm_eps": math.nan}}, "norm_eps"),
    "pt rope_base infinite": ("pt", {"config": {"rope_base": math.inf}}, "rope_base"),
    "pt rope_base past every float": ("pt", {"config": {"rope_base": 10**400}}, "rope_base"),
    "pt tie_embeddings a string": ("pt", {"config": {"tie_embeddings": "no"}}, "tie_embeddings"),
    "pt n_layer negative": ("pt", {"config": {"n_layer": -1}}, "n_layer"),
    "pt tokenizer ids past the vocabulary": ("pt", {"ckpt_edits": {"tokenizer": spec_with(
        vocab_size=300, added_tokens={"<|tool|>": 299})}}, "tokenizer has 300 token ids"),
    "pt tokenizer without an end of sequence": ("pt", {"ckpt_edits": {"tokenizer": spec_with(
        special_tokens={"<|pad|>": 257}, eos=None)}}, "end-of-sequence"),
    # a Hugging Face folder: config.json
    "hf num_attention_heads missing": ("hf", {"config": {"num_attention_heads": DROP}}, "num_attention_heads"),
    "hf num_attention_heads zero": ("hf", {"config": {"num_attention_heads": 0}}, "num_attention_heads"),
    "hf num_attention_heads a bool": ("hf", {"config": {"num_attention_heads": True}}, "num_attention_heads"),
    "hf num_attention_heads a float": ("hf", {"config": {"num_attention_heads": 4.0}}, "num_attention_heads"),
    "hf hidden_size negative": ("hf", {"config": {"hidden_size": -32}}, "hidden_size"),
    "hf vocab_size missing": ("hf", {"config": {"vocab_size": DROP}}, "vocab_size"),
    "hf num_hidden_layers a string": ("hf", {"config": {"num_hidden_layers": "2"}}, "num_hidden_layers"),
    "hf head_dim zero": ("hf", {"config": {"head_dim": 0}}, "head_dim"),
    "hf num_key_value_heads not dividing": ("hf", {"config": {"num_key_value_heads": 3}}, "n_kv_head"),
    "hf rope_scaling a string": ("hf", {"config": {"rope_scaling": "linear", **NO_V5_ROPE}}, "rope_scaling"),
    "hf rope_scaling an int": ("hf", {"config": {"rope_scaling": 3, **NO_V5_ROPE}}, "rope_scaling"),
    "hf rope_parameters a list": ("hf", {"config": {"rope_parameters": [10000.0]}}, "rope_parameters"),
    "hf rope_type a list": ("hf", {"config": {"rope_scaling": {"rope_type": ["llama3"]}, **NO_V5_ROPE}}, "rope_type"),
    "hf rope factor NaN": ("hf", {"config": {"rope_scaling": {"rope_type": "llama3", "factor": math.nan},
                                             **NO_V5_ROPE}}, "factor"),
    "hf rope_theta infinite": ("hf", {"config": {"rope_theta": math.inf, **NO_V5_ROPE}}, "rope_theta"),
    "hf rope_theta past every float": ("hf", {"config": {"rope_theta": 10**400, **NO_V5_ROPE}}, "rope_theta"),
    "hf rms_norm_eps zero": ("hf", {"config": {"rms_norm_eps": 0}}, "rms_norm_eps"),
    "hf rms_norm_eps a string": ("hf", {"config": {"rms_norm_eps": "1e-6"}}, "rms_norm_eps"),
    "hf tie_word_embeddings a string": ("hf", {"config": {"tie_word_embeddings": "yes"}}, "tie_word_embeddings"),
    "hf architectures nested": ("hf", {"config": {"architectures": [["LlamaForCausalLM"]]}}, "architecture"),
    "hf architectures a string": ("hf", {"config": {"architectures": "LlamaForCausalLM"}}, "architectures"),
    "hf hidden_act a list": ("hf", {"config": {"hidden_act": ["silu"]}}, "hidden_act"),
    # generation_config.json: its eos ids stop every generation, after training; refused at load instead
    "hf eos_token_id a string": ("hf", {"generation": {"eos_token_id": "256"}}, "eos_token_id"),
    "hf eos_token_id a dict": ("hf", {"generation": {"eos_token_id": {"id": 256}}}, "eos_token_id"),
    "hf eos_token_id 10**30": ("hf", {"generation": {"eos_token_id": 10**30}}, "eos_token_id"),
    "hf eos_token_id the vocab size": ("hf", {"generation": {"eos_token_id": [256, 258]}}, "eos_token_id"),
    "hf eos_token_id negative": ("hf", {"generation": {"eos_token_id": -1}}, "eos_token_id"),
    "hf eos_token_id a bool": ("hf", {"generation": {"eos_token_id": [True]}}, "eos_token_id"),
    # a GGUF file's metadata
    **{f"gguf head_count {name}": ("gguf", {"metadata": {"llama.attention.head_count": value}},
                                   "llama.attention.head_count")
       for name, value in [("missing", DROP), ("zero", 0), ("a bool", True), ("a string", "4"), ("per layer", [4, 4])]},
    "gguf embedding_length a float": ("gguf", {"metadata": {"llama.embedding_length": 32.0}}, "llama.embedding_length"),
    "gguf block_count negative": ("gguf", {"metadata": {"llama.block_count": -2}}, "llama.block_count"),
    "gguf feed_forward_length zero": ("gguf", {"metadata": {"llama.feed_forward_length": 0}},
                                      "llama.feed_forward_length"),
    "gguf rms epsilon NaN": ("gguf", {"metadata": {"llama.attention.layer_norm_rms_epsilon": math.nan}},
                             "llama.attention.layer_norm_rms_epsilon"),
    "gguf freq_base infinite": ("gguf", {"metadata": {"llama.rope.freq_base": math.inf}}, "llama.rope.freq_base"),
    "gguf architecture unknown": ("gguf", {"metadata": {"general.architecture": "gpt2"}}, "architecture"),
    "gguf architecture a number": ("gguf", {"metadata": {"general.architecture": 7}}, "architecture"),
    "gguf eos id past the tokens": ("gguf", {"metadata": {"tokenizer.ggml.eos_token_id": 258}},
                                    "tokenizer.ggml.eos_token_id"),
    "gguf eos id a string": ("gguf", {"metadata": {"tokenizer.ggml.eos_token_id": "256"}},
                             "tokenizer.ggml.eos_token_id"),
}
CLAIM_CASES = {  # a tiny file that claims an enormous model: (format, edits, text the error holds)
    "pt 10**9 layers": ("pt", {"config": {"n_layer": HUGE_LAYERS}}, "layers"),
    "pt huge width": ("pt", {"config": {"n_embd": 8192, "n_head": 64, "n_kv_head": 64}}, "wte.weight"),
    "pt huge vocabulary": ("pt", {"config": {"vocab_size": HUGE_VOCAB}}, "wte.weight"),
    "pt huge FFN": ("pt", {"config": {"ffn_hidden": 10**12}}, "blocks.0.ffn."),
    "pt one layer too many": ("pt", {"config": {"n_layer": 3}}, "layers"),
    "hf 10**9 layers": ("hf", {"config": {"num_hidden_layers": HUGE_LAYERS}}, "layers"),
    "hf huge width": ("hf", {"config": {"hidden_size": HUGE_WIDTH}}, "wte.weight"),
    "hf huge vocabulary": ("hf", {"config": {"vocab_size": HUGE_VOCAB}}, "wte.weight"),
    "hf huge FFN": ("hf", {"config": {"intermediate_size": 10**12}}, "blocks.0.ffn."),
    "hf heads past int64": ("hf", {"config": {"num_attention_heads": 2**62, "num_key_value_heads": 2,
                                              "head_dim": 8}}, "overflow"),
    "hf huge context": ("hf", {"config": {"max_position_embeddings": 2**40}}, "max_position_embeddings"),
    "hf huge original context": ("hf", {"config": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                    "original_max_position_embeddings": 2**40},
                                                   **NO_V5_ROPE}}, "original_max_position_embeddings"),
    "gguf 10**9 layers": ("gguf", {"metadata": {"llama.block_count": HUGE_LAYERS}}, "layers"),
    "gguf huge width": ("gguf", {"metadata": {"llama.embedding_length": HUGE_WIDTH}}, "wte.weight"),
    "gguf huge vocabulary": ("gguf", {"metadata": {"llama.vocab_size": HUGE_VOCAB}}, "wte.weight"),
    "gguf huge FFN": ("gguf", {"metadata": {"llama.feed_forward_length": 10**12}}, "blocks.0.ffn."),
    "gguf huge context": ("gguf", {"metadata": {"llama.context_length": 2**40}}, "llama.context_length"),
}


@pytest.mark.parametrize("case", list(FIELD_CASES) + list(CLAIM_CASES))
def test_a_bad_field_or_claim_is_one_checkpoint_error_naming_the_path_and_the_field(tmp_path, case):
    kind, edits, named = {**FIELD_CASES, **CLAIM_CASES}[case]
    path = WRITERS[kind](tmp_path / "model", edits)
    with watchdog(30), pytest.raises(cli.CheckpointError) as error:
        checkpoints.load(path)
    message = str(error.value)
    assert message.startswith(path) and "\n" not in message and len(message) < len(path) + 300, message
    assert named in message, message


def test_tensors_that_are_views_of_one_number_are_refused_though_their_shapes_fit(tmp_path):
    """torch.save keeps a view's strides: an 8-layer, width-8192 config (about 26 GB of fp32 weights) whose
    tensors all have the right shapes but are stride-0 views of one stored float. The weights claim the sum of
    their shapes' bytes (a tied lm_head once), the storages hold 4: refused before GPT(cfg) would allocate."""
    path = write_stride_zero_pt(tmp_path / "views.pt", **WIDE)
    assert os.path.getsize(path) < 200_000
    cfg = M.Config(**{**TINY, **WIDE})
    with torch.device("meta"):
        claimed = 4 * M.GPT(cfg).num_params()           # parameters() yields the tied matrix once
    with watchdog(60), pytest.raises(cli.CheckpointError, match=rf"claim {claimed} bytes but their storages hold 4\)$"):
        checkpoints.load(path)


def test_a_tied_checkpoint_whose_two_names_share_one_storage_still_loads(tmp_path):
    """The storage check counts a tied lm_head once: the tied embedding is one tensor under two names."""
    path = write_pt(tmp_path / "tied.pt")
    state = torch.load(path, weights_only=True)["model"]
    assert state["lm_head.weight"].untyped_storage().data_ptr() == state["wte.weight"].untyped_storage().data_ptr()
    checkpoints.load(path)


# ----------------------------------------------------------------------------------------------
# Every entry point: exit status 2, one line, nothing written
# ----------------------------------------------------------------------------------------------

SFT_ROWS = [{"prompt": f"{a}+{b}=?\n", "completion": f"#### {a + b}"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
RL_ROWS = [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
PREF_ROWS = [{"prompt": f"{a}+{b}=?\n", "chosen": f"#### {a + b}", "rejected": "#### 0"} for a, b in [(1, 2), (3, 4)]]
DATA = {"sft.jsonl": SFT_ROWS, "rl.jsonl": RL_ROWS, "prefs.jsonl": PREF_ROWS}
CHEAP = ["--device", "cpu"]
ENTRY_POINTS = {  # name: (script, argv given the model's path)
    "sft.py --init": ("sft.py", lambda model: ["--init", model, "--data", "sft.jsonl", "--test-data", "sft.jsonl",
                                               "--eval-data", "rl.jsonl", "--out", "out", "--max-steps", "1", *CHEAP]),
    "sft.py --resume": ("sft.py", lambda model: ["--resume", "--out", "run", "--data", "sft.jsonl", "--test-data",
                                                 "sft.jsonl", "--eval-data", "rl.jsonl", *CHEAP]),
    "grpo.py --init": ("grpo.py", lambda model: ["--init", model, "--data", "rl.jsonl", "--eval-data", "rl.jsonl",
                                                 "--out", "out", "--no-control", "--no-png", "--max-steps", "1",
                                                 *CHEAP]),
    "ppo.py --init": ("ppo.py", lambda model: ["--init", model, "--reward", "verifier", "--data", "rl.jsonl",
                                               "--eval-data", "rl.jsonl", "--out", "out", "--no-control",
                                               "--max-steps", "1", *CHEAP]),
    "reward.py --init": ("reward.py", lambda model: ["--init", model, "--data", "prefs.jsonl", "--test-data",
                                                     "prefs.jsonl", "--out", "out", *CHEAP]),
    "agent_env.py --init": ("agent_env.py", lambda model: ["--init", model, "--out", "out", "--no-control", *CHEAP]),
    "synth.py --from-model": ("synth.py", lambda model: ["--from-model", model, "--prompts", "rl.jsonl",
                                                         "--out", "generated.jsonl", *CHEAP]),
    "model.py export": ("model.py", lambda model: ["export", "--checkpoint", model, "--to", "exported"]),
}
END_TO_END = {  # one field case and one claim per format, and the eos id that used to crash after training
    case: (FIELD_CASES | CLAIM_CASES)[case] for case in
    ["pt n_head a bool", "pt 10**9 layers", "hf num_attention_heads zero", "hf 10**9 layers",
     "hf eos_token_id a string", "gguf head_count zero", "gguf 10**9 layers"]}


@pytest.fixture(scope="module")
def entry_point_runs(tmp_path_factory):
    """Every END_TO_END case through every entry point (`sft.py --resume` with the .pt as its run's model.pt),
    each in its own folder holding the data files, the hostile file and nothing else; one interpreter per
    script runs its cases (badinput.run_script_cases), two scripts at a time.
    -> {(entry point, case): (status, stderr, files before, files after, the model's path as given)}"""
    by_script, before = {}, {}
    for entry, (script, argv) in ENTRY_POINTS.items():
        for case, (kind, edits, _) in END_TO_END.items():
            if entry == "sft.py --resume" and kind != "pt":
                continue                              # --resume reads its run folder's model.pt
            folder = tmp_path_factory.mktemp("case")
            for name, rows in DATA.items():
                (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
            if entry == "sft.py --resume":            # the run folder "run" holds the hostile model.pt
                os.makedirs(folder / "run")
            stem = folder / "run" / "model" if entry == "sft.py --resume" else folder / "model"
            model = os.path.relpath(WRITERS[kind](stem, edits), folder)
            by_script.setdefault(script, {})[f"{entry}|{case}"] = (str(folder), argv(model))
            before[(entry, case)] = (str(folder), files_under(folder), model)
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:    # two interpreters at a time
        runs = list(pool.map(lambda item: run_script_cases(*item), by_script.items()))
    for run in runs:
        for name, result in run.items():
            entry, case = name.split("|")
            folder, listing, model = before[(entry, case)]
            results[(entry, case)] = (*result, listing, files_under(folder), model)
    return results


@pytest.mark.parametrize("entry, case", [(entry, case) for entry in ENTRY_POINTS for case in END_TO_END
                                         if entry != "sft.py --resume" or END_TO_END[case][0] == "pt"])
def test_every_entry_point_refuses_a_hostile_model_in_one_line_and_writes_nothing(entry_point_runs, entry, case):
    status, stderr, before, after, model = entry_point_runs[(entry, case)]
    lines = stderr.strip().splitlines()
    assert status == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}") and "Traceback" not in stderr, lines[-5:]
    assert END_TO_END[case][2] in lines[0], lines[0]
    assert after == before, sorted(set(after) ^ set(before))


# ----------------------------------------------------------------------------------------------
# The bound itself: a fresh process, its CPU seconds and peak resident memory
# ----------------------------------------------------------------------------------------------

MEASURE = r"""
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=60)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)             # this wrapper's only child: the export
print(json.dumps({"status": done.returncode, "stderr": done.stderr, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_mb": usage.ru_maxrss / 1024}))
"""
BOUND_CASES = {  # a ~100 KB file claiming an enormous model: (writer, text of the error)
    "pt 10**9 layers": (lambda path: write_pt(path + ".pt", config={"n_layer": HUGE_LAYERS}), "layers"),
    "pt 8 layers of width 8192 as stride-0 views": (lambda path: write_stride_zero_pt(path + ".pt", **WIDE),
                                                    "storages"),
    "hf 10**9 layers": (lambda path: write_hf(path + "_hf", config={"num_hidden_layers": HUGE_LAYERS}), "layers"),
    "hf huge width, vocabulary and FFN": (
        lambda path: write_hf(path + "_hf", config={"hidden_size": HUGE_WIDTH, "vocab_size": HUGE_VOCAB,
                                                    "intermediate_size": 10**12}), "wte.weight"),
    "gguf 10**9 layers": (lambda path: write_gguf(path + ".gguf", {"llama.block_count": HUGE_LAYERS}), "layers"),
    "gguf huge width, vocabulary and FFN": (
        lambda path: write_gguf(path + ".gguf", {"llama.embedding_length": HUGE_WIDTH, "llama.vocab_size": HUGE_VOCAB,
                                                 "llama.feed_forward_length": 10**12}), "wte.weight"),
}


@pytest.fixture(scope="module")
def bound_runs(tmp_path_factory):
    """`python model.py export` of each BOUND_CASES file in a fresh process, two at a time, each measured by its
    own wrapper: {case: (file size, the export's result, whether --to was created)}."""
    def measure(case):
        folder = tmp_path_factory.mktemp("bound")
        path, out = BOUND_CASES[case][0](str(folder / "model")), folder / "exported"
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names) \
            if os.path.isdir(path) else os.path.getsize(path)
        done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, os.path.join(ROOT, "model.py"), "export",
                               "--checkpoint", path, "--to", str(out)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]       # the wrapper: the export ended within 60 s
        return path, size, json.loads(done.stdout), out.exists()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BOUND_CASES, pool.map(measure, BOUND_CASES)))


@pytest.mark.parametrize("case", list(BOUND_CASES))
def test_a_small_file_claiming_a_huge_model_is_refused_in_seconds_and_little_memory(bound_runs, case):
    """`python model.py export` of each file in a fresh process (the export of a 91 KB GGUF claiming 10**9 layers
    once reached 6.6 GB; building 10**6..10**9 layers on the meta device takes hours): refused as one line within
    20 s of CPU and 1 GB of peak RSS (importing torch alone is about 300 MB), and the folder is not created."""
    path, size, result, created = bound_runs[case]
    assert size < 200_000
    lines = result["stderr"].strip().splitlines()
    assert result["status"] == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}"), lines[-5:]
    assert BOUND_CASES[case][1] in lines[0], lines[0]
    assert result["cpu_s"] < 20 and result["peak_mb"] < 1000, result
    assert not created
