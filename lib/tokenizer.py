"""Tokenizers and chat formats: text <-> token ids for every stage.

A tokenizer is a tiktoken.Encoding: the byte-level default built in code (256 byte tokens, <|endoftext|> and
<|pad|>; no download), a named tiktoken encoding, or a real model's own, a SpecEncoding built from the spec
that lib/tokenizer_files.py reads out of tokenizer.json, GGUF metadata or a tiktoken ranks file. Every
checkpoint stores its tokenizer's spec (tokenizer_spec), so it reloads offline and never fetches a file. A
spec's split regex is probed when it is loaded (check_spec): one that makes tiktoken panic or crawl is refused.

Chat formats wrap a prompt in the turns an instruct model was tuned on (ChatML, Llama 3). The user's text is
always encoded as ordinary text; only the template's own markers are special tokens.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import time
import unicodedata

import tiktoken

import model as M
from lib import cli


EOT, PAD = "<|endoftext|>", "<|pad|>"


# GPT-2's pre-tokenisation split; with no merges it does not change the byte-level result.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_tokenizer(name: str = "bytes") -> tiktoken.Encoding:
    """"bytes": 256 byte tokens, <|endoftext|> = 256, <|pad|> = 257; built in code, no download.
    Any named tiktoken encoding ("gpt2", "cl100k_base", "o200k_base") gains a <|pad|> token at the end."""
    if name == "bytes":
        return tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOT: M.BYTE_EOT_ID, PAD: M.BYTE_PAD_ID})
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:   # unknown name, or the ranks file cannot be downloaded offline
        raise cli.UserError(f"tokenizer {name!r} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            "offline, use the built-in 'bytes' tokenizer") from None
    specials = dict(base._special_tokens)
    specials.setdefault(PAD, base.n_vocab)
    return tiktoken.Encoding(name=name, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=specials)


def pad_id(enc: tiktoken.Encoding) -> int:
    """The id that fills padded positions: <|pad|> where the tokenizer has one (ours), else the checkpoint's
    pad or end-of-sequence token (a real vocabulary has no spare row). Padded positions never carry loss."""
    specials = enc._special_tokens
    if PAD in specials:
        return specials[PAD]
    return getattr(enc, "pad_token_id", None) if getattr(enc, "pad_token_id", None) is not None else enc.eot_token


# Chat templates: an instruct model expects its prompts wrapped in the turns it was tuned on. The user's
# text is always encoded as ordinary text; only the template's own markers are special tokens.
CHAT_FORMATS = ("none", "chatml", "llama3")


def chat_format_of(enc: tiktoken.Encoding, choice: str = "auto") -> str:
    """auto: ChatML if the tokenizer has <|im_start|> (Qwen, SmolLM2), Llama 3's headers if it has
    <|start_header_id|>, else none (the byte-level models of this project: plain prompts)."""
    if choice != "auto":
        if choice not in CHAT_FORMATS:
            raise cli.UserError(f"--chat-template {choice}: choose auto, {', '.join(CHAT_FORMATS)}")
        return choice
    specials = enc._special_tokens
    return "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else "none"


def set_chat_format(enc: tiktoken.Encoding, choice: str = "auto") -> tiktoken.Encoding:
    """Record on the tokenizer which template its prompts get (encode_prompt, end_of_turn and stop_ids
    read it); a template whose markers the tokenizer lacks is a UserError."""
    template = chat_format_of(enc, choice)
    needed = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    missing = [t for t in needed.get(template, ()) if t not in enc._special_tokens]
    if missing:
        raise cli.UserError(f"--chat-template {template}: this tokenizer has no {missing[0]} token")
    enc.chat_format = template
    return enc


def encode_prompt(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    """A prompt as the model expects it before its answer:
    none:   the text itself
    chatml: <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
    llama3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>
            <|start_header_id|>assistant<|end_header_id|>\n\n"""
    template = getattr(enc, "chat_format", "none")
    special = enc._special_tokens
    if template == "chatml":
        start, end = special["<|im_start|>"], special["<|im_end|>"]
        return ([start] + encode(enc, "user\n" + prompt) + [end] + encode(enc, "\n") + [start]
                + encode(enc, "assistant\n"))
    if template == "llama3":
        begin = [special["<|begin_of_text|>"]] if "<|begin_of_text|>" in special else []
        head, tail = special["<|start_header_id|>"], special["<|end_header_id|>"]
        return (begin + [head] + encode(enc, "user") + [tail] + encode(enc, "\n\n" + prompt) + [special["<|eot_id|>"]]
                + [head] + encode(enc, "assistant") + [tail] + encode(enc, "\n\n"))
    return encode(enc, prompt)


def end_of_turn(enc: tiktoken.Encoding) -> int:
    """The token that ends an answer: <|im_end|> (ChatML), <|eot_id|> (Llama 3), else <|endoftext|>."""
    template = getattr(enc, "chat_format", "none")
    if template == "chatml":
        return enc._special_tokens["<|im_end|>"]
    if template == "llama3":
        return enc._special_tokens["<|eot_id|>"]
    return enc.eot_token


def stop_ids(enc: tiktoken.Encoding) -> tuple:
    """Where sampling stops: the end of the turn, and the end-of-sequence token(s) of the checkpoint."""
    return tuple(sorted({end_of_turn(enc), enc.eot_token, *getattr(enc, "stop_token_ids", ())}))


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Ordinary text to ids; special-token strings in the text are encoded as plain text, never as specials."""
    return enc.encode_ordinary(text)


