"""Reading and writing the files real models ship in: safetensors, GGUF, and byte-level BPE tokenizers.

Written to be pasted into model.py (sections 2 "Tokenizer" and 5 "Checkpoints"). Standard library,
torch, numpy and tiktoken (plus `regex`, tiktoken's own dependency, imported lazily for text holding a
byte the vocabulary lacks). A bad file is a ValueError whose one-line message starts with the path.

- safetensors (https://huggingface.co/docs/safetensors, "Format"): read_safetensors,
  read_safetensors_folder, write_safetensors.
- GGUF v2/v3 (ggml/docs/gguf.md; gguf-py's gguf_reader.py and quants.py): read_gguf dequantises
  F32, F16, BF16, Q8_0, Q4_0 and Q4_1 to float32; unpermute_llama_qk undoes llama.cpp's q/k row order.
- Tokenizers: a plain "spec" dict (safe in torch.save / torch.load(weights_only=True)) built from
  Hugging Face's tokenizer.json, GGUF metadata or a tiktoken ranks file; encoding_from_spec turns it
  into a tiktoken.Encoding that encodes and decodes like Hugging Face's `tokenizers`;
  tokenizer_json_from_spec writes it back out.
"""
import base64
import binascii
import json
import math
import mmap
import os
import re
import struct
import tempfile
import unicodedata

import numpy as np
import tiktoken
import torch

# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_MAX_HEADER = 100_000_000          # the safetensors library's own limit


