"""Real models <-> this project's GPT: Hugging Face folders and GGUF files of the Llama and Qwen families.

Llama (Llama 3.x, SmolLM2), Qwen2 / Qwen2.5 and Qwen3 map onto model.GPT with config switches: RMSNorm,
RoPE (with Llama 3 scaling), SwiGLU, grouped-query attention, q/k/v biases (Qwen2) or q/k norms (Qwen3).
load_hf and load_gguf read a folder or a .gguf file into (GPT, tokenizer, checkpoint dict); save_hf writes
a folder that transformers (and vLLM) load unchanged.
"""
from __future__ import annotations

import json
import os
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


def config_from_hf(hf: dict, path: str) -> M.Config:
    """Our Config from a Hugging Face config.json (transformers 4.x keys and 5.x `rope_parameters`)."""
    architecture = (hf.get("architectures") or ["?"])[0]
    family = HF_ARCHITECTURES.get(architecture)
    if family is None:
        raise cli.CheckpointError(f"{path}: architecture {architecture!r} is not supported; "
                                  f"choose one of {', '.join(HF_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias") or (family == "llama" and hf.get("attention_bias")):
        raise cli.CheckpointError(f"{path}: only SiLU-gated FFNs without MLP biases (and Llama without attention biases) are supported")
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    scaling = rope.get("rope_type", rope.get("type", "default"))
    if scaling not in ("default", "llama3"):
        raise cli.CheckpointError(f"{path}: rope scaling {scaling!r} is not supported (default, llama3)")
    n_head = hf["num_attention_heads"]
    try:
        return M.Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                        n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                        n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                        ffn="swiglu", ffn_hidden=hf["intermediate_size"], norm="rmsnorm",
                        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                        rope_scaling="llama3" if scaling == "llama3" else "none",
                        rope_factor=float(rope.get("factor", 8.0)),
                        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                        rope_original_context=int(rope.get("original_max_position_embeddings", 8192)),
                        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise cli.CheckpointError(f"{path}: config.json is missing or has a bad value ({type(e).__name__}: {e})") from None


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
    """Hugging Face tensor names -> ours; k_proj and v_proj become the rows of our fused kv projection."""
    state = {}
    try:
        for ours, theirs in HF_NAMES.items():
            if theirs in tensors:
                state[ours] = tensors[theirs]
        for i in range(cfg.n_layer):
            prefix = f"model.layers.{i}."
            for ours, theirs in HF_LAYER_NAMES.items():
                if prefix + theirs in tensors:
                    state[f"blocks.{i}.{ours}"] = tensors[prefix + theirs]
            for kind in ("weight", "bias"):
                k, v = prefix + f"self_attn.k_proj.{kind}", prefix + f"self_attn.v_proj.{kind}"
                if k in tensors:
                    state[f"blocks.{i}.attn.kv.{kind}"] = torch.cat([tensors[k], tensors[v]], 0)   # (2 Hkv d, ...)
    except KeyError as e:
        raise cli.CheckpointError(f"{path}: tensor {e} is missing") from None
    if cfg.tie_embeddings:
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