def decode(enc: tiktoken.Encoding, ids) -> str:
    """Ids to text, dropping the end-of-sequence, end-of-turn and pad tokens (what generate leaves after a stop)."""
    skip = {enc.eot_token, pad_id(enc), end_of_turn(enc)}
    return enc.decode([int(i) for i in ids if int(i) not in skip])


def tokenizer_spec(enc: tiktoken.Encoding) -> dict:
    """What a checkpoint stores of its tokenizer: the name of a built-in or tiktoken encoding, or the whole
    spec of a real model's tokenizer (tokens as bytes, so it reloads offline); and its chat format."""
    spec = dict(enc.spec) if isinstance(enc, SpecEncoding) else {"name": enc.name, "n_vocab": enc.n_vocab}
    spec["chat_format"] = getattr(enc, "chat_format", "none")
    return spec


def tokenizer_from_spec(spec: dict) -> tiktoken.Encoding:
    """The tokenizer a checkpoint stores. A full spec (with "ranks") is checked field by field; a name must
    be the built-in byte encoding or one of tiktoken's, so a checkpoint can never make us fetch a file."""
    if isinstance(spec, dict) and "ranks" in spec:
        try:
            enc = encoding_from_spec({k: v for k, v in spec.items() if k != "chat_format"})
        except ValueError as e:
            raise cli.UserError(str(e)) from None
    else:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or type(spec.get("n_vocab")) is not int:
            raise cli.UserError("tokenizer spec must be {'name': str, 'n_vocab': int} or a full spec")
        if spec["name"] != "bytes" and spec["name"] not in tiktoken.list_encoding_names():
            raise cli.UserError(f"unknown tokenizer {spec['name'][:40]!r}")
        enc = get_tokenizer(spec["name"])
        if enc.n_vocab != spec["n_vocab"]:
            raise cli.UserError(f"tokenizer {spec['name']!r} has {enc.n_vocab} tokens, the checkpoint expects {spec['n_vocab']}")
    format_ = spec.get("chat_format", "auto")
    return set_chat_format(enc, format_ if format_ in CHAT_FORMATS else "auto")


def is_panic(error: BaseException) -> bool:
    """A Rust panic inside tiktoken reaches Python as pyo3's PanicException: a BaseException, which
    `except Exception` does not catch."""
    return type(error).__name__ == "PanicException"


