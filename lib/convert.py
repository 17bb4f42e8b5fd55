"""Real models <-> this project's GPT: Hugging Face folders and GGUF files of the Llama, Mistral and Qwen families.

Llama (Llama 3.x, SmolLM2), Mistral (without a sliding window), Qwen2 / Qwen2.5 and Qwen3 map onto model.GPT with
config switches: RMSNorm, RoPE (with Llama 3 scaling), SwiGLU, grouped-query attention, q/k/v biases (Qwen2) or
q/k norms (Qwen3). load_hf and load_gguf read a folder or a .gguf file into (GPT, tokenizer, checkpoint dict);
save_hf writes a folder that transformers (and vLLM) load unchanged.

What loads is a closed list, so a model is never loaded with part of its forward pass silently dropped. Every
top-level key of config.json is read and implemented (HF_READ), known not to change the forward pass of
inference or training here (HF_INERT), or accepted only at the value that means "off" (HF_OFF); inside
rope_scaling / rope_parameters only the keys of default and llama3 RoPE (ROPE_KEYS). A GGUF file's `{arch}.` keys
likewise (GGUF_READ, GGUF_OFF; general.* and tokenizer.* do not enter the forward pass). Every tensor name must
map onto a weight here (an old checkpoint's rotary_emb.inv_freq, recomputed from the config, is the one name
skipped); a GGUF's rope_freqs.weight is recognised as Llama 3 rope scaling (llama3_rope_from_factors). Anything
else (a sliding window that masks within the context, another RoPE scaling, soft-capping, biases the model does
not have, experts) is refused with one line naming the file, the field and its value.

A file read here may be hostile: every field read is checked (checked), and the config's claims are held to the
tensors the file holds before anything is built (check_weights), so a tiny file claiming 10**9 layers is refused
in milliseconds.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
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
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                    "Qwen3ForCausalLM": "qwen3"}       # architecture: its model_type (transformers builds from that)
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


SUPPORTED = "supported: Llama, Mistral without a sliding window, Qwen2, Qwen3"

# config.json, a closed list: each top-level key is read into Config below (HF_READ), does not change the forward
# pass of inference or training here (HF_INERT), or is accepted only at its "off" value (HF_OFF). Anything else is
# refused, naming the key. Checked against the configs transformers writes (to_dict, save_pretrained) for Llama,
# Mistral, Qwen2 and Qwen3, and those of Llama 3.x, SmolLM2, Mistral 7B, Qwen2.5, Qwen3, DeepSeek-R1-Distill-Qwen.
HF_READ = ("architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "rope_theta",
           "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "sliding_window",
           "use_sliding_window", "max_window_layers", "layer_types")
HF_INERT = {
    "_name_or_path": "where transformers read it from", "transformers_version": "the version that wrote it",
    **dict.fromkeys(("torch_dtype", "dtype"), "the stored tensors' dtype: they are read to fp32"),
    **dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id"),
                    "ids of special tokens: the tokenizer files and generation_config.json name the ones used"),
    "use_cache": "whether transformers' generate keeps a KV cache",
    "initializer_range": "the initialisation of a model trained from scratch",
    "pretraining_tp": "Llama 2's tensor-parallel split of the same matmuls; transformers 5's Llama ignores it",
    "is_llama_config": "nanotron's marker (SmolLM2)", "transformers.js_config": "transformers.js's dtype choices",
    **dict.fromkeys(("unsloth_version", "unsloth_fixed"), "Unsloth's marks of the version that saved it"),
    **dict.fromkeys(("_attn_implementation", "_attn_implementation_autoset"),
                    "which attention kernel transformers runs (eager, sdpa, flash): the same math"),
    **dict.fromkeys(("id2label", "label2id", "problem_type", "finetuning_task", "prefix", "task_specific_params",
                     "tokenizer_class"), "metadata of tasks and classification heads, which a causal LM does not use"),
    **dict.fromkeys(("output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16",
                     "tf_legacy_loss", "is_decoder", "chunk_size_feed_forward", "tie_encoder_decoder",
                     "cross_attention_hidden_size"),
                    "what transformers' forward returns and how it runs, or encoder-decoder settings; not the math"),
    **dict.fromkeys(("max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
                     "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
                     "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                     "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
                     "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
                     "suppress_tokens", "begin_suppress_tokens"),
                    "transformers 4's generation defaults: they pick tokens from the logits, not the logits"),
}
HF_OFF = {  # key: (the values that mean off, what another value would turn on)
    "attention_dropout": ((0,), "dropout on the attention weights in training"),
    "mlp_bias": ((False,), "biases on the FFN projections"),
    "attention_bias": ((False,), "biases on q, k, v and o"),
    "partial_rotary_factor": ((1,), "RoPE on only part of each head"),
    "attn_logit_softcapping": ((None,), "tanh soft-capping of attention scores"),
    "final_logit_softcapping": ((None,), "tanh soft-capping of the logits"),
    "use_mrope": ((False,), "multimodal RoPE sections (Qwen2-VL)"),
    "rope_interleaved": ((False,), "RoPE on interleaved pairs, not the two halves"),
    "pruned_heads": (({},), "attention heads removed"),
    "add_cross_attention": ((False,), "cross-attention to an encoder"),
    "is_encoder_decoder": ((False,), "an encoder-decoder model"),
}
ROPE_KEYS = {  # rope_scaling / rope_parameters: the keys each RoPE type implemented here reads
    "default": ("rope_type", "type", "rope_theta", "partial_rotary_factor"),
    "llama3": ("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
               "high_freq_factor", "original_max_position_embeddings"),
}
# GGUF metadata under `{arch}.` (llama.cpp's names), the same closed list; attention.key_length, value_length and
# rope.dimension_count must equal the head width (rotary over part of a head is refused), attention.sliding_window
# must not mask within the context.
GGUF_READ = ("vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
             "attention.key_length", "attention.value_length", "rope.dimension_count", "attention.sliding_window")
GGUF_OFF = {
    "expert_count": ((0,), "a mixture of experts"), "expert_used_count": ((0,), "a mixture of experts"),
    "rope.scaling.type": (("none",), "RoPE scaling: linear, yarn, ..."),
    "rope.scaling.factor": ((1,), "RoPE scaling"),
    "attention.causal": ((True,), "attention to later tokens"),
}
# The one tensor name that maps onto no weight and is skipped: RoPE's frequencies, which older transformers saved
# and which are recomputed from the config (as transformers itself does).
HF_SKIPPED_TENSOR = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def is_off(value, offs: tuple) -> bool:
    """value is one of `offs`, as the same kind of value (an int and a float are both numbers; a bool is not)."""
    number = (int, float)
    return any(value == off and (type(value) is type(off) or (type(value) in number and type(off) in number))
               for off in offs)


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
    """Our Config from a Hugging Face config.json (transformers 4.x keys and 5.x `rope_parameters`). Every key is
    in the closed list (HF_READ, HF_INERT, HF_OFF) and every field read is checked (missing, wrong type, out of
    range): otherwise a one-line CheckpointError naming config.json, the field and its value."""
    where = os.path.join(path, "config.json")
    def field(key, kind, default=REQUIRED, source=hf, **bounds):
        return checked(source, key, kind, where, default, **bounds)
    def refuse(key, value, why):
        raise cli.CheckpointError(f"{where}: {key[:80]} {repr(value)[:80]} is not supported ({why}); {SUPPORTED}")
    architectures = field("architectures", list, [])
    model_type = HF_ARCHITECTURES.get(architectures[0]) if architectures and type(architectures[0]) is str else None
    if model_type is None:
        raise cli.CheckpointError(f"{where}: architecture {repr(architectures[:1])[:80]} is not supported; "
                                  f"choose one of {', '.join(HF_ARCHITECTURES)}")
    if field("model_type", str, model_type) != model_type:       # transformers builds the model model_type names
        refuse("model_type", hf["model_type"], f"{architectures[0]} is model_type {model_type!r}")
    for key, value in hf.items():      # (Qwen2 ignores attention_bias: its q/k/v always have biases, o never)
        if key in HF_READ or key in HF_INERT or (key == "attention_bias" and model_type == "qwen2"):
            continue
        if key not in HF_OFF:
            refuse(key, value, "a field this loader does not implement")
        if not is_off(value, HF_OFF[key][0]):
            refuse(key, value, f"{HF_OFF[key][1]}; only {HF_OFF[key][0][0]!r} loads")
    if field("hidden_act", str, "silu") not in ("silu", "swish"):     # transformers' swish is SiLU too
        refuse("hidden_act", hf["hidden_act"], "the FFN here is SwiGLU, gated by SiLU")

    # RoPE: transformers 4 and 5 both take rope_scaling where it is set, else rope_parameters (5's name)
    field("rope_parameters", dict, {})
    rope_key = "rope_scaling" if field("rope_scaling", dict, {}) else "rope_parameters"
    rope = field(rope_key, dict, {})
    scaling = field("rope_type", str, field("type", str, "default", rope), rope)
    if scaling not in ROPE_KEYS:
        refuse(f"{rope_key}.rope_type", scaling, "only default and llama3 RoPE are implemented")
    for key, value in rope.items():
        if key not in ROPE_KEYS[scaling]:
            refuse(f"{rope_key}.{key}", value, f"not a field of {scaling} RoPE")
        if key == "partial_rotary_factor" and not is_off(value, (1,)):
            refuse(f"{rope_key}.{key}", value, HF_OFF[key][1])
    llama3 = {} if scaling == "default" else dict(        # transformers requires each of them
        rope_scaling="llama3", rope_factor=field("factor", float, source=rope),
        rope_low_freq_factor=field("low_freq_factor", float, source=rope),
        rope_high_freq_factor=field("high_freq_factor", float, source=rope),
        rope_original_context=field("original_max_position_embeddings", int, source=rope, high=MAX_CONTEXT))

    # Sliding-window attention, decided as transformers decides it: Qwen2/Qwen3 slide only with use_sliding_window,
    # in the layers from max_window_layers on (or those layer_types names); Mistral in every layer (Llama ignores
    # the key; it is held to the same rule). A query at i sees keys j > i - window (masking_utils), so a window at
    # least the context long (max_position_embeddings) masks nothing within it; a shorter one is refused.
    block_size = field("max_position_embeddings", int, 2048, high=MAX_CONTEXT)
    n_layer = field("num_hidden_layers", int, low=0)
    qwen = model_type in ("qwen2", "qwen3")
    window = field("sliding_window", int, None)
    if qwen and not field("use_sliding_window", bool, False):
        window = None
    layer_types = field("layer_types", list, None)
    if layer_types is not None and any(kind not in ("full_attention", "sliding_attention") for kind in layer_types):
        refuse("layer_types", layer_types, "only full_attention and sliding_attention layers")
    sliding = (("sliding_attention" in layer_types) if qwen and layer_types is not None else
               window is not None and (not qwen or field("max_window_layers", int, 28, low=0) < n_layer))
    if sliding and window is None:
        refuse("layer_types", layer_types, "sliding_attention layers without a sliding_window")
    if sliding and window < block_size:
        refuse("sliding_window", window, "attention here sees the whole context, and this window masks within "
                                         f"max_position_embeddings {block_size}")

    n_head, n_embd = field("num_attention_heads", int), field("hidden_size", int)
    try:
        return M.Config(vocab_size=field("vocab_size", int), block_size=block_size, n_layer=n_layer, n_head=n_head,
                        n_kv_head=field("num_key_value_heads", int, n_head), n_embd=n_embd,
                        head_dim=field("head_dim", int, n_embd // n_head), ffn="swiglu",
                        ffn_hidden=field("intermediate_size", int), norm="rmsnorm",
                        norm_eps=field("rms_norm_eps", float, 1e-6),
                        rope_base=field("rope_theta", float, field("rope_theta", float, 10000.0), rope), **llama3,
                        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
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
    layers its config claims); k_proj and v_proj become the rows of our fused kv projection. A name that maps onto
    no weight here (an o_proj bias, experts, ...) is refused, naming it; only HF_SKIPPED_TENSOR (an old
    checkpoint's rotary_emb.inv_freq) is left out. check_weights then finds what is missing or does not fit."""
    names = {hf: ours for ours, hf in HF_NAMES.items()}
    layer_names = {hf: ours for ours, hf in HF_LAYER_NAMES.items()}
    state = {}
    for name, tensor in tensors.items():
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if name in names:
            state[names[name]] = tensor
        elif layer and layer[2] in layer_names:
            state[f"blocks.{layer[1]}.{layer_names[layer[2]]}"] = tensor
        elif layer and layer[2] in ("self_attn.k_proj.weight", "self_attn.k_proj.bias"):
            kind = layer[2].rsplit(".", 1)[1]
            v_name = f"model.layers.{layer[1]}.self_attn.v_proj.{kind}"
            if v_name not in tensors:
                raise cli.CheckpointError(f"{path}: tensor {v_name!r} is missing")
            if tensors[v_name].shape != tensor.shape:
                raise cli.CheckpointError(f"{path}: {name} is {tuple(tensor.shape)} but {v_name} is "
                                          f"{tuple(tensors[v_name].shape)}")
            state[f"blocks.{layer[1]}.attn.kv.{kind}"] = torch.cat([tensor, tensors[v_name]], 0)   # (2 Hkv d, ...)
        elif not (layer and layer[2] in ("self_attn.v_proj.weight", "self_attn.v_proj.bias")   # read with k_proj
                  or HF_SKIPPED_TENSOR.fullmatch(name)):
            raise cli.CheckpointError(f"{path}: tensor {name[:120]!r} is not supported (no weight of this model "
                                      f"maps onto it); {SUPPORTED}")
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


