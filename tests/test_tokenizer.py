"""Tests of lib/tokenizer.py: the byte-level tokenizer, named tiktoken encodings, the chat formats and the ids
every stage reads (end of turn, stop ids, pad id), decoding, and the added-token matcher.

Oracles: Python's own UTF-8 encoding (one id per byte, and decode gives the text back), the special tokens'
fixed ids (never produced from plain text), the tokenizer rebuilt from its own saved spec, and tiktoken made
to fail as it does offline. Chat prompts: the template text written out byte by byte with each marker's id
looked up by name; tiktoken's own encoding of the whole template text (split at its special tokens) for a
tokenizer with merges; and transformers' apply_chat_template of the ChatML and Meta's Llama 3 Jinja templates
over a BPE tokenizer trained in the test (skipped when transformers is missing). Conversations (encode_chat):
every turn written out byte by byte, with and without a default system prompt, and tiktoken's encoding of the
rendered text with merges; the system prompt through a checkpoint, pickling and the spec check. The added-token matcher
against a brute-force leftmost-longest scan. Split regexes refused at load: tiktoken itself panics on them, or
spends over 100x the CPU time of GPT-2's split. Tokenizers built from tokenizer.json, GGUF metadata and tiktoken
files are tested in test_tokenizer_files.py.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tokenizer.py
"""
from __future__ import annotations

import json
import re
import time

import pytest
import tiktoken
import torch
from hypothesis import given, strategies as st

from lib import checkpoints, cli, tokenizer
from helpers import ENC, EOT, PAD, tiny_model

torch.set_num_threads(1)


@given(text=st.text())
def test_tokenizer_round_trips_arbitrary_unicode(text):
    ids = tokenizer.encode(ENC, text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ENC, ids) == text


@given(a=st.text(max_size=10), b=st.text(max_size=10))
def test_special_tokens_are_not_produced_from_plain_text(a, b):
    text = a + "<|endoftext|>" + b + "<|pad|>"
    ids = tokenizer.encode(ENC, text)
    assert EOT not in ids and PAD not in ids
    assert tokenizer.decode(ENC, ids) == text
    assert tokenizer.decode(ENC, [EOT] + ids + [PAD, PAD]) == text      # decode drops the specials


def test_byte_tokenizer_ids_and_spec():
    assert ENC.eot_token == EOT and tokenizer.pad_id(ENC) == PAD and ENC.n_vocab == 258
    assert tokenizer.tokenizer_from_spec(tokenizer.tokenizer_spec(ENC)).encode_ordinary("héllo") == ENC.encode_ordinary("héllo")


def test_named_encoding_that_cannot_load_offline_is_a_user_error(monkeypatch):
    with pytest.raises(cli.UserError, match="no_such_encoding"):
        tokenizer.get_tokenizer("no_such_encoding")

    def offline(name):
        raise ConnectionError("could not reach openaipublic.blob.core.windows.net")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(cli.UserError, match="gpt2"):
        tokenizer.get_tokenizer("gpt2")


# --- chat formats, end of turn, stop and pad ids ------------------------------------------------

BYTE_RANKS = {bytes([i]): i for i in range(256)}
# ids placed apart from the byte tokenizer's 256/257, so that a wrong marker cannot pass by coincidence
CHATML_IDS = {"<|endoftext|>": 300, "<|im_start|>": 301, "<|im_end|>": 302}
LLAMA3_IDS = {"<|begin_of_text|>": 310, "<|end_of_text|>": 311, "<|start_header_id|>": 312,
              "<|end_header_id|>": 313, "<|eot_id|>": 314, "<|finetune_right_pad_id|>": 315}
MARKERS = [*CHATML_IDS, *LLAMA3_IDS, "<|pad|>"]
# a prompt may hold the markers' strings, which stay plain text
prompts = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(MARKERS + ["\n", "\n\n", " ", "user", "assistant"])),
                   max_size=6).map("".join)