@contextlib.contextmanager
def stderr_fd_silenced():
    """File descriptor 2 to /dev/null for the block: a Rust panic prints its message there, past sys.stderr."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# A split regex read from a file is probed before use. tiktoken matches it with fancy-regex, which stops a
# match after 1,000,000 backtracking steps and then panics (is_panic) in the middle of an encode; a pattern
# under that cap can still take seconds per text. The probes are runs of one kind of character, then one
# more: where overlapping repeats blow up ((.|.)+ or \s*\s*\s* before a lookahead, a backreference repeated).
PROBE_TEXTS = tuple(char * 1024 + end for char in ("a", "A", "é", "中", "1", "٣", " ", "\t", "\n", "\r\n", "'", "!",
                                                   "\x00", "😀") for end in ("", "a", "1", " ", "!", "\n", "\x00"))
PROBE_SECONDS = 1.0     # of this thread's CPU time (a loaded machine does not count); GPT-2's, Llama 3's and
                        # Qwen's splits take ~0.02 s on all of them


@functools.lru_cache(maxsize=64)
def split_pattern_problem(pat_str: str) -> str | None:
    """Why tiktoken cannot use `pat_str` as its split regex, or None: it does not compile, or on
    PROBE_TEXTS it panics (past fancy-regex's backtracking cap, or on an empty match) or takes over
    PROBE_SECONDS. A probe, not a proof: encode_text also turns a later panic into a UserError."""
    try:
        probe = tiktoken.Encoding(name="probe", pat_str=pat_str, mergeable_ranks={bytes([b]): b for b in range(256)},
                                  special_tokens={})
    except ValueError as error:
        return f"does not compile ({(str(error).splitlines() or [''])[0][:120]})"
    start = time.thread_time()
    with stderr_fd_silenced():
        for text in PROBE_TEXTS:
            try:
                probe.encode_ordinary(text)
            except BaseException as error:
                if not is_panic(error):
                    raise
                return (f"makes tiktoken panic on {text[:3]!r}... ({len(text)} characters: "
                        f"{(str(error).splitlines() or [''])[0][:120]})")
            if time.thread_time() - start > PROBE_SECONDS:
                return (f"takes over {PROBE_SECONDS:g} s of CPU to split {len(PROBE_TEXTS)} texts of ~1,000 characters "
                        "(catastrophic backtracking)")
    return None


def check_spec(spec, where: str = "tokenizer spec") -> None:
    """A spec read from a checkpoint is checked before use: every field's type, ids that do not collide,
    a vocab_size above every id, and a split regex that tiktoken compiles and runs in bounded time
    (split_pattern_problem)."""
    fields = {"name": str, "pat_str": str, "ranks": dict, "special_tokens": dict, "added_tokens": dict,
              "normalized_added_tokens": list, "vocab_size": int}
    if not isinstance(spec, dict) or any(type(spec.get(k)) is not t for k, t in fields.items()) or \
            spec.get("normalizer") not in (None, "NFC") or \
            not all(spec.get(k) is None or type(spec[k]) is str for k in ("bos", "eos", "pad", "chat_template")):
        raise ValueError(f"{where}: needs {', '.join(f'{k} ({t.__name__})' for k, t in fields.items())}, "
                         "normalizer (None or 'NFC'), bos/eos/pad (str or None)")
    groups = [spec["ranks"], spec["special_tokens"], spec["added_tokens"]]
    for group, key_type in zip(groups, (bytes, str, str)):
        if not all(type(k) is key_type and type(v) is int and v >= 0 for k, v in group.items()):
            raise ValueError(f"{where}: token tables must map {key_type.__name__} to ids >= 0")
    ids = [token_id for group in groups for token_id in group.values()]
    if len(set(ids)) != len(ids) or max(ids, default=-1) >= spec["vocab_size"]:
        raise ValueError(f"{where}: two tokens share an id, or an id is not below vocab_size")
    problem = split_pattern_problem(spec["pat_str"])
    if problem:
        raise ValueError(f"{where}: split regex {spec['pat_str'][:60]!r} {problem}")


class SpecEncoding(tiktoken.Encoding):
    """A tiktoken.Encoding that encodes and decodes like Hugging Face's tokenizer it came from.

    encode_ordinary(text) = encode_text(self, text); decode(ids) = decode_text(self, ids). Attributes:
    spec; normalizer ("NFC" or None); added_tokens {str: id} (non-special, split out of text);
    unknown_bytes (byte values the vocabulary lacks) and unknown_byte_ids (the ids tiktoken gives
    them here, see encoding_from_spec; encode_text never returns them).
    Special and added tokens are also tiktoken special tokens, so encode_single_token and
    encode(..., allowed_special=...) know them. Pickles as its spec."""

    def __init__(self, spec: dict, mergeable_ranks: dict, unknown_byte_ids: frozenset):
        super().__init__(name=spec["name"], pat_str=spec["pat_str"], mergeable_ranks=mergeable_ranks,
                         special_tokens={**spec["special_tokens"], **spec["added_tokens"]})
        self.spec, self.normalizer, self.unknown_byte_ids = spec, spec.get("normalizer"), unknown_byte_ids
        self.added_tokens = dict(spec["added_tokens"])
        normalized = set(spec["normalized_added_tokens"])
        self.raw_added_pattern = added_tokens_pattern([t for t in self.added_tokens if t not in normalized])
        self.normalized_added_pattern = added_tokens_pattern([t for t in self.added_tokens if t in normalized])
        self.known_ids = frozenset((*spec["ranks"].values(), *self._special_tokens.values()))
        self.unknown_bytes = frozenset(b for b in range(256) if bytes([b]) not in spec["ranks"])

    def token_id(self, token: str | None) -> int | None:
        """The id of a special/added token or a vocabulary token named by its text, else None."""
        if token is None:
            return None
        return self._special_tokens.get(token, self.spec["ranks"].get(token.encode("utf-8")))

    @property
    def eot_token(self) -> int:
        """End of sequence: the spec's eos token (Llama 3 has no <|endoftext|>), else <|endoftext|>."""
        found = self.token_id(self.spec.get("eos")) if self.spec.get("eos") else None
        return found if found is not None else self._special_tokens["<|endoftext|>"]

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.spec.get("pad"))

    def encode_ordinary(self, text: str) -> list[int]:
        return encode_text(self, text)

    def decode(self, tokens, errors: str = "replace") -> str:
        return decode_text(self, tokens, errors)

    def __reduce__(self):
        return encoding_from_spec, (self.spec,)