def llama3_rope_from_factors(cfg: M.Config, factors: torch.Tensor, path: str) -> M.Config:
    """Llama 3's rope scaling read back from a GGUF's rope_freqs.weight. llama.cpp's converter stores it not as
    metadata but as r (d/2,), the number each RoPE frequency is divided by: theta_i / r_i
    (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors). In Llama 3's formula (model.rope_frequencies)
    r_i = factor for long waves, 1 for short ones, and in between 1/r_i = (1 - s_i) / factor + s_i with
        s_i = (L / lambda_i - low) / (high - low) = a * theta_i + b,     lambda_i = 2 pi / theta_i,
    so factor = max r, and a line through the in-between points gives low and high for L = 8192 (only L / low
    and L / high matter; Llama 3.x's own 1 and 4 where fewer than two points lie in between). The config is
    taken only if its frequencies reproduce theta_i / r_i; anything else is refused, naming the tensor."""
    def refuse(why):
        raise cli.CheckpointError(f"{path}: tensor rope_freqs.weight is not supported ({why}; load the Hugging "
                                  "Face folder instead)")
    r = factors.double().flatten()                # checked before theta, whose size the file's config claims
    if 2 * r.numel() != cfg.head_dim or not (torch.isfinite(r).all() and (r >= 1).all()):
        refuse(f"it holds {tuple(factors.shape)} factors, not head_dim / 2 = {cfg.head_dim // 2} factors >= 1")
    theta = M.rope_frequencies(cfg).double()                               # (d/2,) unscaled
    if (r == 1).all():
        return cfg
    factor = float(r.max())
    s = (1 / r - 1 / factor) / (1 - 1 / factor)                            # 0: long waves, 1: short waves
    between = (s > 1e-6) & (s < 1 - 1e-6)
    L, low, high = 8192, 1.0, 4.0
    if between.sum() >= 2:
        (t0, t1), (s0, s1) = theta[between][[0, -1]].tolist(), s[between][[0, -1]].tolist()
        a = (s1 - s0) / (t1 - t0)                                           # = L / (2 pi (high - low))
        width = L / (2 * math.pi * a)
        low = float(f"{(a * t0 - s0) * width:.6g}")                         # b = -low / (high - low)
        high = float(f"{low + width:.6g}")
    try:
        scaled = dataclasses.replace(cfg, rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=low,
                                     rope_high_freq_factor=high, rope_original_context=L)
    except ValueError:
        refuse("its factors are not Llama 3's rope scaling")
    if not torch.allclose(M.rope_frequencies(scaled).double(), theta / r, rtol=1e-5, atol=0):
        refuse("its factors are not Llama 3's rope scaling")
    return scaled