def plain_encoding(specials: dict) -> tiktoken.Encoding:
    """The 256 byte tokens and the given special tokens, as a plain tiktoken.Encoding (no spec, no pad_token_id)."""
    return tiktoken.Encoding(name="bytes-test", pat_str=tokenizer.SPLIT_PATTERN, mergeable_ranks=BYTE_RANKS,
                             special_tokens=specials)


def spec_encoding(specials: dict, eos=None, pad=None, merges=(), added=None) -> tokenizer.SpecEncoding:
    """A real model's kind of tokenizer (SpecEncoding): the byte tokens, then `merges` at ids 256..., the special
    tokens, the non-special added tokens, and the spec's eos and pad token names."""
    ranks = {**BYTE_RANKS, **{m: 256 + i for i, m in enumerate(merges)}}
    added = added or {}
    spec = {"name": "spec-test", "pat_str": tokenizer.SPLIT_PATTERN, "ranks": ranks, "special_tokens": specials,
            "added_tokens": added, "normalized_added_tokens": [], "normalizer": None, "bos": None, "eos": eos,
            "pad": pad, "vocab_size": max([*ranks.values(), *specials.values(), *added.values()]) + 1}
    return tokenizer.encoding_from_spec(spec)


def llama3_encoding(begin_of_text=True) -> tokenizer.SpecEncoding:
    """Llama 3's markers; no <|endoftext|>: its end of sequence is the spec's eos, <|end_of_text|>."""
    specials = {t: i for t, i in LLAMA3_IDS.items() if begin_of_text or t != "<|begin_of_text|>"}
    return spec_encoding(specials, eos="<|end_of_text|>")


@given(prompt=prompts)
def test_chat_prompts_are_the_templates_written_out_byte_by_byte_with_the_markers_ids_by_name(prompt):
    """Byte tokens: every character of the template text is its UTF-8 bytes, every marker its id looked up by
    name, so the expected ids are written out here without any encoder."""
    text = list(prompt.encode("utf-8"))
    chatml = tokenizer.set_chat_format(plain_encoding(CHATML_IDS), "chatml")
    im_start, im_end = CHATML_IDS["<|im_start|>"], CHATML_IDS["<|im_end|>"]
    assert tokenizer.encode_prompt(chatml, prompt) == [im_start, *b"user\n", *text, im_end, *b"\n",
                                                        im_start, *b"assistant\n"]
    ids = LLAMA3_IDS
    head, tail, eot_id = ids["<|start_header_id|>"], ids["<|end_header_id|>"], ids["<|eot_id|>"]
    turns = [head, *b"user", tail, *b"\n\n", *text, eot_id, head, *b"assistant", tail, *b"\n\n"]
    assert tokenizer.encode_prompt(tokenizer.set_chat_format(llama3_encoding(), "llama3"), prompt) == \
        [ids["<|begin_of_text|>"], *turns]
    # a tokenizer without <|begin_of_text|> (it is optional): the same turns, no begin token
    assert tokenizer.encode_prompt(tokenizer.set_chat_format(llama3_encoding(begin_of_text=False), "llama3"),
                                   prompt) == turns
    # none: the text itself, whichever markers the tokenizer has, and also where no format was ever set
    for enc in (tokenizer.set_chat_format(plain_encoding(CHATML_IDS), "none"),
                tokenizer.set_chat_format(tokenizer.get_tokenizer("bytes"), "auto"), tokenizer.get_tokenizer("bytes")):
        assert tokenizer.encode_prompt(enc, prompt) == text


MERGES = [b"us", b"er", b"user", b"\n\n", b"  ", b"as", b"si", b"st", b"assi", b"assist", b"an", b"ant", b" t", b"he"]