def build_checkpoint_model(cfg: M.Config, state: dict, path: str) -> M.GPT:
    """A GPT from a state dict read from someone else's file: its names and shapes are compared with the
    config's on the meta device first (nothing allocated for a file that does not fit its config)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in M.GPT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or wrong:
        detail = f"missing {missing[0]}" if missing else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {expected[wrong[0]]}"
        raise cli.CheckpointError(f"{path}: weights do not match its config ({detail})")
    model = M.GPT(cfg)
    model.load_state_dict({k: state[k].float() for k in expected})
    return model


def load_hf(folder: str):
    """A Hugging Face model folder: config.json, model.safetensors (or shards with
    model.safetensors.index.json), tokenizer.json (or Llama 3's tiktoken tokenizer.model),
    tokenizer_config.json and generation_config.json (its eos ids stop generation)."""
    hf = read_json_file(os.path.join(folder, "config.json"))
    cfg = config_from_hf(hf, folder)
    try:
        tensors = formats.read_safetensors_folder(folder)
    except ValueError as e:
        raise cli.CheckpointError(str(e)) from None
    model = build_checkpoint_model(cfg, state_dict_from_hf(tensors, cfg, folder), folder)
    try:
        spec = folder_tokenizer_spec(folder, cfg.vocab_size)
        enc = tokenizer.encoding_from_spec(spec)
    except ValueError as e:
        raise cli.CheckpointError(str(e)) from None
    eos = read_json_file(os.path.join(folder, "generation_config.json"), required=False).get("eos_token_id", [])
    enc.stop_token_ids = tuple(eos if isinstance(eos, list) else [eos])
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
        named = {role: tokenizer_files.token_content(config.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
        specials = {tokenizer_files.token_content(v): int(k) for k, v in config.get("added_tokens_decoder", {}).items()}
        return tokenizer_files.tokenizer_spec_from_tiktoken_file(ranks_file, specials, **named, vocab_size=vocab_size)
    raise cli.CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model")


def config_from_gguf(metadata: dict, tensors: dict, path: str) -> M.Config:
    """Our Config from GGUF metadata ({arch}.block_count, .embedding_length, ...; arch = llama, qwen2, qwen3)."""
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise cli.CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    key = lambda name, default=None: metadata.get(f"{arch}.{name}", default)
    try:
        n_head = int(key("attention.head_count"))
        n_embd = int(key("embedding_length"))
        return M.Config(vocab_size=int(key("vocab_size") or len(metadata["tokenizer.ggml.tokens"])),
                        block_size=int(key("context_length", 2048)), n_layer=int(key("block_count")), n_head=n_head,
                        n_kv_head=int(key("attention.head_count_kv", n_head)), n_embd=n_embd,
                        head_dim=int(key("attention.key_length", n_embd // n_head)), ffn="swiglu",
                        ffn_hidden=int(key("feed_forward_length")), norm="rmsnorm",
                        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
                        rope_base=float(key("rope.freq_base", 10000.0)), qkv_bias="blk.0.attn_q.bias" in tensors,
                        qk_norm="blk.0.attn_q_norm.weight" in tensors, tie_embeddings="output.weight" not in tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise cli.CheckpointError(f"{path}: GGUF metadata is missing or has a bad value ({type(e).__name__}: {e})") from None


def load_gguf(path: str):
    """A GGUF file (llama.cpp's format): tensors dequantised to fp32, the tokenizer from its metadata.
    llama.cpp stores Llama's q and k rows permuted for its interleaved RoPE; they are put back in the
    half-split order of Hugging Face and of this file's apply_rope (unpermute_llama_qk)."""
    try:
        metadata, tensors = formats.read_gguf(path)
        cfg = config_from_gguf(metadata, tensors, path)
        hf_names = {gguf: hf for hf, gguf in GGUF_NAMES.items()}
        for i in range(cfg.n_layer):
            hf_names.update({f"blk.{i}.{gguf}": f"model.layers.{i}.{hf}" for hf, gguf in GGUF_LAYER_NAMES.items()})
        hf_tensors = {hf_names.get(name, name): tensor for name, tensor in tensors.items()}
        if metadata["general.architecture"] == "llama":
            for i in range(cfg.n_layer):
                for proj, heads in (("q_proj", cfg.n_head), ("k_proj", cfg.n_kv_head)):
                    name = f"model.layers.{i}.self_attn.{proj}.weight"
                    if name in hf_tensors:
                        hf_tensors[name] = unpermute_llama_qk(hf_tensors[name], heads)
        model = build_checkpoint_model(cfg, state_dict_from_hf(hf_tensors, cfg, path), path)
        enc = tokenizer.encoding_from_spec(tokenizer_files.tokenizer_spec_from_gguf(metadata, cfg.vocab_size, path))
    except ValueError as e:
        raise cli.CheckpointError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    return model, tokenizer.set_chat_format(enc), {"config": asdict(cfg), "meta": {}, "source": path}


def save_hf(directory: str, model, enc: tiktoken.Encoding) -> None:
    """A folder that transformers (and vLLM) load unchanged: config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json and generation_config.json, each written atomically.
    Only Llama-family models (pre-norm RMSNorm, RoPE, SwiGLU, no biases but Qwen2's) can be exported."""
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
    rundir.claim_run_dir(directory)
    formats.write_safetensors(os.path.join(directory, "model.safetensors"), state_dict_to_hf(state, model.config),
                              {"format": "pt"})
    files = {"config.json": hf, "tokenizer.json": tokenizer_files.tokenizer_json_from_spec(spec),
             "tokenizer_config.json": tokenizer_files.tokenizer_config_from_spec(spec),
             "generation_config.json": {"eos_token_id": sorted(set(tokenizer.stop_ids(enc))),
                                        "pad_token_id": tokenizer.pad_id(enc)}}
    for name, content in files.items():
        with rundir.atomic_write(os.path.join(directory, name)) as f:
            json.dump(content, f, indent=1, ensure_ascii=False)

