"""export/gguf_reader.py: the lean GGUF reader against gguf-py's GGUFReader (the independent
reference) on exported models of several weight types, files of every value type, a big-endian
file and a custom alignment; and every damaged file a typed CheckpointError, read without
allocating what an edited count claims."""

from __future__ import annotations

import struct
import tracemalloc
import warnings

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF reader needs the gguf package (pip install gguf)")

from conftest import finish_gguf  # noqa: E402
from mamba_deploy.errors import CheckpointError, ModelNotFoundError  # noqa: E402
from mamba_deploy.export.gguf_reader import GGUFFile  # noqa: E402


def assert_same_as_gguf_py(path) -> GGUFFile:
    ref, ours = gguf.GGUFReader(str(path)), GGUFFile(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # gguf-py's own header pseudo-fields
    assert list(ours.fields) == keys
    for k in keys:
        f, g = ref.fields[k], ours.fields[k]
        assert g.type == f.types[0], k
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            assert g.item_type == f.types[1], k
            if f.types[1] != gguf.GGUFValueType.ARRAY:  # gguf-py counts a nested array's leaves
                assert g.count == len(f.data), k
        want = g.contents()
        if g.item_type == gguf.GGUFValueType.ARRAY:  # gguf-py flattens a nested array's contents
            want = [x for inner in want for x in inner]
        assert want == f.contents(), k
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert len(ours.tensors) == len(ref.tensors)
    for t, u in zip(ref.tensors, ours.tensors):
        assert (u.name, u.tensor_type, u.shape) == (t.name, t.tensor_type, tuple(t.shape.tolist()))
        assert (u.n_elements, u.n_bytes, u.data_offset) == (t.n_elements, t.n_bytes, t.data_offset), t.name
        assert u.data.dtype == t.data.dtype and u.data.shape == t.data.shape, t.name
        assert np.array_equal(u.data, t.data, equal_nan=True), t.name
        assert not u.data.flags.writeable
    return ours


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_exported_models_read_as_gguf_py_reads_them(ckpt, tmp_path, outtype):
    from mamba_deploy.export.gguf import export_gguf

    for kind in ("mamba", "mamba2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_gguf(ckpt(kind)[0], tmp_path / f"{kind}-{outtype}.gguf", outtype=outtype)
        ours = assert_same_as_gguf_py(path)
        assert len(ours.get_field("tokenizer.ggml.tokens").contents()) > 0


def test_k_quant_file_reads_as_gguf_py_reads_it(ckpt, tmp_path):
    pytest.importorskip("llama_cpp", reason="K-quant export runs llama.cpp's quantizer (pip install llama-cpp-python)")
    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(ckpt("mamba2")[0], tmp_path / "m2-q4_k_m.gguf", outtype="q4_k_m")
    assert_same_as_gguf_py(path)


def every_value_type(path, endian=None, alignment=None):
    w = gguf.GGUFWriter(str(path), "mamba2", **({"endianess": endian} if endian else {}))
    VT = gguf.GGUFValueType
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5e-5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "Mamba ✓ état")
    w.add_string("t.empty", "")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "ü", "<0xFF>"])
    w.add_array("t.bools", [True, False])
    w.add_key_value("t.nested", [[1, 2], [3]], VT.ARRAY, sub_type=VT.ARRAY)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(6, dtype=np.float16).reshape(2, 3))
    w.add_tensor("c", np.arange(5, dtype=np.int32))
    q = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("d", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    finish_gguf(w)
    return path


@pytest.mark.parametrize("variant", ["little", "big", "aligned64"])
def test_every_value_type_and_byte_order(tmp_path, variant):
    endian = gguf.GGUFEndian.BIG if variant == "big" else None
    path = every_value_type(tmp_path / "all.gguf", endian, 64 if variant == "aligned64" else None)
    ours = assert_same_as_gguf_py(path)
    assert ours.get_field("t.nested").contents() == [[1, 2], [3]]
    assert ours.get_field("t.u64").contents() == 2**63 + 5
    assert ours.alignment == (64 if variant == "aligned64" else 32)
    q8 = gguf.quants.dequantize(ours.tensors[3].data, ours.tensors[3].tensor_type)
    np.testing.assert_allclose(q8, np.linspace(-1, 1, 64).reshape(2, 32), atol=1e-2)  # its bytes, in order


def _header(n_tensors=0, n_fields=1, version=3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_fields)


def _key(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def _expect_corrupt(path, *words):
    with pytest.raises(CheckpointError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert str(path) in msg and all(w in msg for w in words), msg
    return msg


def test_damaged_headers_are_typed_errors(tmp_path):
    cases = {
        "empty": (b"", ["cannot map"]),
        "magic": (b"GGML" + bytes(40), ["not a GGUF file"]),
        "v1": (_header(version=1), ["version 1", "current llama.cpp"]),
        "v9": (_header(version=9), ["version 9"]),
        "keys": (_header(n_fields=2**60), [str(2**60), "metadata keys"]),
        "tensors": (_header(n_tensors=2**40, n_fields=0), [str(2**40), "tensor infos"]),
        "valuetype": (_header() + _key("k") + struct.pack("<I", 13), ["'k'", "value type 13"]),
        "array": (_header() + _key("k") + struct.pack("<IIQ", 9, 4, 2**61) + bytes(64), [str(2**61), "'k'"]),
        "strings": (_header() + _key("k") + struct.pack("<IIQ", 9, 8, 2**59), [str(2**59)]),
        "strlen": (_header() + _key("k") + struct.pack("<IQ", 8, 2**62) + b"abc", ["'k' runs past the file's end"]),
        "short_string_array": (_header() + _key("k") + struct.pack("<IIQ", 9, 8, 3) + _key("a") + _key("b")
                               + struct.pack("<Q", 1000) + bytes(8), ["'k' runs past", "at string 2 of 3"]),
        "twice": (_header(n_fields=2) + (_key("k") + struct.pack("<IB", 0, 1)) * 2, ["'k' appears twice"]),
        "keyname": (_header() + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1), ["not UTF-8"]),
        "alignment": (_header() + _key("general.alignment") + struct.pack("<II", 4, 48), ["power of two"]),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        _expect_corrupt(tmp_path / name, *words)
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError):
        GGUFFile(tmp_path)  # a folder


def _tensor_file(tmp_path, name="t.gguf", dims=(32, 2), code=0, offset=0, n=1, data=256, twice=False):
    info = _key("w") + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", code,
                                                                                                        offset)
    body = _header(n_tensors=n + twice, n_fields=0) + info * (n + twice)
    body += bytes(-len(body) % 32) + bytes(data)
    (tmp_path / name).write_bytes(body)
    return tmp_path / name


def test_damaged_tensor_infos_are_typed_errors(tmp_path):
    GGUFFile(_tensor_file(tmp_path))  # the well-formed base: 2 rows of 32 F32 = 256 bytes
    _expect_corrupt(_tensor_file(tmp_path, dims=(1, 1, 1, 1, 1)), "5 dimensions")
    _expect_corrupt(_tensor_file(tmp_path, dims=(), code=8), "Q8_0 with rows of 1 values")  # a 0-d block type
    _expect_corrupt(_tensor_file(tmp_path, code=250), "type code 250", "pip install -U gguf")
    _expect_corrupt(_tensor_file(tmp_path, code=8, dims=(31, 2)), "Q8_0", "31", "block of 32")
    _expect_corrupt(_tensor_file(tmp_path, dims=(64, 2)), "past the file's end")
    _expect_corrupt(_tensor_file(tmp_path, offset=2**50), "past the file's end")
    _expect_corrupt(_tensor_file(tmp_path, twice=True, data=512), "'w' appears twice")


def test_truncated_anywhere_is_a_typed_error(ckpt, tmp_path):
    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = export_gguf(ckpt("mamba2")[0], tmp_path / "m.gguf").read_bytes()
    header_end = GGUFFile(tmp_path / "m.gguf").data_offset
    cuts = sorted({*range(0, 64), *range(64, header_end, max(1, header_end // 300)), header_end + 1, len(full) - 1})
    for cut in cuts:
        (tmp_path / "cut.gguf").write_bytes(full[:cut])
        with pytest.raises(CheckpointError):
            GGUFFile(tmp_path / "cut.gguf")


def test_a_token_that_is_not_utf8_is_reported_when_read(tiny_gguf, tmp_path):
    """gguf-py fails on such a file only when the field is read; so does this reader (a key nobody
    reads does not make the file unreadable), with a typed error naming the key."""
    data = bytearray(tiny_gguf.read_bytes())
    ours = GGUFFile(tiny_gguf)
    tokens = ours.get_field("tokenizer.ggml.tokens").contents()
    victim = next(t for t in tokens if t.isascii() and t.isalpha() and len(t) >= 2)
    i = data.index(struct.pack("<Q", len(victim)) + victim.encode())
    data[i + 8] = 0xFF
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    bad = GGUFFile(tmp_path / "bad.gguf")
    assert bad.get_field("general.architecture").contents() in ("mamba", "mamba2")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.tokens.*not UTF-8"):
        bad.get_field("tokenizer.ggml.tokens").contents()
    with pytest.raises(UnicodeDecodeError):  # the reference agrees the bytes are bad
        gguf.GGUFReader(str(tmp_path / "bad.gguf")).get_field("tokenizer.ggml.tokens").contents()


def test_large_vocabulary_costs_its_strings_not_views(tmp_path):
    """gguf-py's reader keeps ~1.6 KB of numpy views per vocabulary entry (0.7 GB at 262k tokens);
    this one the strings themselves: a 200k-token vocabulary opens in well under 100 bytes of
    Python allocations per token beyond the token texts."""
    n = 200_000
    path = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(str(path), "mamba2")
    w.add_token_list([f"tok{i}" for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([1] * n)
    w.add_tensor("x", np.zeros(4, np.float32))
    finish_gguf(w)
    tracemalloc.start()
    try:
        ours = GGUFFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    tokens = ours.get_field("tokenizer.ggml.tokens").contents()
    assert tokens[0] == "tok0" and tokens[-1] == f"tok{n - 1}" and len(tokens) == n
    assert ours.get_field("tokenizer.ggml.scores").count == n
    per_token = peak / n
    assert per_token < 100, f"{per_token:.0f} bytes per token"


def test_what_a_review_found_the_first_version_miss(tmp_path):
    """An empty array of an undefined item type was a raw ValueError, arrays nested 5000 deep a
    RecursionError; a 0-d tensor (gguf-py writes one for a numpy scalar) was refused."""
    cases = {
        "item13": (_header() + _key("k") + struct.pack("<IIQ", 9, 13, 0), ["array of value type 13"]),
        "deep": (_header() + _key("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000
                 + struct.pack("<IQ", 4, 0), ["nests arrays more than 8 deep"]),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        _expect_corrupt(tmp_path / name, *words)
    w = gguf.GGUFWriter(str(tmp_path / "scalar.gguf"), "mamba")
    w.add_tensor("scalar", np.array(3.0, dtype=np.float32))
    w.add_tensor("v", np.arange(4, dtype=np.float32))
    finish_gguf(w)
    ours = assert_same_as_gguf_py(tmp_path / "scalar.gguf")
    assert ours.tensors[0].shape == () and float(ours.tensors[0].data) == 3.0


def test_random_damage_is_always_a_typed_error(tmp_path):
    """Byte flips, overwritten counts and cuts of a small valid file (F32, Q4_0 and F16 tensors):
    every outcome is a good read or a MambaDeployError, never another exception."""
    import random

    from mamba_deploy.errors import MambaDeployError
    from mamba_deploy.export.gguf_import import open_gguf, open_reader

    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "base.gguf"), "mamba")
    w.add_uint32("mamba.embedding_length", 64)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("a", x)
    w.add_tensor("b", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("c", x.astype(np.float16))
    finish_gguf(w)
    data = (tmp_path / "base.gguf").read_bytes()
    rng = random.Random(0)
    for _ in range(400):
        d = bytearray(data)
        mode = rng.randrange(4)
        if mode == 0:
            d = d[:rng.randrange(len(d))]
        elif mode == 1:
            for _ in range(rng.randint(1, 4)):
                d[rng.randrange(len(d))] = rng.randrange(256)
        elif mode == 2:
            i = rng.randrange(len(d) - 8)
            d[i:i + 8] = rng.choice([b"\xff" * 8, (2**31).to_bytes(8, "little"), rng.randrange(2**64).to_bytes(8, "little")])
        else:
            i = rng.randrange(len(d) - 4)
            d[i:i + 4] = rng.randrange(0, 20).to_bytes(4, "little")
        (tmp_path / "fz.gguf").write_bytes(bytes(d))
        try:
            r = open_reader(tmp_path / "fz.gguf")
            for f in r.fields.values():
                f.contents()
            open_gguf(tmp_path / "fz.gguf")
        except MambaDeployError:
            pass