@given(prompt=st.text(alphabet=" \n\tuserassint?.x1é", max_size=12))
def test_chat_prompts_with_merges_are_tiktokens_encoding_of_the_template_text(prompt):
    """With BPE merges, where the pieces are cut matters: encode_prompt's ids are tiktoken's own encoding of the
    whole template text, which splits it at the allowed special tokens and encodes each piece between them."""
    chatml = tokenizer.set_chat_format(spec_encoding(CHATML_IDS, eos="<|im_end|>", merges=MERGES), "auto")
    assert chatml.chat_format == "chatml"
    text = "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode_prompt(chatml, prompt) == chatml.encode(text, allowed_special="all")
    llama3 = tokenizer.set_chat_format(spec_encoding(LLAMA3_IDS, eos="<|eot_id|>", merges=MERGES), "auto")
    text = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + prompt +
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.encode_prompt(llama3, prompt) == llama3.encode(text, allowed_special="all")


# The generic ChatML template (transformers' documentation) and Meta's Llama 3 Instruct template, verbatim.
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def hf_chat_tokenizer():
    """transformers' fast tokenizer over a byte-level BPE trained here (no download) with both formats'
    markers, and our Encoding of its tokenizer.json."""
    transformers = pytest.importorskip("transformers", reason="transformers' apply_chat_template is the oracle")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from lib import tokenizer_files
    hf_tokenizer = Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(CHATML_IDS) + list(LLAMA3_IDS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf_tokenizer.train_from_iterator(["user\nassistant\n\n The capital of France is Paris. What is 12+34?\n\n"] * 20,
                                     trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer, bos_token="<|begin_of_text|>")
    spec = tokenizer_files.tokenizer_spec_from_json(json.loads(hf_tokenizer.to_str()))
    return fast, spec


@given(prompt=st.text(max_size=20).filter(lambda p: "<|" not in p))
def test_chat_prompts_equal_transformers_apply_chat_template(hf_chat_tokenizer, prompt):
    """Meta's Llama 3 template trims the message (Jinja's trim), encode_prompt does not: compared on trimmed
    prompts. (transformers parses marker strings inside the message as markers: prompts here hold none.)"""
    fast, spec = hf_chat_tokenizer

    def theirs(template, content):
        ids = fast.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                       add_generation_prompt=True, tokenize=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])
    chatml = tokenizer.set_chat_format(tokenizer.encoding_from_spec(spec), "chatml")
    assert tokenizer.encode_prompt(chatml, prompt) == theirs(CHATML_TEMPLATE, prompt)
    llama3 = tokenizer.set_chat_format(tokenizer.encoding_from_spec(spec), "llama3")
    assert tokenizer.encode_prompt(llama3, prompt.strip()) == theirs(LLAMA3_TEMPLATE, prompt.strip())
    none = tokenizer.set_chat_format(tokenizer.encoding_from_spec(spec), "none")
    assert tokenizer.encode_prompt(none, prompt) == fast(prompt, add_special_tokens=False)["input_ids"]


# --- conversations: encode_chat, and the default system prompt ---------------------------------

contents = st.one_of(prompts, st.sampled_from(["", "system", "\n\n", "Reply after ####."]))
roles_after_system = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), contents), max_size=4)


def conversation(system, turns) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": role, "content": content} for role, content in turns]


@given(system=st.one_of(st.none(), contents), turns=roles_after_system, default=st.sampled_from(["", "Be brief."]),
       add_generation_prompt=st.booleans())