def added_tokens_pattern(tokens) -> re.Pattern | None:
    """Leftmost-longest match of literal tokens (Hugging Face's added-token matcher): longest first."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def split_on_added(text: str, pattern: re.Pattern | None, added_tokens: dict) -> list:
    """text -> [str | int]: pieces of text between added tokens, and the added tokens' ids."""
    if pattern is None:
        return [text]
    pieces, start = [], 0
    for match in pattern.finditer(text):
        pieces += [text[start:match.start()], added_tokens[match.group()]]
        start = match.end()
    return pieces + [text[start:]]


def encoding_from_spec(spec: dict) -> SpecEncoding:
    """The tiktoken Encoding of a spec.

    Missing single bytes: tiktoken's BPE starts from single bytes and panics (a pyo3 PanicException,
    which `except Exception` does not catch) on a byte with no rank. SmolLM2 lacks 21 of the 256
    (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5-0xff). Each missing byte gets an
    id above every token id and above vocab_size - 1 (no embedding row exists for it), so tiktoken
    never panics. Such an id in tiktoken's output only says "this byte has no token": Hugging Face
    (no unk token) drops the byte, and encode_text does the same."""
    check_spec(spec)
    ranks = dict(spec["ranks"])
    next_free = spec["vocab_size"]          # check_spec: above every token id
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    unknown_byte_ids = frozenset(range(next_free, next_free + len(missing)))
    ranks.update(zip(missing, sorted(unknown_byte_ids)))
    return SpecEncoding(spec, ranks, unknown_byte_ids)


def encode_text(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Text -> ids as Hugging Face's tokenizer encodes it with add_special_tokens=False and special
    tokens treated as text (tokenizers' encode_special_tokens=True): the steps of its
    AddedVocabulary.extract_and_normalize, then BPE:
      1. split out added tokens matched on the raw text (HF's "normalized": false);
      2. normalise (NFC) each remaining piece and split out "normalized": true added tokens;
      3. tiktoken's encode_ordinary on each piece (the pat_str split, then BPE), dropping the ids of
         bytes the vocabulary lacks. (Hugging Face drops such a byte BEFORE its BPE merges, so in the
         rare text holding one, e.g. SmolLM2's six missing ASCII control characters, the tokens on
         either side of it can differ from Hugging Face's; all other text encodes identically.)
    Special-token strings in the text stay plain text. Works on plain tiktoken Encodings too. A panic in
    tiktoken (a split regex that check_spec's probe let through, past fancy-regex's backtracking cap on a
    longer text) is a one-line UserError."""
    if not isinstance(enc, SpecEncoding):
        return enc.encode_ordinary(text)
    ids = []
    for piece in split_on_added(text, enc.raw_added_pattern, enc.added_tokens):
        if isinstance(piece, int):
            ids.append(piece)
            continue
        if enc.normalizer:
            piece = unicodedata.normalize(enc.normalizer, piece)
        for part in split_on_added(piece, enc.normalized_added_pattern, enc.added_tokens):
            if isinstance(part, int):
                ids.append(part)
                continue
            try:
                part_ids = tiktoken.Encoding.encode_ordinary(enc, part)
            except BaseException as error:   # a panic past check_spec's probe: one line, not an escaping BaseException
                if not is_panic(error):
                    raise
                raise cli.UserError(f"tokenizer {enc.name}: its split regex {enc._pat_str[:60]!r} failed on a text of "
                                    f"{len(part)} characters ({(str(error).splitlines() or [''])[0][:120]})") from None
            ids += [i for i in part_ids if i not in enc.unknown_byte_ids]
    return ids


def decode_text(enc: tiktoken.Encoding, ids, errors: str = "replace") -> str:
    """Ids -> text; like Hugging Face's decode(skip_special_tokens=False), ids the tokenizer does not
    have (embedding rows past the vocabulary, the missing-byte ids) are skipped, and invalid UTF-8
    becomes U+FFFD."""
    if not isinstance(enc, SpecEncoding):
        return enc.decode(ids, errors=errors)
    known = [int(i) for i in ids if int(i) in enc.known_ids]
    return tiktoken.Encoding.decode(enc, known, errors=errors)

