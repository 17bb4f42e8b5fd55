"""Real models <-> this project's GPT: Hugging Face folders and GGUF files of the Llama and Qwen families.

Llama (Llama 3.x, SmolLM2), Qwen2 / Qwen2.5 and Qwen3 map onto model.GPT with config switches: RMSNorm,
RoPE (with Llama 3 scaling), SwiGLU, grouped-query attention, q/k/v biases (Qwen2) or q/k norms (Qwen3).
load_hf and load_gguf read a folder or a .gguf file into (GPT, tokenizer, checkpoint dict); save_hf writes
a folder that transformers (and vLLM) load unchanged. A file read here may be hostile: every field read is
checked (checked), and the config's claims are held to the tensors the file holds before anything is built
(check_weights), so a tiny file claiming 10**9 layers is refused in milliseconds.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import asdict

import tiktoken
import torch

import model as M
from lib import cli, formats, rundir, tokenizer, tokenizer_files


def unpermute_llama_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute):

        gguf = hf.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(hf.shape)

    Hugging Face's RoPE rotates row i of a head with row i + head_dim/2 (the two halves); llama.cpp's
    rotates rows 2i and 2i+1 (interleaved pairs), so the converter moves HF row h*D + s*D/2 + i to
    GGUF row h*D + 2i + s (s = 0, 1). The inverse reads GGUF's (n_heads, D/2, 2) rows back as
    (n_heads, 2, D/2). weight: (n_heads * head_dim, ...) -- q_proj with n_heads = n_head, k_proj with
    n_heads = n_kv_head; works for biases (1-D) too."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])   # (H, D/2, 2, ...)
            .transpose(1, 2).reshape(weight.shape))                              # (H, 2, D/2, ...) -> rows


# Names: ours on the left, Hugging Face's on the right ({i} = layer); GGUF's beside Hugging Face's.
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                    "Qwen3ForCausalLM": "qwen3"}
HF_NAMES = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
HF_LAYER_NAMES = {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight",
                  "attn.q.weight": "self_attn.q_proj.weight", "attn.q.bias": "self_attn.q_proj.bias",
                  "attn.proj.weight": "self_attn.o_proj.weight", "attn.q_norm.weight": "self_attn.q_norm.weight",
                  "attn.k_norm.weight": "self_attn.k_norm.weight", "ffn.w1.weight": "mlp.gate_proj.weight",
                  "ffn.w3.weight": "mlp.up_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight"}
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
                    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
                    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
                    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


REQUIRED = object()                 # checked()'s default for a field that must be present
MAX_CONTEXT = 1 << 24               # the longest context a file may claim (16M tokens; no released model is longer)


def checked(source: dict, key: str, kind: type, where: str, default=REQUIRED, low: int = 1, high: int | None = None):
    """source[key] (`default` where it is absent or null), if it is of `kind`: int (never a bool) in [low, high],
    float (an int or float, finite, > 0; returned as a float), bool, str, list or dict. Anything else, or a
    required key missing, is a one-line CheckpointError "{where}: {key} must be ..., not ...". Every field the
    loaders read from someone else's file goes through here."""
    value = source.get(key)
    if value is None and default is not REQUIRED:
        return default
    if kind is int:
        ok = type(value) is int and low <= value and (high is None or value <= high)
        wanted = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
    elif kind is float:
        ok = type(value) in (int, float) and 0 < value <= sys.float_info.max     # not NaN, inf, 10**400
        wanted, value = "a finite number > 0", float(value) if ok else value
    else:
        ok = type(value) is kind
        wanted = {bool: "true or false", str: "a string", list: "a list", dict: "an object"}[kind]
    if not ok:
        shown = "missing" if value is None else repr(value)[:80]
        raise cli.CheckpointError(f"{where}: {key} must be {wanted}, not {shown}")
    return value