def test_conversations_are_the_templates_written_out_byte_by_byte(system, turns, default, add_generation_prompt):
    """Byte tokens, every marker's id by name, written out here message by message without any encoder; the
    tokenizer's default system prompt opens a conversation that has no system message, never one that has."""
    messages = conversation(system, turns)
    opening = [] if system is not None or not default else [{"role": "system", "content": default}]
    turns_written = opening + messages
    chatml = tokenizer.set_system_prompt(tokenizer.set_chat_format(plain_encoding(CHATML_IDS), "chatml"), default)
    im_start, im_end = CHATML_IDS["<|im_start|>"], CHATML_IDS["<|im_end|>"]
    want = [i for m in turns_written for i in [im_start, *f"{m['role']}\n{m['content']}".encode(), im_end, *b"\n"]]
    want += [im_start, *b"assistant\n"] if add_generation_prompt else []
    assert tokenizer.encode_chat(chatml, messages, add_generation_prompt) == want
    ids = LLAMA3_IDS
    llama3 = tokenizer.set_system_prompt(tokenizer.set_chat_format(llama3_encoding(), "llama3"), default)
    head, tail, eot_id = ids["<|start_header_id|>"], ids["<|end_header_id|>"], ids["<|eot_id|>"]
    want = [ids["<|begin_of_text|>"]] + [i for m in turns_written for i in [head, *m["role"].encode(), tail,
                                                                            *f"\n\n{m['content']}".encode(), eot_id]]
    want += [head, *b"assistant", tail, *b"\n\n"] if add_generation_prompt else []
    assert tokenizer.encode_chat(llama3, messages, add_generation_prompt) == want
    # none: a system message and a blank line, a user message as it is, an answer and its end of turn (EOT)
    none = tokenizer.set_system_prompt(tokenizer.get_tokenizer("bytes"), default)
    written = {"system": lambda text: [*f"{text}\n\n".encode()], "user": lambda text: [*text.encode()],
               "assistant": lambda text: [*text.encode(), EOT]}
    want = [i for m in turns_written for i in written[m["role"]](m["content"])]
    assert tokenizer.encode_chat(none, messages, add_generation_prompt) == want


@given(prompt=prompts, default=contents)
def test_encode_prompt_is_encode_chat_of_one_user_turn(prompt, default):
    for enc in (tokenizer.set_chat_format(plain_encoding(CHATML_IDS), "chatml"), tokenizer.get_tokenizer("bytes"),
                tokenizer.set_chat_format(llama3_encoding(), "llama3")):
        tokenizer.set_system_prompt(enc, default)
        user = [{"role": "user", "content": prompt}]
        assert tokenizer.encode_prompt(enc, prompt) == tokenizer.encode_chat(enc, user)
        system = [{"role": "system", "content": default}] if default else []
        assert tokenizer.encode_prompt(enc, prompt) == tokenizer.encode_chat(tokenizer.set_system_prompt(enc, ""),
                                                                              system + user)


@given(turns=st.lists(st.tuples(st.sampled_from(["user", "assistant"]),
                                st.text(alphabet=" \n\tuserassint?.x1é", max_size=12)), min_size=1, max_size=4),
       system=st.one_of(st.none(), st.text(alphabet=" \nusert.", max_size=8)))
def test_conversations_with_merges_are_tiktokens_encoding_of_the_rendered_text(turns, system):
    """Where text is cut matters with merges: encode_chat's ids are tiktoken's own encoding of the whole rendered
    text, split at its special tokens only (what transformers does with the rendered template)."""
    messages = conversation(system, turns)
    for enc, eos in ((spec_encoding(CHATML_IDS, eos="<|im_end|>", merges=MERGES), "<|im_end|>"),
                     (spec_encoding(LLAMA3_IDS, eos="<|eot_id|>", merges=MERGES), "<|eot_id|>")):
        for chat_format in ("auto", "none"):
            tokenizer.set_chat_format(enc, chat_format)
            text = "".join(piece if isinstance(piece, str) else enc.decode([piece])
                           for piece in tokenizer.render_chat(enc, messages))
            assert tokenizer.encode_chat(enc, messages) == enc.encode(text, allowed_special="all")


def test_bad_conversations_are_one_line_user_errors():
    enc = tokenizer.get_tokenizer("bytes")
    user = {"role": "user", "content": "hi"}
    cases = [({"role": "user", "content": "hi"}, "a conversation is a list of messages, not dict"),
             ([user, {"role": "tool", "content": "x"}], "message 1: must be {'role': system|user|assistant"),
             ([{"role": "user", "content": 3}], "message 0: must be"), (["hi"], "message 0: must be"),
             ([{"content": "hi"}], "message 0: must be"),
             ([user, {"role": "system", "content": "late"}], "message 1: a system message may only come first")]
    for messages, message in cases:
        with pytest.raises(cli.UserError, match=re.escape(message)):
            tokenizer.encode_chat(enc, messages)
    with pytest.raises(cli.UserError, match="must be a string, not int"):
        tokenizer.set_system_prompt(enc, 3)


