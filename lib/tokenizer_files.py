"""Real models' tokenizer files <-> the spec lib/tokenizer.py builds an Encoding from.

Read: a Hugging Face tokenizer.json (+ tokenizer_config.json), a GGUF file's tokenizer metadata, or a
tiktoken ranks file (Llama 3's tokenizer.model). Written: a tokenizer.json and tokenizer_config.json that
Hugging Face's tokenizers and transformers load and that encode like the spec (export), with a chat template
that renders conversations exactly as tokenizer.encode_chat does for the spec's chat format and default system
prompt: a model is served (transformers, vLLM) with the prompts it was trained on, not its original template.

Only byte-level BPE is accepted (GPT-2, Llama 3, Qwen2/2.5/3, SmolLM2), and only where tiktoken's merge
rule (lowest rank first) gives the same tokens as Hugging Face's merge list (check_merges); anything else is
refused with a ValueError naming the file, never encoded differently.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re

import tiktoken

from lib import tokenizer


# Pre-tokenisation splits beside GPT-2's (SPLIT_PATTERN, Hugging Face's ByteLevel(use_regex=True)):
# Digits(individual_digits=True) then GPT-2's split (SmolLM2, StarCoder; llama.cpp's "smollm"), as one
# regex: a digit stands alone, and whitespace before a digit ends where the digit-free piece ended.
DIGITS_GPT2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# GGUF's tokenizer.ggml.pre -> the split llama.cpp applies (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
GGUF_PRE_PATTERNS = {"gpt2": tokenizer.SPLIT_PATTERN, "smollm": DIGITS_GPT2_PATTERN, "starcoder": DIGITS_GPT2_PATTERN,
                     "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN,
                     "qwen2": QWEN2_PATTERN, "deepseek-r1-qwen": QWEN2_PATTERN}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py): bytes that are printable
    Latin-1 map to themselves, the other 68 to U+0100.. in byte order. tokenizer.json and GGUF spell
    every byte-level token in these characters (a space is "Ġ", U+0120)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def token_bytes(token: str) -> bytes | None:
    """A byte-level token's raw bytes; None if it uses a character outside GPT-2's table."""
    try:
        return bytes(CHAR_TO_BYTE[char] for char in token)
    except KeyError:
        return None


def check_merges(merges, ids: dict[str, int], where: str) -> None:
    """tiktoken's BPE merges, at each step, the adjacent pair whose concatenation has the lowest rank
    (= token id); Hugging Face's merges the pair listed first in `merges`. So tiktoken can follow the
    list only if merge k makes a token whose id does not decrease with k, and whose parts are tokens.
    GPT-2, Llama 3 (which lists every split of a token, consecutively), Qwen and SmolLM2 pass; a file
    that fails is refused rather than encoded differently. (tiktoken may still merge an adjacent pair
    that the list lacks but whose concatenation is a token; on Qwen3's and Llama 3's tokenizer.json
    and SmolLM2's GGUF that never changed an encoding in 4,000 random texts.)"""
    previous = -1
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = ids.get(left + right)
        if left not in ids or right not in ids or merged is None:
            raise ValueError(f"{where}: merge {index} ({left!r} + {right!r}) uses or makes a token not in the vocab")
        if merged < previous:
            raise ValueError(f"{where}: merge {index} makes token {merged}, below an earlier merge's {previous}; "
                             "tiktoken ranks merges by token id, so this vocabulary cannot be a tiktoken Encoding")
        previous = merged


def pattern_from_pre_tokenizer(pre_tokenizer, where: str) -> str:
    """tokenizer.json's pre_tokenizer -> one tiktoken split regex. Accepted (what byte-level models ship):
    ByteLevel(use_regex=True) -> GPT-2's; [Digits(individual_digits), ByteLevel(use_regex=True)] ->
    DIGITS_GPT2_PATTERN; [Split(Regex P, Isolated), ByteLevel(use_regex=False)] -> P, the file's own regex,
    which finish_spec's check_spec probes (a regex that makes tiktoken panic or crawl is refused)."""
    steps = pre_tokenizer.get("pretokenizers", []) if isinstance(pre_tokenizer, dict) and \
        pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return tokenizer.SPLIT_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
            return DIGITS_GPT2_PATTERN
        split = steps[0]
        if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) and \
                isinstance(split.get("pattern"), dict) and isinstance(split["pattern"].get("Regex"), str) and \
                split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    raise ValueError(f"{where}: pre_tokenizer {kinds} is not a byte-level split this reader knows "
                     "(ByteLevel; Digits + ByteLevel; Split(Regex, Isolated) + ByteLevel)")