def safetensors_layout(path: str, header_bytes: bytes, data_size: int) -> dict:
    """Check a safetensors header against the data area; returns {name: (dtype, shape, begin, end)}."""
    def no_duplicates(pairs):
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{path}: the safetensors header is not valid JSON (or repeats a name)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    layout = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(type(n) is int and n >= 0 for n in entry["shape"])
                and len(entry["data_offsets"]) == 2 and all(type(n) is int for n in entry["data_offsets"])):
            raise ValueError(f"{path}: tensor {name[:80]!r} needs a known dtype, a shape and two data_offsets")
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name[:80]!r} lies outside the file's {data_size} data bytes")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name[:80]!r} of shape {shape} {entry['dtype']} has "
                             f"{end - begin} bytes, not {math.prod(shape) * dtype.itemsize}")
        layout[name] = (dtype, shape, begin, end)
    previous_end, previous_name = 0, None
    for name, (_, _, begin, end) in sorted(layout.items(), key=lambda item: item[1][2:]):
        if begin < previous_end:
            raise ValueError(f"{path}: tensors {previous_name[:80]!r} and {name[:80]!r} overlap")
        if end > begin:
            previous_end, previous_name = end, name
    return layout


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file; every tensor owns its memory.

    Layout: u64 little-endian N | N bytes of JSON header | data area.
    Header: {name: {"dtype": "BF16"|"F16"|"F32"|..., "shape": [d0, d1, ...], "data_offsets": [begin, end]},
             "__metadata__": {str: str}}   (optional); offsets count from the start of the data area,
    and a tensor's bytes are prod(shape) * itemsize, row-major, little-endian.
    Every size and offset is checked against the file's size before any tensor is allocated."""
    try:
        with open(path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            if file_size < 8:
                raise ValueError(f"{path}: {file_size} bytes is too short for a safetensors file")
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > min(file_size - 8, SAFETENSORS_MAX_HEADER):
                raise ValueError(f"{path}: the header length {header_size} runs past the end of the file")
            layout = safetensors_layout(path, file.read(header_size), file_size - 8 - header_size)
            tensors = {}
            for name, (dtype, shape, begin, end) in layout.items():
                tensor = torch.empty(shape, dtype=dtype)
                file.seek(8 + header_size + begin)
                if end > begin and file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                    raise ValueError(f"{path}: tensor {name[:80]!r} is cut short")
                tensors[name] = tensor
            return tensors
    except (OSError, struct.error) as error:
        raise ValueError(f"{path}: cannot read ({type(error).__name__}: {error})") from None


def read_safetensors_folder(folder: str) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model folder: model.safetensors, or the shards that
    model.safetensors.index.json names ({"weight_map": {tensor name: shard file name}})."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    try:
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{index_path}: not a safetensors index (JSON with a 'weight_map')") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{index_path}: shard {shard[:80]!r} is not a file name inside the folder")
        tensors.update(read_safetensors(os.path.join(folder, shard)))
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise ValueError(f"{index_path}: {len(missing)} tensors of the weight_map are in no shard, "
                         f"e.g. {missing[0][:80]!r}")
    return tensors


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the safetensors format (layout in read_safetensors), atomically: a temporary
    file beside `path`, then os.replace. Each tensor's own elements are written (a view of a larger
    storage writes only its view); tied weights appear once per name the caller passes. The header
    is padded with spaces to a multiple of 8 bytes and tensors are ordered by item size, largest
    first, so every tensor starts at an offset aligned to its item size."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: safetensors metadata must map str to str")
    contiguous = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__" or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: cannot write {name!r}: names are str (not '__metadata__'), values tensors")
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors here does not take")
        contiguous[name] = tensor.detach().to("cpu").contiguous()
    header, offset = {}, 0
    order = sorted(contiguous, key=lambda name: (-contiguous[name].element_size(), name))
    for name in order:
        size = contiguous[name].numel() * contiguous[name].element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[contiguous[name].dtype],
                        "shape": list(contiguous[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
            for name in order:
                file.write(contiguous[name].reshape(-1).view(torch.uint8).numpy().data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

# Metadata value types (ggml/docs/gguf.md, enum gguf_metadata_value_type): struct format, size.
GGUF_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
                6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}
# Tensor types we dequantise (ggml.h enum ggml_type): name, elements per block, bytes per block.
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
GGML_OTHER_TYPE_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
                         14: "Q6_K", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
GGUF_MAX_DIMS, GGUF_MAX_NESTING = 4, 8


def dequantize(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """GGML blocks (n_blocks, bytes per block) uint8 -> float32 (n_blocks * elements per block,).
    Math as in gguf-py's quants.py (and ggml-quants.c's dequantize_row_*), computed in float32:
      F16, BF16: the 2-byte float (bf16 = the top 16 bits of a float32), widened to float32.
      Q8_0: [fp16 d][32 x int8 q]                    x_i = d * q_i
      Q4_0: [fp16 d][16 bytes of 4-bit q]            x_i = d * (q_i - 8)
      Q4_1: [fp16 d][fp16 m][16 bytes of 4-bit q]    x_i = d * q_i + m
    In Q4 blocks byte j holds element j in its low nibble and element j + 16 in its high nibble."""
    if type_name == "F32":
        return blocks.reshape(-1).view("<f4").copy()
    if type_name == "F16":
        return blocks.reshape(-1).view("<f2").astype(np.float32)
    if type_name == "BF16":
        return (blocks.reshape(-1).view("<u2").astype(np.uint32) << 16).view(np.float32)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)                        # (n_blocks, 1)
    if type_name == "Q8_0":
        return (blocks[:, 2:].view(np.int8).astype(np.float32) * scale).reshape(-1)
    packed = blocks[:, -16:]                                                           # (n_blocks, 16)
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1)                     # (n_blocks, 32)
    if type_name == "Q4_0":
        return (scale * (nibbles.astype(np.int8) - np.int8(8)).astype(np.float32)).reshape(-1)
    minimum = blocks[:, 2:4].copy().view("<f2").astype(np.float32)                     # (n_blocks, 1)
    return (scale * nibbles.astype(np.float32) + minimum).reshape(-1)                 # Q4_1


class GGUFCursor:
    """Reads GGUF's little-endian values from a memory-mapped file, never past its end."""

    def __init__(self, path: str, data: mmap.mmap):
        self.path, self.data, self.position = path, data, 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.position:
            raise ValueError(f"{self.path}: the file ends inside {what}")
        self.position += size
        return self.data[self.position - size:self.position]

    def scalar(self, value_type: int, what: str):
        layout, size = GGUF_SCALARS[value_type]
        return struct.unpack(layout, self.take(size, what))[0]

    def string(self, what: str) -> str:
        size = self.scalar(10, what)
        try:
            return self.take(size, what).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not UTF-8") from None

    def value(self, value_type: int, what: str, depth: int = 0):
        """One metadata value: a scalar, a string (u64 length + UTF-8 bytes), or an array
        (u32 element type, u64 count, the elements; arrays may nest)."""
        if value_type in GGUF_SCALARS:
            return self.scalar(value_type, what)
        if value_type == GGUF_STRING:
            return self.string(what)
        if value_type != GGUF_ARRAY or depth >= GGUF_MAX_NESTING:
            raise ValueError(f"{self.path}: {what} has value type {value_type}, which GGUF does not define")
        element_type, count = self.scalar(4, what), self.scalar(10, what)
        smallest = GGUF_SCALARS[element_type][1] if element_type in GGUF_SCALARS else 8
        if count * smallest > len(self.data) - self.position:
            raise ValueError(f"{self.path}: the file ends inside {what} ({count} elements)")
        if element_type in GGUF_SCALARS:                   # numbers in one go
            values = np.frombuffer(self.take(count * smallest, what), dtype=GGUF_NUMPY[element_type])
            return values.astype(bool).tolist() if element_type == 7 else values.tolist()
        return [self.value(element_type, what, depth + 1) for _ in range(count)]


def read_gguf(path: str, tensor_names=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a GGUF file (version 2 or 3), tensors dequantised to float32.

    Layout (ggml/docs/gguf.md), all little-endian:
      "GGUF" | u32 version | u64 tensor_count | u64 kv_count
      kv_count x  (string key, u32 value type, value)            string = u64 length + UTF-8 bytes
      tensor_count x (string name, u32 n_dims, n_dims x u64 dims, u32 ggml type, u64 offset)
      padding to `general.alignment` (default 32) | tensor data (offsets count from here).
    dims run fastest-first (ggml's ne[0] is the row length), so the torch shape is reversed(dims).
    `tensor_names`: dequantise only these (default: all). Counts, lengths and tensor extents are
    checked against the file size before anything is allocated for them."""
    file_size = os.path.getsize(path) if os.path.isfile(path) else -1
    if file_size < 24:
        raise ValueError(f"{path}: not a GGUF file ({'missing' if file_size < 0 else f'{file_size} bytes'})")
    with open(path, "rb") as file:   # the map outlives the file object; it closes when unreferenced
        cursor = GGUFCursor(path, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
    if cursor.take(4, "the magic") != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (no 'GGUF' magic)")
    version = cursor.scalar(4, "the header")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    tensor_count, kv_count = cursor.scalar(10, "the header"), cursor.scalar(10, "the header")
    if kv_count * 12 + tensor_count * 24 > file_size:    # a kv takes >= 12 bytes, a tensor info >= 24
        raise ValueError(f"{path}: {tensor_count} tensors and {kv_count} metadata keys cannot fit in {file_size} bytes")
    metadata = {}
    for index in range(kv_count):
        key = cursor.string(f"metadata key {index}")
        if key in metadata:
            raise ValueError(f"{path}: metadata key {key[:80]!r} appears twice")
        metadata[key] = cursor.value(cursor.scalar(4, f"metadata {key[:80]!r}"), f"metadata {key[:80]!r}")
    infos = {}
    for index in range(tensor_count):
        name = cursor.string(f"tensor info {index}")
        n_dims = cursor.scalar(4, f"tensor {name[:80]!r}")
        if n_dims > GGUF_MAX_DIMS or name in infos:
            raise ValueError(f"{path}: tensor {name[:80]!r} has {n_dims} dims or appears twice")
        dims = [cursor.scalar(10, f"tensor {name[:80]!r}") for _ in range(n_dims)]
        infos[name] = (dims, cursor.scalar(4, f"tensor {name[:80]!r}"), cursor.scalar(10, f"tensor {name[:80]!r}"))
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.position // alignment) * alignment
    wanted = infos if tensor_names is None else {name: infos.get(name) for name in tensor_names}
    extents = {}
    for name, info in wanted.items():
        if info is None:
            raise ValueError(f"{path}: has no tensor {name[:80]!r}")
        dims, ggml_type, offset = info
        if ggml_type not in GGML_TYPES:
            type_name = GGML_OTHER_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")
            raise ValueError(f"{path}: tensor {name[:80]!r} is {type_name}; only "
                             f"{', '.join(t[0] for t in GGML_TYPES.values())} can be dequantised here")
        type_name, block_elements, block_bytes = GGML_TYPES[ggml_type]
        n_elements = math.prod(dims)
        if dims and dims[0] % block_elements or offset % alignment or max(dims, default=0) > 2 * file_size:
            raise ValueError(f"{path}: tensor {name[:80]!r} ({type_name}, dims {dims}, offset {offset}) "
                             f"is not whole {block_elements}-element blocks at an aligned offset in this file")
        n_bytes = n_elements // block_elements * block_bytes
        if data_start + offset + n_bytes > file_size:
            raise ValueError(f"{path}: tensor {name[:80]!r} ({n_bytes} bytes at {offset}) runs past the file's end")
        extents[name] = (data_start + offset, n_elements // block_elements, block_bytes, type_name, dims)
    tensors = {}
    for name, (start, n_blocks, block_bytes, type_name, dims) in extents.items():
        blocks = np.frombuffer(cursor.data, np.uint8, n_blocks * block_bytes, start).reshape(n_blocks, block_bytes)
        tensors[name] = torch.from_numpy(dequantize(blocks, type_name).reshape(dims[::-1]))
    return metadata, tensors


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


# ----------------------------------------------------------------------------------------------
# Tokenizers: byte-level BPE as a tiktoken.Encoding
# ----------------------------------------------------------------------------------------------

# Pre-tokenisation splits. GPT-2's (= model.SPLIT_PATTERN; Hugging Face's ByteLevel(use_regex=True)):
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=True) then GPT-2's split (SmolLM2, StarCoder; llama.cpp's "smollm"), as one
# regex: a digit stands alone, and whitespace before a digit ends where the digit-free piece ended.
DIGITS_GPT2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GGUF's tokenizer.ggml.pre -> the split llama.cpp applies (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
GGUF_PRE_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": DIGITS_GPT2_PATTERN, "starcoder": DIGITS_GPT2_PATTERN,
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
    DIGITS_GPT2_PATTERN; [Split(Regex P, Isolated), ByteLevel(use_regex=False)] -> P."""
    steps = pre_tokenizer.get("pretokenizers", []) if isinstance(pre_tokenizer, dict) and \
        pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return GPT2_PATTERN
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
    check_spec(spec, where)
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
    """The spec of a plain tiktoken Encoding (model.get_tokenizer's "bytes", "gpt2", ...), for export."""
    specials = dict(enc._special_tokens)
    spec = {"name": enc.name, "pat_str": enc._pat_str, "ranks": dict(enc._mergeable_ranks),
            "special_tokens": specials, "added_tokens": {}, "normalized_added_tokens": [], "normalizer": None,
            "bos": None, "eos": "<|endoftext|>" if "<|endoftext|>" in specials else None,
            "pad": "<|pad|>" if "<|pad|>" in specials else None, "vocab_size": vocab_size}
    return finish_spec(spec, enc.name)


def check_spec(spec, where: str = "tokenizer spec") -> None:
    """A spec read from a checkpoint is checked before use: every field's type, ids that do not collide,
    a vocab_size above every id. (tiktoken itself rejects a pat_str that is not a valid regex.)"""
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
        self.piece_regex = None    # compiled on first use by encode_dropping_unknown_bytes

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
    (no unk token) drops the byte, and encode_text does the same (encode_dropping_unknown_bytes)."""
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
      3. tiktoken's encode_ordinary on each piece (the pat_str split, then BPE); a piece holding a
         byte the vocabulary lacks is redone without it (encode_dropping_unknown_bytes).
    Special-token strings in the text stay plain text. Works on plain tiktoken Encodings too."""
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
            part_ids = tiktoken.Encoding.encode_ordinary(enc, part)
            ids += part_ids if enc.unknown_byte_ids.isdisjoint(part_ids) else encode_dropping_unknown_bytes(enc, part)
    return ids


def encode_dropping_unknown_bytes(enc: "SpecEncoding", text: str) -> list[int]:
    """Text holding bytes the vocabulary lacks, encoded as Hugging Face does: within each pre-token
    such a byte is dropped and BPE merges across the gap ("a<0x04>b" in one piece may become "ab").
    tiktoken splits in Rust and cannot drop a byte, so the split is done in Python with the `regex`
    module (tiktoken's own dependency; its Encoding._encode_only_native_bpe does the same), and each
    piece without its unknown bytes is BPE-encoded by tiktoken (encode_single_piece)."""
    import regex   # installed with tiktoken (a requirement of it); needed only for such text
    if enc.piece_regex is None:
        enc.piece_regex = regex.compile(enc._pat_str)
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")   # lone surrogates: U+FFFD, as tiktoken
    ids = []
    for match in enc.piece_regex.finditer(text):
        known = bytes(b for b in match.group().encode("utf-8") if b not in enc.unknown_bytes)
        ids += enc._encode_single_piece(known) if known else []
    return ids


def decode_text(enc: tiktoken.Encoding, ids, errors: str = "replace") -> str:
    """Ids -> text; like Hugging Face's decode(skip_special_tokens=False), ids the tokenizer does not
    have (embedding rows past the vocabulary, the missing-byte ids) are skipped, and invalid UTF-8
    becomes U+FFFD."""
    if not isinstance(enc, SpecEncoding):
        return enc.decode(ids, errors=errors)
    known = [int(i) for i in ids if int(i) in enc.known_ids]
    return tiktoken.Encoding.decode(enc, known, errors=errors)


def tokenizer_json_from_spec(spec: dict) -> dict:
    """A tokenizer.json that Hugging Face's tokenizers/transformers load and that encodes like
    encoding_from_spec(spec). BPE whose vocab is the ranks through GPT-2's byte table; its merges are
    every split of each token into two tokens, ordered by the token's rank (transformers'
    TikTokenConverter does the same), with ignore_merges (a piece that is a token is taken whole):
    Hugging Face then merges, like tiktoken, the adjacent pair whose concatenation ranks lowest.
    Pre-tokenizer: Split(pat_str, Isolated) then ByteLevel; special and added tokens as added_tokens."""
    check_spec(spec)
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
    no BOS/EOS added by encode, the bos/eos/pad tokens, and the chat template if the spec has one."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "bos_token": spec.get("bos"), "eos_token": spec.get("eos"),
              "pad_token": spec.get("pad"), "unk_token": None, "model_max_length": 1 << 30}
    if spec.get("chat_template"):
        config["chat_template"] = spec["chat_template"]
    return config