def test_the_chat_format_and_system_prompt_travel_with_the_tokenizer(tmp_path):
    """In a checkpoint's spec (a key only where there is a prompt), through torch.save and pickling, and the
    spec's check accepts a string there and nothing else."""
    import pickle
    byte_level = tokenizer.set_system_prompt(tokenizer.set_chat_format(tokenizer.get_tokenizer("bytes")),
                                             "Reply after ####.")
    llama3 = tokenizer.set_system_prompt(tokenizer.set_chat_format(llama3_encoding(), "none"), "Be brief.")
    for enc in (byte_level, llama3):
        spec = tokenizer.tokenizer_spec(enc)
        assert spec["system_prompt"] == enc.system_prompt
        again = tokenizer.tokenizer_from_spec(spec)
        assert (again.chat_format, again.system_prompt) == (enc.chat_format, enc.system_prompt)
        assert tokenizer.encode_prompt(again, "1+1=") == tokenizer.encode_prompt(enc, "1+1=")
        assert "system_prompt" not in tokenizer.tokenizer_spec(tokenizer.set_system_prompt(again, ""))
        assert tokenizer.tokenizer_from_spec(tokenizer.tokenizer_spec(again)).system_prompt == ""
    unpickled = pickle.loads(pickle.dumps(tokenizer.set_system_prompt(llama3, "Be brief.")))
    assert (unpickled.chat_format, unpickled.system_prompt) == ("none", "Be brief.")
    assert tokenizer.set_chat_format(unpickled).chat_format == "none"          # auto: what the spec recorded
    path = str(tmp_path / "model.pt")
    checkpoints.save(path, tiny_model(seed=2), byte_level)
    assert checkpoints.load(path)[1].system_prompt == "Reply after ####."
    full_spec = tokenizer.tokenizer_spec(llama3)
    tokenizer.check_spec(full_spec)
    for bad in ({"system_prompt": 3}, {"chat_format": "jinja"}, {"chat_format": "chatml"}):   # chatml: no markers
        with pytest.raises(ValueError):
            tokenizer.check_spec({**full_spec, **bad})
    for bad_spec in ({**full_spec, "system_prompt": ["x"]},
                     {**tokenizer.tokenizer_spec(byte_level), "system_prompt": 3}):
        with pytest.raises(cli.UserError, match="system_prompt must be a string"):
            tokenizer.tokenizer_from_spec(bad_spec)


def test_chat_format_is_chosen_by_name_or_detected_from_the_markers_present():
    byte_level, chatml, llama3 = tokenizer.get_tokenizer("bytes"), plain_encoding(CHATML_IDS), llama3_encoding()
    both = spec_encoding({**CHATML_IDS, **{t: i + 20 for t, i in LLAMA3_IDS.items()}}, eos="<|im_end|>")
    detected = {"none": byte_level, "chatml": chatml, "llama3": llama3}
    for name, enc in detected.items():
        assert tokenizer.chat_format_of(enc) == tokenizer.chat_format_of(enc, "auto") == name   # auto: the default
    assert tokenizer.chat_format_of(both) == "chatml"                    # <|im_start|> is looked for first
    assert tokenizer.chat_format_of(llama3_encoding(begin_of_text=False)) == "llama3"
    for enc in (byte_level, chatml, llama3):                              # a choice by name is taken as it is
        assert [tokenizer.chat_format_of(enc, c) for c in tokenizer.CHAT_FORMATS] == ["none", "chatml", "llama3"]
    for bad in ("jinja", "AUTO", "ChatML", ""):
        with pytest.raises(cli.UserError, match=re.escape(f"--chat-template {bad}: choose auto, none, chatml, llama3")):
            tokenizer.chat_format_of(chatml, bad)
    # set_chat_format records the choice on the tokenizer it returns ...
    for name, enc in detected.items():
        assert tokenizer.set_chat_format(enc) is enc and enc.chat_format == name
        assert tokenizer.set_chat_format(enc, "none").chat_format == "none"
    # ... and refuses a template whose markers the tokenizer lacks, naming the option and the first missing marker
    no_eot_id = spec_encoding({t: i for t, i in LLAMA3_IDS.items() if t != "<|eot_id|>"}, eos="<|end_of_text|>")
    for enc, choice, missing in [(byte_level, "chatml", "<|im_start|>"), (byte_level, "llama3", "<|start_header_id|>"),
                                 (chatml, "llama3", "<|start_header_id|>"), (llama3, "chatml", "<|im_start|>"),
                                 (plain_encoding({"<|endoftext|>": 300, "<|im_start|>": 301}), "auto", "<|im_end|>"),
                                 (no_eot_id, "auto", "<|eot_id|>")]:
        with pytest.raises(cli.UserError, match=re.escape(f"--chat-template {tokenizer.chat_format_of(enc, choice)}: "
                                                          f"this tokenizer has no {missing} token")):
            tokenizer.set_chat_format(enc, choice)