def normalizer_from_json(normalizer, where: str) -> str | None:
    """tokenizer.json's normalizer -> "NFC" or None (Qwen's is NFC; GPT-2's, Llama 3's, SmolLM2's none)."""
    steps = normalizer.get("normalizers", []) if isinstance(normalizer, dict) and \
        normalizer.get("type") == "Sequence" else [normalizer] if normalizer else []
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    if kinds in ([], ["NFC"]):
        return "NFC" if kinds else None
    raise ValueError(f"{where}: normalizer {kinds} is not supported (none or NFC)")


def token_content(value) -> str | None:
    """tokenizer_config.json writes a token as "text" or as {"content": "text", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def finish_spec(spec: dict, where: str) -> dict:
    """Check bos/eos/pad name tokens, vocab_size covers every id, and check_spec; returns the spec."""
    known = {*spec["special_tokens"], *spec["added_tokens"]}
    for role in ("bos", "eos", "pad"):
        token = spec[role]
        if token is not None and token not in known and token.encode("utf-8") not in spec["ranks"]:
            raise ValueError(f"{where}: the {role} token {token[:80]!r} is not in the vocabulary")
    top = max([*spec["ranks"].values(), *spec["special_tokens"].values(), *spec["added_tokens"].values()],
              default=-1)
    if spec["vocab_size"] is None:
        spec["vocab_size"] = top + 1
    if type(spec["vocab_size"]) is not int or spec["vocab_size"] <= top:
        raise ValueError(f"{where}: vocab_size {spec['vocab_size']} is not above the largest token id {top}")
    tokenizer.check_spec(spec, where)
    return spec


def tokenizer_spec_from_json(tokenizer_json: dict, tokenizer_config: dict | None = None,
                             vocab_size: int | None = None, where: str = "tokenizer.json") -> dict:
    """The spec of a Hugging Face byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen2/2.5/3, SmolLM2).

    Spec: {"name", "pat_str", "ranks": {bytes: id}, "special_tokens": {str: id}, "added_tokens": {str: id},
    "normalized_added_tokens": [str], "normalizer": "NFC" | None, "bos", "eos", "pad": str | None,
    "vocab_size": int (embedding rows, >= the largest id + 1), "chat_template": str (optional)}.
    - ranks: the vocabulary through GPT-2's byte table; a token's rank is its id (see check_merges).
    - added tokens marked "special" are special_tokens (never produced from text by encode_text);
      the others (Qwen3's <think>) are added_tokens, split out of text as single ids like HF does;
      those with "normalized": true are matched after normalisation (normalized_added_tokens).
    - vocab_size: pass config.json's; the default is the largest id + 1."""
    try:
        return spec_from_json(tokenizer_json, tokenizer_config or {}, vocab_size, str(where))
    except (KeyError, TypeError, AttributeError, IndexError) as error:   # a field missing or of the wrong type
        raise ValueError(f"{where}: malformed tokenizer files ({type(error).__name__}: {error})") from None


def spec_from_json(tokenizer_json: dict, config: dict, vocab_size: int | None, where: str) -> dict:
    """The work of the function above, which turns a missing or mistyped field into a ValueError."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix") or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{where}: not a byte-level BPE model (model.type BPE, no byte_fallback, no affixes)")
    decoder = tokenizer_json.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise ValueError(f"{where}: decoder {decoder.get('type')!r} is not ByteLevel")
    pat_str = pattern_from_pre_tokenizer(tokenizer_json.get("pre_tokenizer"), where)
    special_tokens, added_tokens, normalized_added = {}, {}, []
    for token in tokenizer_json.get("added_tokens") or []:
        content, token_id = token["content"], token["id"]
        if token.get("special"):
            special_tokens[content] = token_id
            continue
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise ValueError(f"{where}: added token {content!r} uses lstrip/rstrip/single_word, not supported")
        added_tokens[content] = token_id
        if token.get("normalized"):
            normalized_added.append(content)
    added_ids = {*special_tokens.values(), *added_tokens.values()}
    vocab = model["vocab"]
    check_merges(model.get("merges") or [], vocab, where)
    ranks = {}
    for token, token_id in vocab.items():
        if token_id in added_ids:
            continue
        raw = token_bytes(token)
        if raw is None:
            raise ValueError(f"{where}: vocabulary token {token[:40]!r} is not in GPT-2's byte alphabet")
        ranks[raw] = token_id
    spec = {"name": "tokenizer.json", "pat_str": pat_str, "ranks": ranks, "special_tokens": special_tokens,
            "added_tokens": added_tokens, "normalized_added_tokens": normalized_added,
            "normalizer": normalizer_from_json(tokenizer_json.get("normalizer"), where),
            "bos": token_content(config.get("bos_token")), "eos": token_content(config.get("eos_token")),
            "pad": token_content(config.get("pad_token")), "vocab_size": vocab_size}
    if isinstance(config.get("chat_template"), str):
        spec["chat_template"] = config["chat_template"]
        spec.update(chat_settings_of_template(spec, config["chat_template"]))   # an export of this project
    return finish_spec(spec, where)


def tokenizer_spec_from_gguf(metadata: dict, vocab_size: int | None = None, where: str = "GGUF") -> dict:
    """The spec of a GGUF file's tokenizer (tokenizer.ggml.model == "gpt2", byte-level BPE).
    tokenizer.ggml.tokens are the vocabulary (id = position), token_type 3 (control) -> special_tokens,
    4 (user-defined) -> added_tokens, the rest -> ranks; tokenizer.ggml.merges are checked like
    tokenizer.json's; tokenizer.ggml.pre picks the split (GGUF_PRE_PATTERNS); bos/eos/padding ids
    name the tokens; tokenizer.chat_template is kept. vocab_size defaults to {arch}.vocab_size."""
    try:
        return spec_from_gguf(metadata, vocab_size, str(where))
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{where}: malformed tokenizer metadata ({type(error).__name__}: {error})") from None


def spec_from_gguf(metadata: dict, vocab_size: int | None, where: str) -> dict:
    """The work of the function above, which turns a missing or mistyped field into a ValueError."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model {metadata.get('tokenizer.ggml.model')!r} is not 'gpt2' "
                         "(byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in GGUF_PRE_PATTERNS:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not one of {sorted(GGUF_PRE_PATTERNS)}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if not isinstance(tokens, list) or len(token_types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens and token_type must be lists of one length")
    ranks, special_tokens, added_tokens = {}, {}, {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type == 3:
            special_tokens[token] = token_id
        elif token_type == 4:
            added_tokens[token] = token_id
        else:   # as transformers' GGUF reader: a token outside the byte alphabet is its UTF-8 bytes
            ranks[token_bytes(token) or token.encode("utf-8")] = token_id
    check_merges(metadata.get("tokenizer.ggml.merges") or [], {token: i for i, token in enumerate(tokens)}, where)

    def token_named(key):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if type(token_id) is int and 0 <= token_id < len(tokens) else None

    architecture = metadata.get("general.architecture")
    spec = {"name": f"gguf:{pre}", "pat_str": GGUF_PRE_PATTERNS[pre], "ranks": ranks,
            "special_tokens": special_tokens, "added_tokens": added_tokens, "normalized_added_tokens": [],
            "normalizer": None, "bos": token_named("bos_token_id"), "eos": token_named("eos_token_id"),
            "pad": token_named("padding_token_id"),
            "vocab_size": vocab_size or metadata.get(f"{architecture}.vocab_size")}
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        spec["chat_template"] = metadata["tokenizer.chat_template"]
    return finish_spec(spec, where)


def tokenizer_spec_from_tiktoken_file(path: str, special_tokens: dict[str, int], pat_str: str = LLAMA3_PATTERN,
                                      bos: str | None = None, eos: str | None = None, pad: str | None = None,
                                      vocab_size: int | None = None) -> dict:
    """The spec of a tiktoken ranks file (Llama 3's tokenizer.model): one "base64(token bytes) rank"
    per line. Its special tokens are not in the file: pass them (Llama 3's tokenizer_config.json
    lists them in added_tokens_decoder: <|begin_of_text|> = 128000, ...)."""
    ranks = {}
    try:
        with open(path, "rb") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2 or not fields[1].isdigit():
                    raise ValueError(f"{path}:{line_number}: expected 'base64-token rank'")
                try:
                    token = base64.b64decode(fields[0], validate=True)
                except binascii.Error:
                    raise ValueError(f"{path}:{line_number}: the token is not base64") from None
                if token in ranks:
                    raise ValueError(f"{path}:{line_number}: token {token!r} appears twice")
                ranks[token] = int(fields[1])
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({type(error).__name__}: {error})") from None
    if not ranks:
        raise ValueError(f"{path}: no tokens")
    spec = {"name": f"tiktoken:{os.path.basename(path)}", "pat_str": pat_str, "ranks": ranks,
            "special_tokens": dict(special_tokens), "added_tokens": {}, "normalized_added_tokens": [],
            "normalizer": None, "bos": bos, "eos": eos, "pad": pad, "vocab_size": vocab_size}
    return finish_spec(spec, path)


def tokenizer_spec_from_encoding(enc: tiktoken.Encoding, vocab_size: int | None = None) -> dict:
    """The spec of a plain tiktoken Encoding (tokenizer.get_tokenizer's "bytes", "gpt2", ...), for export,
    with the chat format and default system prompt recorded on it."""
    specials = dict(enc._special_tokens)
    spec = {"name": enc.name, "pat_str": enc._pat_str, "ranks": dict(enc._mergeable_ranks),
            "special_tokens": specials, "added_tokens": {}, "normalized_added_tokens": [], "normalizer": None,
            "bos": None, "eos": "<|endoftext|>" if "<|endoftext|>" in specials else None,
            "pad": "<|pad|>" if "<|pad|>" in specials else None, "vocab_size": vocab_size,
            "chat_format": getattr(enc, "chat_format", "none")}
    if getattr(enc, "system_prompt", ""):
        spec["system_prompt"] = enc.system_prompt
    return finish_spec(spec, enc.name)


def tokenizer_json_from_spec(spec: dict) -> dict:
    """A tokenizer.json that Hugging Face's tokenizers/transformers load and that encodes like
    encoding_from_spec(spec). BPE whose vocab is the ranks through GPT-2's byte table; its merges are
    every split of each token into two tokens, ordered by the token's rank (transformers'
    TikTokenConverter does the same), with ignore_merges (a piece that is a token is taken whole):
    Hugging Face then merges, like tiktoken, the adjacent pair whose concatenation ranks lowest.
    Pre-tokenizer: Split(pat_str, Isolated) then ByteLevel; special and added tokens as added_tokens."""
    tokenizer.check_spec(spec)
    ranks = spec["ranks"]
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        for left, right in sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])):
            merges.append(" ".join("".join(BYTE_TO_CHAR[b] for b in part) for part in (left, right)))
    added = [{"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": content in spec["normalized_added_tokens"], "special": special}
             for special, table in ((True, spec["special_tokens"]), (False, spec["added_tokens"]))
             for content, token_id in table.items()]
    # tokenizers gives an added token the id its content has in model.vocab, else the next free id
    # (not the id written in added_tokens), so the vocab lists special and added tokens too, as HF's do.
    vocab = {"".join(BYTE_TO_CHAR[b] for b in token): rank for token, rank in ranks.items()}
    for token in added:
        vocab.setdefault(token["content"], token["id"])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": sorted(added, key=lambda token: token["id"]),
            "normalizer": {"type": "NFC"} if spec.get("normalizer") == "NFC" else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": spec["pat_str"]}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges}}


