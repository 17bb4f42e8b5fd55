"""Tokenizers and chat formats: text <-> token ids for every stage.

A tokenizer is a tiktoken.Encoding: the byte-level default built in code (256 byte tokens, <|endoftext|> and
<|pad|>; no download), a named tiktoken encoding, or a real model's own, a SpecEncoding built from the spec
that lib/tokenizer_files.py reads out of tokenizer.json, GGUF metadata or a tiktoken ranks file. Every
checkpoint stores its tokenizer's spec (tokenizer_spec), so it reloads offline and never fetches a file. A
spec's split regex is probed when it is loaded (check_spec): one that makes tiktoken panic or crawl is refused.

Chat formats render a conversation in the turns an instruct model was tuned on (ChatML, Llama 3, or plain text
for this project's byte-level models), opened by the tokenizer's default system prompt if it has one
(encode_chat; encode_prompt is its one-user-turn case). Every message is encoded as ordinary text; only the
template's own markers are special tokens. The format and the default system prompt travel with the tokenizer:
in a checkpoint's spec, and in an export's chat template (tokenizer_files.chat_template_from_spec).
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


# Chat templates: an instruct model expects its conversation in the turns it was tuned on. Every message is
# encoded as ordinary text; only the template's own markers are special tokens.
CHAT_FORMATS = ("none", "chatml", "llama3")
CHAT_MARKERS = {"none": (), "chatml": ("<|im_start|>", "<|im_end|>"),
                "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
ROLES = ("system", "user", "assistant")


def chat_format_of(enc: tiktoken.Encoding, choice: str = "auto") -> str:
    """auto: the format a real model's tokenizer spec recorded (a checkpoint's, or read back from this project's
    export), else ChatML if the tokenizer has <|im_start|> (Qwen, SmolLM2), Llama 3's headers if it has
    <|start_header_id|>, else none (the byte-level models of this project: plain prompts)."""
    if choice != "auto":
        if choice not in CHAT_FORMATS:
            raise cli.UserError(f"--chat-template {choice}: choose auto, {', '.join(CHAT_FORMATS)}")
        return choice
    recorded = enc.spec.get("chat_format") if isinstance(enc, SpecEncoding) else None
    if recorded in CHAT_FORMATS:
        return recorded
    specials = enc._special_tokens
    return "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else "none"


def set_chat_format(enc: tiktoken.Encoding, choice: str = "auto") -> tiktoken.Encoding:
    """Record on the tokenizer which template its conversations get (encode_chat, end_of_turn and stop_ids
    read it); a template whose markers the tokenizer lacks is a UserError. A SpecEncoding also records it in
    its spec, which export (convert.save_hf) writes and pickling keeps."""
    template = chat_format_of(enc, choice)
    missing = [t for t in CHAT_MARKERS[template] if t not in enc._special_tokens]
    if missing:
        raise cli.UserError(f"--chat-template {template}: this tokenizer has no {missing[0]} token")
    enc.chat_format = template
    if isinstance(enc, SpecEncoding):
        enc.spec = {**enc.spec, "chat_format": template}
    return enc


def set_system_prompt(enc: tiktoken.Encoding, text: str) -> tiktoken.Encoding:
    """Record the default system prompt: encode_chat (so encode_prompt, so every stage's prompts) opens a
    conversation that has no system message with it; "" for none. Saved in a checkpoint's tokenizer spec, and
    in an export's chat template, so a model is served with the prompt it was trained with."""
    if not isinstance(text, str):
        raise cli.UserError(f"the system prompt must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")                    # a lone surrogate (from undecodable bytes) cannot be saved
    except UnicodeEncodeError:
        raise cli.UserError(f"the system prompt {text[:40]!r}... is not valid Unicode text") from None
    enc.system_prompt = text
    if isinstance(enc, SpecEncoding):
        enc.spec = {**{k: v for k, v in enc.spec.items() if k != "system_prompt"},
                    **({"system_prompt": text} if text else {})}
    return enc


def check_messages(messages) -> None:
    """A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}, a system message
    only first; anything else is a UserError naming the message."""
    if not isinstance(messages, list):
        raise cli.UserError(f"a conversation is a list of messages, not {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or \
                not isinstance(message.get("content"), str):
            raise cli.UserError(f"message {index}: must be {{'role': system|user|assistant, 'content': str}}, "
                                f"not {repr(message)[:80]}")
        if message["role"] == "system" and index > 0:
            raise cli.UserError(f"message {index}: a system message may only come first")


def render_chat(enc: tiktoken.Encoding, messages: list[dict], add_generation_prompt: bool = True) -> list:
    r"""The conversation in the tokenizer's chat format: [str | int], ordinary text and the markers' ids.
    The tokenizer's default system prompt (set_system_prompt) opens it when no message is a system message.
    chatml: <|im_start|>{role}\n{content}<|im_end|>\n per message; then <|im_start|>assistant\n
    llama3: <|begin_of_text|> (where the tokenizer has it), then
            <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|> per message;
            then <|start_header_id|>assistant<|end_header_id|>\n\n
    none:   plain text, for the byte-level models of this project: a user message is its text, so one user turn
            is the prompt itself and the answer follows it directly, as in training; a system message is its
            text and a blank line ("\n\n"); an assistant message is its text and the end-of-turn token
            (<|endoftext|>), the token the model itself ended that answer with. Nothing marks the place of
            the answer: add_generation_prompt adds nothing.
    add_generation_prompt: end with the opening of the assistant's turn (the prompt the model answers)."""
    check_messages(messages)
    system_prompt = getattr(enc, "system_prompt", "")
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    template = getattr(enc, "chat_format", "none")
    special = enc._special_tokens
    pieces = []
    if template == "chatml":
        start, end = special["<|im_start|>"], special["<|im_end|>"]
        for message in messages:
            pieces += [start, message["role"] + "\n" + message["content"], end, "\n"]
        return pieces + ([start, "assistant\n"] if add_generation_prompt else [])
    if template == "llama3":
        head, tail, eot_id = special["<|start_header_id|>"], special["<|end_header_id|>"], special["<|eot_id|>"]
        pieces = [special["<|begin_of_text|>"]] if "<|begin_of_text|>" in special else []
        for message in messages:
            pieces += [head, message["role"], tail, "\n\n" + message["content"], eot_id]
        return pieces + ([head, "assistant", tail, "\n\n"] if add_generation_prompt else [])
    for message in messages:
        pieces += {"system": [message["content"] + "\n\n"], "user": [message["content"]],
                   "assistant": [message["content"], end_of_turn(enc)]}[message["role"]]
    return pieces


def encode_chat(enc: tiktoken.Encoding, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """A conversation as the model reads it (render_chat), to ids: each run of text between two markers is
    encoded as one ordinary text (special-token strings in it stay text), each marker is its id. Hugging
    Face's apply_chat_template tokenizes its rendered string the same way (text between special tokens as one
    piece), so the chat template of an export gives these ids (test_tokenizer_files.py)."""
    ids, text = [], ""
    for piece in render_chat(enc, messages, add_generation_prompt) + [None]:
        if isinstance(piece, str):
            text += piece
            continue
        ids += encode(enc, text) if text else []
        text = ""
        if piece is not None:
            ids.append(piece)
    return ids


def encode_prompt(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    r"""One user prompt as the model expects it before its answer: encode_chat of the user turn, opened by the
    default system prompt if the tokenizer has one. With none:
    none:   the text itself
    chatml: <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
    llama3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>
            <|start_header_id|>assistant<|end_header_id|>\n\n"""
    return encode_chat(enc, [{"role": "user", "content": prompt}])


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
    spec of a real model's tokenizer (tokens as bytes, so it reloads offline); its chat format; and its default
    system prompt, under "system_prompt", where it has one."""
    spec = dict(enc.spec) if isinstance(enc, SpecEncoding) else {"name": enc.name, "n_vocab": enc.n_vocab}
    spec["chat_format"] = getattr(enc, "chat_format", "none")
    spec.pop("system_prompt", None)
    if getattr(enc, "system_prompt", ""):
        spec["system_prompt"] = enc.system_prompt
    return spec


def tokenizer_from_spec(spec: dict) -> tiktoken.Encoding:
    """The tokenizer a checkpoint stores. A full spec (with "ranks") is checked field by field; a name must
    be the built-in byte encoding or one of tiktoken's, so a checkpoint can never make us fetch a file. The chat
    format and the default system prompt are recorded on the tokenizer (set_chat_format, set_system_prompt)."""
    if isinstance(spec, dict) and not isinstance(spec.get("system_prompt", ""), str):
        raise cli.UserError("tokenizer spec: system_prompt must be a string")
    if isinstance(spec, dict) and "ranks" in spec:
        try:
            enc = encoding_from_spec({k: v for k, v in spec.items() if k not in ("chat_format", "system_prompt")})
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
    return set_system_prompt(set_chat_format(enc, format_ if format_ in CHAT_FORMATS else "auto"),
                             spec.get("system_prompt", ""))


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
    a vocab_size above every id, a split regex that tiktoken compiles and runs in bounded time
    (split_pattern_problem), and a recorded chat format whose markers the tokenizer has."""
    fields = {"name": str, "pat_str": str, "ranks": dict, "special_tokens": dict, "added_tokens": dict,
              "normalized_added_tokens": list, "vocab_size": int}
    if not isinstance(spec, dict) or any(type(spec.get(k)) is not t for k, t in fields.items()) or \
            spec.get("normalizer") not in (None, "NFC") or spec.get("chat_format") not in (None, *CHAT_FORMATS) or \
            not all(spec.get(k) is None or type(spec[k]) is str
                    for k in ("bos", "eos", "pad", "chat_template", "system_prompt")):
        raise ValueError(f"{where}: needs {', '.join(f'{k} ({t.__name__})' for k, t in fields.items())}, "
                         "normalizer (None or 'NFC'), bos/eos/pad/chat_template/system_prompt (str or None), "
                         f"chat_format (None or one of {', '.join(CHAT_FORMATS)})")
    groups = [spec["ranks"], spec["special_tokens"], spec["added_tokens"]]
    for group, key_type in zip(groups, (bytes, str, str)):
        if not all(type(k) is key_type and type(v) is int and v >= 0 for k, v in group.items()):
            raise ValueError(f"{where}: token tables must map {key_type.__name__} to ids >= 0")
    ids = [token_id for group in groups for token_id in group.values()]
    if len(set(ids)) != len(ids) or max(ids, default=-1) >= spec["vocab_size"]:
        raise ValueError(f"{where}: two tokens share an id, or an id is not below vocab_size")
    missing = [t for t in CHAT_MARKERS[spec.get("chat_format") or "none"]
               if t not in spec["special_tokens"] and t not in spec["added_tokens"]]
    if missing:
        raise ValueError(f"{where}: chat_format {spec['chat_format']} needs the special token {missing[0]}")
    problem = split_pattern_problem(spec["pat_str"])
    if problem:
        raise ValueError(f"{where}: split regex {spec['pat_str'][:60]!r} {problem}")


class SpecEncoding(tiktoken.Encoding):
    """A tiktoken.Encoding that encodes and decodes like Hugging Face's tokenizer it came from.

    encode_ordinary(text) = encode_text(self, text); decode(ids) = decode_text(self, ids). Attributes:
    spec; normalizer ("NFC" or None); added_tokens {str: id} (non-special, split out of text);
    unknown_bytes (byte values the vocabulary lacks) and unknown_byte_ids (the ids tiktoken gives
    them here, see encoding_from_spec; encode_text never returns them); chat_format and system_prompt, from
    the spec's keys of those names where it has them (set_chat_format and set_system_prompt write both).
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
        self.chat_format, self.system_prompt = spec.get("chat_format") or "none", spec.get("system_prompt") or ""

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