def test_end_of_turn_stop_ids_and_pad_id_are_the_tokenizers_documented_tokens():
    # the byte tokenizer: <|endoftext|> = 256 ends a turn and a sequence, <|pad|> = 257 pads
    for enc in (tokenizer.get_tokenizer("bytes"), tokenizer.set_chat_format(tokenizer.get_tokenizer("bytes"))):
        assert (tokenizer.end_of_turn(enc), tokenizer.stop_ids(enc), tokenizer.pad_id(enc)) == (EOT, (EOT,), PAD)
    # ChatML in a plain Encoding with no <|pad|> and no pad_token_id: the end of sequence pads
    chatml = tokenizer.set_chat_format(plain_encoding(CHATML_IDS))
    assert (tokenizer.end_of_turn(chatml), tokenizer.stop_ids(chatml), tokenizer.pad_id(chatml)) == (302, (300, 302), 300)
    assert tokenizer.pad_id(plain_encoding({**CHATML_IDS, "<|pad|>": 303})) == 303
    chatml.stop_token_ids = (305, 300)           # the checkpoint's own eos list (convert.py sets it): sorted, once each
    assert tokenizer.stop_ids(chatml) == (300, 302, 305)
    assert (tokenizer.end_of_turn(tokenizer.set_chat_format(chatml, "none")), tokenizer.stop_ids(chatml)) == (300, (300, 305))
    # Llama 3 (a SpecEncoding with no <|endoftext|>): <|eot_id|> ends the turn, the spec's eos the sequence
    llama3 = tokenizer.set_chat_format(llama3_encoding())
    assert (tokenizer.end_of_turn(llama3), tokenizer.stop_ids(llama3), tokenizer.pad_id(llama3)) == (314, (311, 314), 311)
    # the spec's pad token where it names one; <|pad|> where the tokenizer has it, whatever the spec says
    padded = spec_encoding(LLAMA3_IDS, eos="<|eot_id|>", pad="<|finetune_right_pad_id|>")
    assert (tokenizer.pad_id(padded), tokenizer.stop_ids(tokenizer.set_chat_format(padded))) == (315, (314,))
    assert tokenizer.pad_id(spec_encoding({**LLAMA3_IDS, "<|pad|>": 320}, eos="<|eot_id|>", pad="<|end_of_text|>")) == 320
    # a spec without eos or pad: <|endoftext|> ends the sequence and pads
    no_names = tokenizer.set_chat_format(spec_encoding(CHATML_IDS))
    assert (tokenizer.end_of_turn(no_names), tokenizer.stop_ids(no_names), tokenizer.pad_id(no_names)) == (302, (300, 302), 300)


def test_named_tiktoken_encoding_ids_where_it_loads_offline():
    try:
        enc = tokenizer.get_tokenizer("gpt2")
    except cli.UserError:
        pytest.skip("gpt2's ranks file is neither cached nor downloadable (offline)")
    assert tokenizer.chat_format_of(enc) == "none" and enc.n_vocab == 50258      # <|pad|> added at the end
    assert (tokenizer.end_of_turn(enc), tokenizer.stop_ids(enc), tokenizer.pad_id(enc)) == (50256, (50256,), 50257)