def tokenizer_config_from_spec(spec: dict) -> dict:
    """The tokenizer_config.json beside tokenizer_json_from_spec's file (transformers' fast tokenizer):
    no BOS/EOS added by encode, the bos/eos/pad tokens, and chat_template_from_spec's template (never the
    original model's: the model is served as this project trained it)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "bos_token": spec.get("bos"), "eos_token": spec.get("eos"),
            "pad_token": spec.get("pad"), "unk_token": None, "model_max_length": 1 << 30,
            "chat_template": chat_template_from_spec(spec)}


# The chat template of an export: Jinja that renders what tokenizer.render_chat renders, for transformers'
# apply_chat_template and vLLM. One line, no whitespace outside its tags (transformers renders with trim_blocks
# and lstrip_blocks); every string from the spec is a Jinja string literal (jinja_string). Its first tag names
# the format, so that reading the export back (chat_settings_of_template) recovers the format and the prompt.
TEMPLATE_HEAD = "{#- chat_format: %s; written by lib/tokenizer_files.py to render as tokenizer.encode_chat -#}"


def jinja_string(text: str) -> str:
    """A Jinja string literal of `text`. JSON's escapes are Jinja's (its lexer decodes a literal with Python's
    unicode-escape, after turning the non-ASCII characters that JSON leaves raw into escapes)."""
    return json.dumps(text, ensure_ascii=False)


def chat_template_from_spec(spec: dict) -> str:
    r"""The chat template of the spec's chat format ("none" where it records none) and default system prompt:
    apply_chat_template(messages, add_generation_prompt=...) renders the text of tokenizer.render_chat, markers
    included, so its ids are encode_chat's (test_tokenizer_files.py checks it with transformers):
    - a default system prompt opens a conversation whose first message is not a system message;
    - chatml: <|im_start|>{role}\n{content}<|im_end|>\n per message, <|im_start|>assistant\n to answer;
    - llama3: <|begin_of_text|> (where the tokenizer has it), <|start_header_id|>{role}<|end_header_id|>\n\n
      {content}<|eot_id|> per message, <|start_header_id|>assistant<|end_header_id|>\n\n to answer;
    - none: a system message's text and a blank line, a user message's text, an assistant message's text and
      the end-of-turn token (the spec's eos, else <|endoftext|>).
    Messages with a marker's string in their text differ: apply_chat_template makes it the marker (unless
    sanitize_control_tokens=True), encode_chat keeps it text."""
    chat_format = spec.get("chat_format") or "none"
    system_prompt = spec.get("system_prompt") or ""
    template = TEMPLATE_HEAD % chat_format
    if system_prompt:
        template += ("{% if not messages or messages[0]['role'] != 'system' %}{% set messages = [{'role': 'system', "
                     f"'content': {jinja_string(system_prompt)}}}] + messages %}}{{% endif %}}")
    if chat_format == "chatml":
        turn = "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        answer = "{{ '<|im_start|>assistant\\n' }}"
    elif chat_format == "llama3":
        if "<|begin_of_text|>" in {**spec["special_tokens"], **spec["added_tokens"]}:
            template += "{{ '<|begin_of_text|>' }}"
        turn = ("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + "
                "'<|eot_id|>' }}")
        answer = "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    else:
        eos = spec.get("eos") or "<|endoftext|>"        # the end of turn of "none": SpecEncoding.eot_token
        turn = ("{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + " + jinja_string(eos) + " }}"
                "{% else %}{{ message['content'] }}{% endif %}")
        answer = ""
    template += "{% for message in messages %}" + turn + "{% endfor %}"
    return template + ("{% if add_generation_prompt %}" + answer + "{% endif %}" if answer else "")


def chat_settings_of_template(spec: dict, template: str) -> dict:
    """{"chat_format"[, "system_prompt"]} of a chat template that chat_template_from_spec wrote for this
    tokenizer (a folder this project exported), so that it reloads as it was trained; {} for any other template.
    Read from its head and its system prompt's literal, and kept only if writing them again gives the same
    template, character for character."""
    head = re.match(re.escape(TEMPLATE_HEAD).replace("%s", "(none|chatml|llama3)"), template)
    if head is None:
        return {}
    settings = {"chat_format": head[1]}
    literal = re.search(r"'content': (\"(?:[^\"\\]|\\.)*\")\}\] \+ messages", template)
    if literal:
        try:
            settings["system_prompt"] = json.loads(literal[1])
        except ValueError:
            return {}
    markers = {**spec["special_tokens"], **spec["added_tokens"]}
    if not all(marker in markers for marker in tokenizer.CHAT_MARKERS[head[1]]) or \
            chat_template_from_spec({**spec, **settings}) != template:
        return {}
    return settings

