"""The file formats real models ship in, read and written with numpy and torch alone.

safetensors (huggingface.co/docs/safetensors, "Format"): read one file or a sharded folder, write one
file atomically. GGUF v2/v3 (ggml/docs/gguf.md; gguf-py's gguf_reader.py and quants.py): metadata and
tensors, dequantised from F16, BF16, Q8_0, Q4_0 and Q4_1 to float32.

Every size, count and offset is checked against the file's size before anything is allocated for it. A bad
file is a ValueError whose one-line message starts with the path (checkpoints.load turns it into a
CheckpointError).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np
import torch

from lib import rundir


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_MAX_HEADER = 100_000_000          # the safetensors library's own limit


def safetensors_layout(path: str, header_bytes: bytes, data_size: int) -> dict:
    """Check a safetensors header against the data area; returns {name: (dtype, shape, begin, end)}.
    No dimension may exceed the file's size in bytes: a tensor with elements cannot have one, and an empty
    one (a 0 elsewhere in its shape) claiming one would reach torch as a shape it cannot take."""
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
    layout, file_size = {}, 8 + len(header_bytes) + data_size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(type(n) is int and 0 <= n <= file_size for n in entry["shape"])   # an empty tensor too
                and len(entry["data_offsets"]) == 2 and all(type(n) is int for n in entry["data_offsets"])):
            raise ValueError(f"{path}: tensor {name[:80]!r} needs a known dtype, a shape (no dimension above the "
                             f"file's {file_size} bytes) and two data_offsets")
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
    """Write tensors in the safetensors format (layout in read_safetensors), atomically (rundir.atomic_write:
    a temporary file .<name>.<pid>.tmp beside `path`, then os.replace; a killed writer's temporary file is
    removed by the next write). Each tensor's own elements are written (a view of a larger
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
    with rundir.atomic_write(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for name in order:
            file.write(contiguous[name].reshape(-1).view(torch.uint8).numpy().data)
        file.flush()
        os.fsync(file.fileno())


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

