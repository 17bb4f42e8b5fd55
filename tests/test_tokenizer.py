"""Tests of lib/tokenizer.py: the byte-level tokenizer and named tiktoken encodings.

Oracles: Python's own UTF-8 encoding (one id per byte, and decode gives the text back), the special tokens'
fixed ids (never produced from plain text), the tokenizer rebuilt from its own saved spec, and tiktoken made
to fail as it does offline. Tokenizers built from tokenizer.json, GGUF metadata and tiktoken files are tested
in test_tokenizer_files.py.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_tokenizer.py
"""
from __future__ import annotations

import pytest
import tiktoken
import torch
from hypothesis import given, strategies as st

from lib import cli, tokenizer
from helpers import ENC, EOT, PAD

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