def config_from_gguf(metadata: dict, tensors: dict, path: str) -> M.Config:
    """Our Config from GGUF metadata ({arch}.block_count, .embedding_length, ...; arch = llama, qwen2, qwen3),
    every `{arch}.` key in the closed list (GGUF_READ, GGUF_OFF) and every key read checked (missing, wrong type,
    out of range): otherwise a CheckpointError naming the path and the key. A rope_freqs.weight tensor is read as
    Llama 3 rope scaling (llama3_rope_from_factors)."""
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise cli.CheckpointError(f"{path}: GGUF architecture {repr(arch)[:80]} is not supported "
                                  "(llama, qwen2, qwen3)")
    def key(name, kind, default=REQUIRED, **bounds):
        return checked(metadata, f"{arch}.{name}", kind, path, default, **bounds)
    def refuse(name, value, why):
        raise cli.CheckpointError(f"{path}: {name[:80]} {repr(value)[:80]} is not supported ({why}); {SUPPORTED}")
    for name, value in metadata.items():
        short = name.removeprefix(f"{arch}.")
        if short == name or short in GGUF_READ:
            continue
        if short not in GGUF_OFF:
            refuse(name, value, "a field this loader does not implement")
        if not is_off(value, GGUF_OFF[short][0]):
            refuse(name, value, f"{GGUF_OFF[short][1]}; only {GGUF_OFF[short][0][0]!r} loads")
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_head, n_embd = key("attention.head_count", int), key("embedding_length", int)
    head_dim = key("attention.key_length", int, n_embd // n_head)
    for name in ("attention.value_length", "rope.dimension_count"):        # one width for q, k, v and RoPE
        if key(name, int, head_dim) != head_dim:
            refuse(f"{arch}.{name}", metadata[f"{arch}.{name}"], f"it must equal the head width {head_dim}")
    block_size = key("context_length", int, 2048, high=MAX_CONTEXT)
    window = key("attention.sliding_window", int, None)
    if window is not None and window < block_size:
        refuse(f"{arch}.attention.sliding_window", window, "attention here sees the whole context, and this "
                                                           f"window masks within context_length {block_size}")
    try:
        cfg = M.Config(vocab_size=key("vocab_size", int, len(tokens) if type(tokens) is list and tokens else
                                      REQUIRED),
                       block_size=block_size, n_layer=key("block_count", int, low=0), n_head=n_head,
                       n_kv_head=key("attention.head_count_kv", int, n_head), n_embd=n_embd, head_dim=head_dim,
                       ffn="swiglu", ffn_hidden=key("feed_forward_length", int), norm="rmsnorm",
                       norm_eps=key("attention.layer_norm_rms_epsilon", float, 1e-6),
                       rope_base=key("rope.freq_base", float, 10000.0), qkv_bias="blk.0.attn_q.bias" in tensors,
                       qk_norm="blk.0.attn_q_norm.weight" in tensors, tie_embeddings="output.weight" not in tensors)
    except ValueError as e:                        # the keys disagree (heads that do not divide, ...)
        raise cli.CheckpointError(f"{path}: invalid config ({e})") from None
    if "rope_freqs.weight" in tensors:
        cfg = llama3_rope_from_factors(cfg, tensors["rope_freqs.weight"], path)
    return cfg


def load_gguf(path: str):
    """A GGUF file (llama.cpp's format): tensors dequantised to fp32, the tokenizer from its metadata.
    llama.cpp stores Llama's q and k rows permuted for its interleaved RoPE; they are put back in the
    half-split order of Hugging Face and of this file's apply_rope (unpermute_llama_qk). A tensor name outside
    GGUF_NAMES and GGUF_LAYER_NAMES (and rope_freqs.weight, read into the config) is refused, naming it."""
    try:
        metadata, tensors = formats.read_gguf(path)
        cfg = config_from_gguf(metadata, tensors, path)
        names = {gguf: hf for hf, gguf in GGUF_NAMES.items()}
        layer_names = {gguf: hf for hf, gguf in GGUF_LAYER_NAMES.items()}
        hf_tensors = {}
        for name, tensor in tensors.items():      # one pass over the tensors present, whatever the layer count
            layer = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            hf_name = (f"model.layers.{layer[1]}.{layer_names[layer[2]]}" if layer and layer[2] in layer_names
                       else names.get(name))
            if hf_name is None and name != "rope_freqs.weight":
                raise cli.CheckpointError(f"{path}: tensor {name[:120]!r} is not supported (no weight of this model "
                                          f"maps onto it); {SUPPORTED}")
            if hf_name is not None:
                hf_tensors[hf_name] = tensor
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
    if model.config.lora_rank:             # transformers' Llama has no adapters: W + (alpha / r) B A, folded in
        model = copy.deepcopy(model).merge_lora()
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