def test_decode_drops_the_end_of_sequence_end_of_turn_and_pad_tokens_and_keeps_other_markers():
    chatml = tokenizer.set_chat_format(plain_encoding({**CHATML_IDS, "<|pad|>": 303}))
    completion = [*"#### 4".encode("utf-8"), 302, 300, 303, 303]
    assert tokenizer.decode(chatml, completion) == "#### 4"
    assert tokenizer.decode(chatml, [301, *b"user\n"]) == "<|im_start|>user\n"
    llama3 = tokenizer.set_chat_format(llama3_encoding())
    assert tokenizer.decode(llama3, [312, *"é".encode("utf-8"), 314, 311]) == "<|start_header_id|>é"


def test_decode_text_passes_the_error_handler_and_skips_ids_a_spec_tokenizer_lacks():
    cut = [*b"h", *"é".encode("utf-8")[:1], *b"i"]                      # a UTF-8 sequence cut short
    for enc in (tokenizer.get_tokenizer("bytes"), spec_encoding(CHATML_IDS)):
        assert tokenizer.decode_text(enc, cut) == "h\ufffdi" == bytes(cut).decode("utf-8", "replace")
        assert tokenizer.decode_text(enc, cut, errors="ignore") == "hi"
        with pytest.raises(UnicodeDecodeError):
            tokenizer.decode_text(enc, cut, errors="strict")
    spec = spec_encoding(CHATML_IDS)          # ids past the vocabulary (spare embedding rows) decode to nothing
    assert tokenizer.decode_text(spec, [*b"o", 999, 301, *b"k"]) == "o<|im_start|>k"


def leftmost_longest(text: str, tokens) -> list[str]:
    """Brute force: at each position the longest token that starts there, else the next position."""
    found, i = [], 0
    while i < len(text):
        token = max((t for t in tokens if text.startswith(t, i)), key=len, default="")
        found += [token] if token else []
        i += max(len(token), 1)
    return found


@given(tokens=st.lists(st.text(alphabet="<a|>.*", min_size=1, max_size=4), min_size=1, max_size=5, unique=True),
       data=st.data())
def test_added_tokens_pattern_matches_leftmost_longest(tokens, data):
    """Tokens that are prefixes of others, and regex characters in tokens, against brute force."""
    pieces = st.one_of(st.sampled_from(tokens), st.text(alphabet="<a|>.*x", max_size=3))
    text = data.draw(st.lists(pieces, max_size=8).map("".join))
    pattern = tokenizer.added_tokens_pattern(tokens)
    assert [m.group() for m in pattern.finditer(text)] == leftmost_longest(text, tokens)
    assert tokenizer.added_tokens_pattern([]) is None


def test_added_tokens_split_out_of_text_leftmost_longest():
    tokens = ["<think", "<think>", "think>"]                 # in any order, the longest match at a position wins
    for order in (tokens, tokens[::-1]):
        assert tokenizer.added_tokens_pattern(order).findall("x<think><think think>") == ["<think>", "<think", "think>"]
    enc = spec_encoding(CHATML_IDS, added={"<think": 320, "<think>": 321, "think>": 322})
    assert tokenizer.encode_text(enc, "a<think><think think>") == [*b"a", 321, 320, *b" ", 322]


# ----------------------------------------------------------------------------------------------
# Split regexes read from files: probed when the spec is loaded; a panic in encode is one line
# ----------------------------------------------------------------------------------------------

PANICKING_SPLITS = {   # split regex -> an ordinary text on which tiktoken itself panics (pyo3's PanicException)
    "(.|.|.|.)+(?=\x00)|\\s+|.": "hello world " * 3,      # issue 36: 4**n ways to match n characters
    r"\s*\s*\s*(?=z)|\s+|.": " " * 300,                  # ~n**3 / 6 ways to share a run of spaces out
    "a*": "b",                                          # an empty match
}


def raw_encoding(pattern: str) -> tiktoken.Encoding:
    return tiktoken.Encoding(name="raw", pat_str=pattern, mergeable_ranks=BYTE_RANKS, special_tokens={})