def config_from_hf(hf: dict, path: str) -> M.Config:
    """Our Config from a Hugging Face config.json (transformers 4.x keys and 5.x `rope_parameters`). Every field
    read is checked (missing, wrong type, out of range): a CheckpointError naming config.json and the field."""
    where = os.path.join(path, "config.json")
    def field(key, kind, default=REQUIRED, source=hf, **bounds):
        return checked(source, key, kind, where, default, **bounds)
    architectures = field("architectures", list, [])
    family = HF_ARCHITECTURES.get(architectures[0]) if architectures and type(architectures[0]) is str else None
    if family is None:
        raise cli.CheckpointError(f"{where}: architecture {repr(architectures[:1])[:80]} is not supported; "
                                  f"choose one of {', '.join(HF_ARCHITECTURES)}")
    if (field("hidden_act", str, "silu") != "silu" or field("mlp_bias", bool, False)
            or (family == "llama" and field("attention_bias", bool, False))):
        raise cli.CheckpointError(f"{where}: only SiLU-gated FFNs without MLP biases (and Llama without attention "
                                  "biases) are supported")
    rope = {**field("rope_scaling", dict, {}), **field("rope_parameters", dict, {})}
    scaling = field("rope_type", str, field("type", str, "default", rope), rope)
    if scaling not in ("default", "llama3"):
        raise cli.CheckpointError(f"{where}: rope scaling {scaling[:80]!r} is not supported (default, llama3)")
    n_head, n_embd = field("num_attention_heads", int), field("hidden_size", int)
    try:
        return M.Config(vocab_size=field("vocab_size", int),
                        block_size=field("max_position_embeddings", int, 2048, high=MAX_CONTEXT),
                        n_layer=field("num_hidden_layers", int, low=0), n_head=n_head,
                        n_kv_head=field("num_key_value_heads", int, n_head), n_embd=n_embd,
                        head_dim=field("head_dim", int, n_embd // n_head), ffn="swiglu",
                        ffn_hidden=field("intermediate_size", int), norm="rmsnorm",
                        norm_eps=field("rms_norm_eps", float, 1e-6),
                        rope_base=field("rope_theta", float, field("rope_theta", float, 10000.0), rope),
                        rope_scaling="llama3" if scaling == "llama3" else "none",
                        rope_factor=field("factor", float, 8.0, rope),
                        rope_low_freq_factor=field("low_freq_factor", float, 1.0, rope),
                        rope_high_freq_factor=field("high_freq_factor", float, 4.0, rope),
                        rope_original_context=field("original_max_position_embeddings", int, 8192, rope,
                                                    high=MAX_CONTEXT),
                        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                        tie_embeddings=field("tie_word_embeddings", bool, False))
    except ValueError as e:                        # the fields disagree (heads that do not divide, ...)
        raise cli.CheckpointError(f"{where}: invalid config ({e})") from None


def config_to_hf(cfg: M.Config) -> dict:
    """A config.json that transformers loads unchanged: Qwen3 (q/k norms), Qwen2 (q/k/v biases) or Llama."""
    llama_like = (cfg.ffn == "swiglu" and cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.pos == "rope"
                  and not cfg.bias)
    if not llama_like:
        raise cli.UserError("only pre-norm RMSNorm + RoPE + SwiGLU models without biases (the Llama family) can be "
                            f"exported to Hugging Face; this one has ffn={cfg.ffn}, norm={cfg.norm}, "
                            f"norm_position={cfg.norm_position}, pos={cfg.pos}, bias={cfg.bias}")
    architecture, model_type = (("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else
                                ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama"))
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_context)
    hf = {"architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_width, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
          "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
          "rope_theta": cfg.rope_base, "rope_scaling": None if cfg.rope_scaling == "none" else
          {k: v for k, v in rope.items() if k != "rope_theta"}, "rope_parameters": rope,
          "torch_dtype": "float32", "dtype": "float32"}
    if model_type == "qwen2":
        hf["attention_bias"] = True
    return hf


def state_dict_from_hf(tensors: dict, cfg: M.Config, path: str) -> dict:
    """Hugging Face tensor names -> ours, in one pass over the tensors the file holds (never a loop over the
    layers its config claims); k_proj and v_proj become the rows of our fused kv projection. Names that are not
    weights here (an old checkpoint's rotary_emb.inv_freq) are left out; check_weights finds what is missing."""
    names = {hf: ours for ours, hf in HF_NAMES.items()}
    layer_names = {hf: ours for ours, hf in HF_LAYER_NAMES.items()}
    state = {}
    for name, tensor in tensors.items():
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if layer is None:
            if name in names:
                state[names[name]] = tensor
        elif layer[2] in layer_names:
            state[f"blocks.{layer[1]}.{layer_names[layer[2]]}"] = tensor
        elif layer[2] in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
            kind = layer[2].rsplit(".", 1)[1]
            v_name = f"model.layers.{layer[1]}.self_attn.v_proj.{kind}"
            if v_name not in tensors:
                raise cli.CheckpointError(f"{path}: tensor {v_name!r} is missing")
            if tensors[v_name].shape != tensor.shape:
                raise cli.CheckpointError(f"{path}: {name} is {tuple(tensor.shape)} but {v_name} is "
                                          f"{tuple(tensors[v_name].shape)}")
            state[f"blocks.{layer[1]}.attn.kv.{kind}"] = torch.cat([tensor, tensors[v_name]], 0)   # (2 Hkv d, ...)
    if cfg.tie_embeddings and "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def state_dict_to_hf(state: dict, cfg: M.Config) -> dict:
    """Ours -> Hugging Face names (the inverse of state_dict_from_hf); a tied lm_head is not written."""
    tensors = {theirs: state[ours] for ours, theirs in HF_NAMES.items() if ours in state}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    kv_rows = cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        for ours, theirs in HF_LAYER_NAMES.items():
            if f"blocks.{i}.{ours}" in state:
                tensors[f"model.layers.{i}.{theirs}"] = state[f"blocks.{i}.{ours}"]
        for kind in ("weight", "bias"):
            if f"blocks.{i}.attn.kv.{kind}" in state:
                kv = state[f"blocks.{i}.attn.kv.{kind}"]
                tensors[f"model.layers.{i}.self_attn.k_proj.{kind}"] = kv[:kv_rows]
                tensors[f"model.layers.{i}.self_attn.v_proj.{kind}"] = kv[kv_rows:]
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def read_json_file(path: str, required: bool = True) -> dict:
    if not os.path.isfile(path):
        if required:
            raise cli.CheckpointError(f"{path}: missing")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise cli.CheckpointError(f"{path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise cli.CheckpointError(f"{path}: expected a JSON object")
    return value


def check_weights(cfg: M.Config, state: dict, path: str) -> None:
    """The config's claims held to the tensors the file actually holds, in time and memory proportional to the
    file and before anything is built: as many layers as distinct layer indices among the tensor names, an
    embedding of shape (vocab_size, n_embd), then exactly the names and shapes of GPT(cfg), worked out from ONE
    block on the meta device (every block has the same shapes, so a claim of 10**9 layers costs nothing), and no
    more weight bytes than the tensors' storages hold (a .pt tensor may be a stride-0 view of a single number).
    A mismatch is a CheckpointError naming the path."""
    def refuse(detail):
        raise cli.CheckpointError(f"{path}: weights do not match its config ({detail})")
    layers = {name.split(".")[1] for name in state if isinstance(name, str) and name.startswith("blocks.")}
    if len(layers) != cfg.n_layer:
        refuse(f"it claims {cfg.n_layer} layers, the file holds the tensors of {len(layers)}")
    embedding = state.get("wte.weight")
    if not torch.is_tensor(embedding) or tuple(embedding.shape) != (cfg.vocab_size, cfg.n_embd):
        refuse(f"wte.weight is {tuple(getattr(embedding, 'shape', ())) or 'missing'}, not (vocab_size, n_embd) = "
               f"{(cfg.vocab_size, cfg.n_embd)}")
    try:
        with torch.device("meta"):
            one = M.GPT(dataclasses.replace(cfg, n_layer=min(cfg.n_layer, 1))).state_dict()
    except (RuntimeError, TypeError):              # a width whose tensors would overflow int64 (torch refuses)
        refuse("its sizes overflow 64-bit tensor sizes")
    expected = {name: tuple(t.shape) for name, t in one.items() if not name.startswith("blocks.")}
    block = {name.removeprefix("blocks.0."): tuple(t.shape) for name, t in one.items() if name.startswith("blocks.")}
    for i in range(cfg.n_layer):                   # n_layer <= the number of tensors in the file (checked above)
        expected.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    missing = sorted(set(expected) - set(state))
    extra = sorted(map(str, set(state) - set(expected)))
    wrong = [k for k in expected if not torch.is_tensor(state.get(k)) or tuple(state[k].shape) != expected[k]]
    if missing or extra or wrong:
        refuse(f"missing {missing[0]}" if missing else f"unexpected {extra[0][:80]}" if extra else
               f"{wrong[0]} has shape {tuple(getattr(state[wrong[0]], 'shape', ()))}, "
               f"config implies {expected[wrong[0]]}")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    claimed = sum(t.numel() * t.element_size() for name, t in state.items()
                  if not (cfg.tie_embeddings and name == "lm_head.weight"))
    if claimed > sum(storages.values()):
        refuse(f"its tensors claim {claimed} bytes but their storages hold {sum(storages.values())}")


def build_checkpoint_model(cfg: M.Config, state: dict, path: str) -> M.GPT:
    """A GPT from a state dict read from someone else's file, once check_weights has held the config to it."""
    check_weights(cfg, state, path)
    model = M.GPT(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def load_hf(folder: str):
    """A Hugging Face model folder: config.json, model.safetensors (or shards with
    model.safetensors.index.json), tokenizer.json (or Llama 3's tiktoken tokenizer.model),
    tokenizer_config.json and generation_config.json (its eos ids stop generation; each must be a row of
    the embedding, checked here rather than at the first generation after training)."""
    hf = read_json_file(os.path.join(folder, "config.json"))
    cfg = config_from_hf(hf, folder)
    generation_path = os.path.join(folder, "generation_config.json")
    eos = read_json_file(generation_path, required=False).get("eos_token_id")
    eos_ids = eos if type(eos) is list else [] if eos is None else [eos]
    if not all(type(i) is int and 0 <= i < cfg.vocab_size for i in eos_ids):
        raise cli.CheckpointError(f"{generation_path}: eos_token_id must be a token id below vocab_size "
                                  f"{cfg.vocab_size} or a list of them, not {repr(eos)[:80]}")
    try:
        tensors = formats.read_safetensors_folder(folder)
    except ValueError as e:
        raise cli.CheckpointError(str(e)) from None
    model = build_checkpoint_model(cfg, state_dict_from_hf(tensors, cfg, folder), folder)
    try:
        spec = folder_tokenizer_spec(folder, cfg.vocab_size)
        enc = tokenizer.encoding_from_spec(spec)
    except ValueError as e:
        raise cli.CheckpointError(str(e) if str(e).startswith(folder) else f"{folder}: {e}") from None
    enc.stop_token_ids = tuple(eos_ids)
    return model, tokenizer.set_chat_format(enc), {"config": asdict(cfg), "meta": {}, "source": folder}


def folder_tokenizer_spec(folder: str, vocab_size: int) -> dict:
    """The tokenizer spec of a Hugging Face folder: tokenizer.json (+ tokenizer_config.json), or Llama 3's
    tiktoken ranks file tokenizer.model, whose special tokens tokenizer_config.json lists."""
    config = read_json_file(os.path.join(folder, "tokenizer_config.json"), required=False)
    tokenizer_json, ranks_file = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
    if os.path.isfile(tokenizer_json):
        return tokenizer_files.tokenizer_spec_from_json(read_json_file(tokenizer_json), config, vocab_size,
                                                        tokenizer_json)
    if os.path.isfile(ranks_file):
        where = os.path.join(folder, "tokenizer_config.json")
        named = {role: tokenizer_files.token_content(config.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
        added = {k: tokenizer_files.token_content(v) for k, v in checked(config, "added_tokens_decoder", dict, where,
                                                                         {}).items()}
        if not (all(k.isdecimal() and type(t) is str for k, t in added.items())
                and all(t is None or type(t) is str for t in named.values())):
            raise cli.CheckpointError(f"{where}: added_tokens_decoder must map ids to tokens, and bos/eos/pad_token "
                                      "name tokens")
        specials = {token: int(k) for k, token in added.items()}
        return tokenizer_files.tokenizer_spec_from_tiktoken_file(ranks_file, specials, **named, vocab_size=vocab_size)
    raise cli.CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model")


def config_from_gguf(metadata: dict, tensors: dict, path: str) -> M.Config:
    """Our Config from GGUF metadata ({arch}.block_count, .embedding_length, ...; arch = llama, qwen2, qwen3),
    every key read checked (missing, wrong type, out of range): a CheckpointError naming the path and the key."""
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise cli.CheckpointError(f"{path}: GGUF architecture {repr(arch)[:80]} is not supported "
                                  "(llama, qwen2, qwen3)")
    def key(name, kind, default=REQUIRED, **bounds):
        return checked(metadata, f"{arch}.{name}", kind, path, default, **bounds)
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_head, n_embd = key("attention.head_count", int), key("embedding_length", int)
    try:
        return M.Config(vocab_size=key("vocab_size", int, len(tokens) if type(tokens) is list and tokens else
                                       REQUIRED),
                        block_size=key("context_length", int, 2048, high=MAX_CONTEXT),
                        n_layer=key("block_count", int, low=0), n_head=n_head,
                        n_kv_head=key("attention.head_count_kv", int, n_head), n_embd=n_embd,
                        head_dim=key("attention.key_length", int, n_embd // n_head), ffn="swiglu",
                        ffn_hidden=key("feed_forward_length", int), norm="rmsnorm",
                        norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-6),
                        rope_base=key("rope.freq_base", float, 10000.0), qkv_bias="blk.0.attn_q.bias" in tensors,
                        qk_norm="blk.0.attn_q_norm.weight" in tensors, tie_embeddings="output.weight" not in tensors)
    except ValueError as e:                        # the keys disagree (heads that do not divide, ...)
        raise cli.CheckpointError(f"{path}: invalid config ({e})") from None


def load_gguf(path: str):
    """A GGUF file (llama.cpp's format): tensors dequantised to fp32, the tokenizer from its metadata.
    llama.cpp stores Llama's q and k rows permuted for its interleaved RoPE; they are put back in the
    half-split order of Hugging Face and of this file's apply_rope (unpermute_llama_qk)."""
    try:
        metadata, tensors = formats.read_gguf(path)
        cfg = config_from_gguf(metadata, tensors, path)
        names = {gguf: hf for hf, gguf in GGUF_NAMES.items()}
        layer_names = {gguf: hf for hf, gguf in GGUF_LAYER_NAMES.items()}
        hf_tensors = {}
        for name, tensor in tensors.items():      # one pass over the tensors present, whatever the layer count
            layer = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            hf_tensors[f"model.layers.{layer[1]}.{layer_names.get(layer[2], layer[2])}" if layer else
                       names.get(name, name)] = tensor
        if metadata["general.architecture"] == "llama":
            for name in hf_tensors:
                for proj, heads in (("q_proj", cfg.n_head), ("k_proj", cfg.n_kv_head)):
                    if name.endswith(f".self_attn.{proj}.weight"):
                        hf_tensors[name] = unpermute_llama_qk(hf_tensors[name], heads)
        model = build_checkpoint_model(cfg, state_dict_from_hf(hf_tensors, cfg, path), path)
        n_tokens = len(metadata.get("tokenizer.ggml.tokens") or ())
        for role in ("bos", "eos", "padding"):           # ids of tokens: an id past them would be dropped silently
            checked(metadata, f"tokenizer.ggml.{role}_token_id", int, path, None, low=0, high=n_tokens - 1)
        enc = tokenizer.encoding_from_spec(tokenizer_files.tokenizer_spec_from_gguf(metadata, cfg.vocab_size, path))
    except ValueError as e:
        raise cli.CheckpointError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    return model, tokenizer.set_chat_format(enc), {"config": asdict(cfg), "meta": {}, "source": path}


def save_hf(directory: str, model, enc: tiktoken.Encoding) -> None:
    """A folder that transformers (and vLLM) load unchanged: config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json and generation_config.json. Only Llama-family models (pre-norm
    RMSNorm, RoPE, SwiGLU, no biases but Qwen2's) can be exported.

    The folder is written whole or not at all (rundir.atomic_folder): into a temporary folder beside it, which
    then takes its place, so a crash leaves the previous export as it was. It replaces the whole folder, so an
    existing `directory` must be a model folder (it has config.json) or empty; anything else is refused
    (UserError) before anything is written."""
    model = M.unwrap(model)
    hf = config_to_hf(model.config)
    spec = (enc.spec if isinstance(enc, tokenizer.SpecEncoding)
            else tokenizer_files.tokenizer_spec_from_encoding(enc, model.config.vocab_size))
    state = model.state_dict()
    bad = cli.non_finite_tensors(state)
    if bad:
        raise cli.NonFiniteError(f"{directory}: not exported, {bad[0]} holds NaN or inf")
    hf.update(bos_token_id=getattr(enc, "token_id", lambda t: None)(spec.get("bos")),
              eos_token_id=tokenizer.end_of_turn(enc), pad_token_id=tokenizer.pad_id(enc))
    files = {"config.json": hf, "tokenizer.json": tokenizer_files.tokenizer_json_from_spec(spec),
             "tokenizer_config.json": tokenizer_files.tokenizer_config_from_spec(spec),
             "generation_config.json": {"eos_token_id": sorted(set(tokenizer.stop_ids(enc))),
                                        "pad_token_id": tokenizer.pad_id(enc)}}
    rundir.check_replaceable(directory, "config.json")
    with rundir.atomic_folder(directory) as folder:
        formats.write_safetensors(os.path.join(folder, "model.safetensors"), state_dict_to_hf(state, model.config),
                                  {"format": "pt"})
        for name, content in files.items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=1, ensure_ascii=False)