@pytest.mark.parametrize("pattern", list(PANICKING_SPLITS))
def test_a_split_regex_that_makes_tiktoken_panic_is_refused_when_the_spec_is_loaded(pattern):
    with pytest.raises(BaseException) as panic:           # the oracle: tiktoken itself, on ordinary text
        raw_encoding(pattern).encode_ordinary(PANICKING_SPLITS[pattern])
    assert tokenizer.is_panic(panic.value) and not isinstance(panic.value, Exception)
    spec = {**spec_encoding(CHATML_IDS).spec, "pat_str": pattern}
    with pytest.raises(ValueError, match=r"^run/model.pt: split regex .* makes tiktoken panic"):
        tokenizer.check_spec(spec, "run/model.pt")
    with pytest.raises(cli.UserError, match="^tokenizer spec: split regex"):
        tokenizer.tokenizer_from_spec(spec)


def test_a_split_regex_that_backtracks_for_seconds_is_refused():
    """A backreference under a repeat: no panic, but tiktoken takes over 100x the CPU time of GPT-2's split on the
    same run of 1,025 characters (the oracle, timed here); the probe gives up after PROBE_SECONDS."""
    pattern, text = r"(\w+)\1+(?=x)|.", "a" * 1024 + "!"
    seconds = []
    for enc in (raw_encoding(pattern), raw_encoding(tokenizer.SPLIT_PATTERN)):
        start = time.thread_time()             # CPU time: a loaded machine does not change the ratio
        enc.encode_ordinary(text)
        seconds.append(time.thread_time() - start)
    assert seconds[0] > 100 * seconds[1], seconds
    assert "takes over" in tokenizer.split_pattern_problem(pattern)


def test_a_checkpoint_with_a_hostile_split_regex_is_one_line_exit_2_at_load(tmp_path, capfd):
    """The issue's file: a .pt whose tokenizer spec carries the panicking regex. checkpoints.load refuses it,
    naming the path; through cli.run that is one line on the stderr file descriptor (Rust's own panic message,
    written past sys.stderr while the probe runs, is kept out of it) and exit status 2."""
    path = str(tmp_path / "model.pt")
    checkpoints.save(path, tiny_model(vocab_size=303), spec_encoding(CHATML_IDS))
    checkpoints.load(path)                                  # the control: the same file with its own regex loads
    ckpt = torch.load(path, weights_only=True)
    ckpt["tokenizer"]["pat_str"] = "(.|.|.|.)+(?=\x00)|\\s+|."
    torch.save(ckpt, path)
    tokenizer.split_pattern_problem.cache_clear()           # the probe runs here, not in an earlier test
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: checkpoints.load(path))
    err = capfd.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {path}: ") and err.count("\n") == 1, err


def test_a_panic_inside_encode_is_a_one_line_user_error():
    """Past the probe (a SpecEncoding built here without it), a panic in tiktoken's encode is a UserError, not an
    escaping BaseException; a text short enough for the regex still encodes."""
    pattern = "(.|.|.|.)+(?=\x00)|\\s+|." + "|x" * 40     # the alternatives after "." never match: > 60 characters
    spec = {**spec_encoding(CHATML_IDS).spec, "pat_str": pattern}
    enc = tokenizer.SpecEncoding(spec, dict(spec["ranks"]), frozenset())
    assert tokenizer.encode(enc, "hi") == list(b"hi")
    text = "hello world " * 3
    try:                                           # tiktoken's own panic on the same text and regex: the oracle
        tiktoken.Encoding(name="bare", pat_str=pattern, mergeable_ranks=spec["ranks"], special_tokens={}).encode_ordinary(text)
    except BaseException as panic:
        reason = str(panic).splitlines()[0]
    with pytest.raises(cli.UserError) as error:
        tokenizer.encode(enc, text)
    assert str(error.value) == (f"tokenizer {enc.name}: its split regex {pattern[:60]!r} failed on a text of "
                                f"{len(text)} characters ({reason[:120]})")
