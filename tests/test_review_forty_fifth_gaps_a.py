"""Gaps a mutation-testing review found (forty-fifth review, part A): behaviour of
export/onnx_meta.py, runners/preflight.py, model_card.py and runners/openvino_runner.py that a
plausible bug could change without any test failing.

References are independent of the code under test: protobuf's own parser (onnx.ModelProto) for the
metadata scan, onnxruntime's metadata reader, the transformers config a checkpoint was saved from,
packaging's version equality, ONNX Runtime running the same graph, float64 numpy, and the CPU's own
flush-to-zero behaviour.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import edited_copy, rel_err

ROOT = Path(__file__).resolve().parents[1]


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


needs_openvino = pytest.mark.skipif(not _have("openvino"), reason="openvino is not installed: pip install "
                                                                  "'mamba-deploy[openvino]'")


# ============================================================================ export/onnx_meta.py

def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint (the test's own encoder; protobuf's parser is the reference)."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tiny_model(props=(), ir_version: int = 10, model_version: int = 300):
    """A one-node ModelProto with the given metadata_props entries."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version,
                          model_version=model_version)
    for k, v in props:
        m.metadata_props.add(key=k, value=v)
    return m


def _protobuf_metadata(data: bytes) -> dict:
    """protobuf's own parse of a serialized ModelProto: its metadata_props as {key: value}."""
    import onnx

    return {p.key: p.value for p in onnx.ModelProto.FromString(data).metadata_props}


def test_metadata_scan_follows_every_varint_and_fixed_width_field(tmp_path):
    """read_metadata skips ModelProto's other fields by their wire type. The files it was tested
    on all had ir_version 8, a one-byte varint that happens to parse as a key too, and no varint
    with a 0x80 byte: a scan that did not skip a varint's value, or stopped a varint at 0x80, or
    skipped fixed64 / fixed32 fields by the other's width, read those files right and these wrong
    (a silently empty result means the runners' weight-type check is skipped). Reference:
    protobuf's own parser."""
    from mamba_deploy.export.onnx_meta import WEIGHTS_KEY, read_metadata

    props = [(WEIGHTS_KEY, "fp16"), ("k" * 128, "v" * 128), ("last", "x" * 16384)]  # lengths 0x80 0x01, 0x80 0x80 0x01
    base = _tiny_model(props).SerializeToString()  # ir_version 10, model_version 300 (a 2-byte varint)
    entry = b"\x0a" + _varint(5) + b"after" + b"\x12" + _varint(3) + b"yes"  # StringStringEntryProto
    unknown = (_varint(99 << 3 | 1) + (0x8080808080808080).to_bytes(8, "little")  # fixed64, an unknown field
               + _varint(100 << 3 | 5) + (0x80808080).to_bytes(4, "little"))  # fixed32
    cases = {"varints": base, "fixed": base + unknown + _varint(14 << 3 | 2) + _varint(len(entry)) + entry}
    for name, data in cases.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        want = _protobuf_metadata(data)
        assert want[WEIGHTS_KEY] == "fp16" and len(want) == len(props) + (name == "fixed"), (name, want)
        assert read_metadata(path) == want, name


def test_metadata_scan_of_a_file_protobuf_refuses_is_empty(tmp_path):
    """A model.onnx cut short inside its last metadata entry, or one with bytes after its fields
    that are no field (wire type 7): protobuf refuses both, and the scan must give {} (a file it
    cannot follow), not the entries read before the damage or a cut entry with a shortened value."""
    import google.protobuf.message

    from mamba_deploy.export.onnx_meta import read_metadata

    data = _tiny_model([("mamba_deploy.weights", "fp32"), ("note", "n" * 40)]).SerializeToString()
    assert data.endswith(b"n" * 40)  # the entry is the file's last field
    for name, bad in (("cut", data[:-5]), ("junk", data + _varint(3 << 3 | 7) + b"\0" * 8)):
        with pytest.raises(google.protobuf.message.DecodeError):
            _protobuf_metadata(bad)
        (tmp_path / f"{name}.onnx").write_bytes(bad)
        assert read_metadata(tmp_path / f"{name}.onnx") == {}, name


def test_set_weights_label_replaces_the_label_and_keeps_other_entries():
    """set_weights_label "replaces an earlier one": relabelling a graph must leave one label (the
    new one) and every other entry. Reference: onnxruntime's reader of the graph's metadata."""
    import onnxruntime as ort

    from mamba_deploy.export.onnx_meta import WEIGHTS_KEY, set_weights_label

    m = _tiny_model([("author", "me"), (WEIGHTS_KEY, "fp32")], ir_version=8)
    set_weights_label(m, "quantized:int8")
    assert [p.key for p in m.metadata_props].count(WEIGHTS_KEY) == 1
    meta = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map == {"author": "me", WEIGHTS_KEY: "quantized:int8"}


def test_a_manifest_without_dtype_claims_fp32(onnx_export, tmp_path):
    """Manifests written before the "dtype" key meant fp32 weights. An fp32 export whose manifest
    lacks the key opens; an fp16 one is refused, since its manifest then claims fp32."""
    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners import open_runner

    for dtype in ("fp32", "fp16"):
        out = edited_copy(onnx_export("mamba", dtype)[0], tmp_path / dtype, "manifest.json")
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest.pop("dtype") == dtype and "source_weights" not in manifest and "quantization" not in manifest
        (out / "manifest.json").write_text(json.dumps(manifest))
        if dtype == "fp32":
            open_runner(out, "onnx", threads=1).close()
        else:
            with pytest.raises(ExportError, match="says the weights are 'fp32' but model.onnx was exported as 'fp16'"):
                open_runner(out, "onnx", threads=1)


# ============================================================================ runners/preflight.py

def _find_spec_without(monkeypatch, *missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))


@pytest.mark.skipif(not _have("gguf"), reason="gguf is not installed")
def test_llama_cpp_missing_suggests_the_torch_backend_for_a_gguf(monkeypatch, tmp_path):
    """llama-cpp-python missing, gguf installed: the error for a .gguf says the torch backend runs
    it (it needs only gguf). Only the negative cases (gguf missing too, a folder) were tested."""
    from mamba_deploy.errors import BackendUnavailableError
    from mamba_deploy.runners import open_runner

    _find_spec_without(monkeypatch, "llama_cpp")
    with pytest.raises(BackendUnavailableError) as e:
        open_runner(tmp_path / "m.gguf", "llama.cpp")
    msg = str(e.value)
    assert "'llama_cpp'" in msg and "--backend torch" in msg, msg


def test_tensorrt_preflight_without_a_cuda_gpu_is_unavailable(monkeypatch):
    """TensorRT's package present (a stand-in here) but no CUDA GPU: verify's preflight and
    open_runner say the backend is unavailable before anything is read."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the check passes here")
    from mamba_deploy.errors import BackendUnavailableError
    from mamba_deploy.runners.preflight import check_installed

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # found, without a spec
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU"):
        check_installed("tensorrt")


def test_preflight_of_a_hub_id_reads_nothing(monkeypatch, tmp_path):
    """A hub id's files are fetched when the runner opens it: preflight returns None for it on
    every backend (and downloads nothing: HF_HUB_OFFLINE is set for the suite)."""
    from mamba_deploy.runners.preflight import artifact_config

    monkeypatch.chdir(tmp_path)  # no local folder named like the id's org
    for backend in ("torch", "onnx"):
        assert artifact_config("some-org/some-model", backend) is None, backend


def _hf_fields(hf) -> dict:
    c = hf.config
    return dict(d_model=c.hidden_size, n_layer=c.num_hidden_layers, d_state=c.state_size, vocab_size=c.vocab_size)


def _fields(cfg) -> dict:
    return dict(d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=cfg.d_state, vocab_size=cfg.vocab_size)


@pytest.mark.skipif(not _have("gguf"), reason="gguf is not installed")
def test_preflight_reads_each_artifact_kind_its_backend_opens(hf_checkpoint, onnx_export, tiny_gguf):
    """artifact_config per backend against the transformers config the model was saved from: a
    checkpoint folder and its config.json (torch), a .gguf with --backend torch (torch reads it with
    gguf), an ONNX export folder for onnx and openvino."""
    from mamba_deploy.runners.preflight import artifact_config

    folder, hf = hf_checkpoint("mamba")
    want = _hf_fields(hf)
    cases = [(folder, "torch"), (folder / "config.json", "torch"), (tiny_gguf, "torch"),
             (onnx_export("mamba")[0], "onnx")]
    if _have("openvino") and _have("onnx"):
        cases.append((onnx_export("mamba")[0], "openvino"))
    for path, backend in cases:
        got = _fields(artifact_config(path, backend))
        want_here = dict(want, vocab_size=got["vocab_size"]) if path == tiny_gguf else want  # GGUF: padded rows
        assert got == want_here, (path, backend)


def test_openvino_preflight_without_onnx_names_it(onnx_export, monkeypatch):
    """The openvino runner reads the graph with onnx: verify's preflight with onnx missing says so
    before the reference pass (it went on, and the runner said it minutes later)."""
    from mamba_deploy.errors import BackendUnavailableError
    from mamba_deploy.runners.preflight import artifact_config

    out = onnx_export("mamba")[0]
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendUnavailableError, match="'onnx'"):
        artifact_config(out, "openvino")


def _only_tensorrt(version: str):
    """importlib.metadata.version of a machine where only the `tensorrt` distribution is installed."""
    from importlib import metadata

    def installed(name):
        if name != "tensorrt":
            raise metadata.PackageNotFoundError(name)
        return version
    return installed


def test_tensorrt_preflight_release_equality_is_packagings(tmp_path, onnx_export, monkeypatch):
    """The engine's TensorRT against the installed one compares release numbers as packaging does
    ("10.1" is "10.1.0"; "10.1.0" is not "10.1.1"); a sidecar without its manifest is the runner's
    to report (preflight returns None)."""
    from importlib import metadata

    from packaging.version import Version

    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.tensorrt import SIDECAR_FORMAT, sidecar_path
    from mamba_deploy.runners import preflight

    manifest = json.loads((onnx_export("mamba")[0] / "manifest.json").read_text())
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 100)

    def sidecar(built, with_manifest=True):
        side = {"format": SIDECAR_FORMAT, "onnx_dir": str(tmp_path), "defaults": {},
                "build": {"engine_bytes": 100, "tensorrt": built}}
        if with_manifest:
            side["manifest"] = manifest
        sidecar_path(engine).write_text(json.dumps(side))

    for built, here in [("10.1", "10.1.0"), ("10.1.0", "10.1"), ("10", "10.0.0.0"), ("10.1.0", "10.1.1"),
                        ("10.0.1", "10.1"), ("8.6.1", "8.6.10")]:
        sidecar(built)
        monkeypatch.setattr(metadata, "version", _only_tensorrt(here))
        if Version(built) == Version(here):
            assert preflight._tensorrt_config(engine).d_model == manifest["config"]["d_model"], (built, here)
        else:
            with pytest.raises(ExportError, match=f"built by TensorRT {built}, and this is TensorRT {here}"):
                preflight._tensorrt_config(engine)
    sidecar("10.1", with_manifest=False)
    monkeypatch.setattr(metadata, "version", _only_tensorrt("10.1"))
    assert preflight._tensorrt_config(engine) is None


# ============================================================================ model_card.py

def test_model_card_takes_the_data_python_and_the_notes():
    """The card's Python is the one that made the token streams (data_meta), not this one, and
    hand notes go in on their own line(s) before the closing "Measure it again" line."""
    import tempfile

    from mamba_deploy.model_card import write_model_card

    metrics = json.loads((ROOT / "models" / "demo-mamba1" / "train_log.json").read_text())
    other = "3.99.1" if not sys.version.startswith("3.99.1") else "3.98.0"
    with tempfile.TemporaryDirectory() as d:
        card = write_model_card(Path(d) / "demo-mamba1", metrics, {"python": other},
                                notes="A hand note.\nAnother line.").read_text().splitlines()
        plain = write_model_card(Path(d) / "demo-mamba1", metrics, {"python": other}).read_text().splitlines()
    assert any(f"Token streams were made with Python {other} and carried" in line for line in card)
    i = card.index("A hand note.")
    assert card[i + 1] == "Another line." and card[i + 2].startswith("Measure it again: `mamba-deploy eval")
    assert [line for line in card if line not in ("A hand note.", "Another line.")] == plain


# ============================================================================ runners/openvino_runner.py

def _log1p_graph():
    """u, v -> ((u + 1) - v, log(u + 1), log(u + 2)) with float32 initializers one = 1 and two = 2."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Add", ["u", "one"], ["s1"]), helper.make_node("Sub", ["s1", "v"], ["d"]),
             helper.make_node("Log", ["s1"], ["log1"]),
             helper.make_node("Add", ["u", "two"], ["s2"]), helper.make_node("Log", ["s2"], ["log2"])]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None]) for n in ("u", "v", "d", "log1", "log2")]
    inits = [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in (("one", 1), ("two", 2))]
    m = helper.make_model(helper.make_graph(nodes, "g", vi[:2], vi[2:], inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_log1p_rewrite_touches_only_log_of_u_plus_one_and_its_minus_one():
    """accurate_log1p rewrites Log(u + 1) and the export's (u + 1) - 1 correction. A Sub of another
    value from u + 1, or a Log of u + 2, must keep its value: a rewrite keyed on any Sub (u + 1) -
    v, or on any float32 scalar as "one", changed them. Reference: float64 numpy, graph run by
    ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    from mamba_deploy.runners.openvino_runner import accurate_log1p

    m = _log1p_graph()
    assert accurate_log1p(m.graph) == 1  # log(u + 1) only
    onnx.checker.check_model(m, full_check=True)
    u = np.array([-0.05, 1e-4, 0.03, 0.5, 3.0], np.float32)
    v = np.array([0.25, -1.0, 2.0, 0.5, -3.0], np.float32)
    d, log1, log2 = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"u": u, "v": v})
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    np.testing.assert_allclose(d, u64 + 1 - v64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(log1, np.log1p(u64), rtol=1e-6)
    np.testing.assert_allclose(log2, np.log(u64 + 2), rtol=1e-6)


def test_missing_devices_reads_a_batch_devices_parenthesised_size():
    """"BATCH:GPU(4)" (the docstring's own example) runs on GPU: the "(4)" is the batch size, not
    part of the device name."""
    from mamba_deploy.runners.openvino_runner import missing_devices

    assert missing_devices("BATCH:CPU(4)", ["CPU"]) == []
    assert missing_devices("BATCH:GPU(4)", ["CPU", "GPU"]) == []
    assert missing_devices("BATCH:GPU(4)", ["CPU"]) == ["GPU"]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rerecord(folder, manifest=None):
    """manifest.json with model.onnx's entry re-recorded (as for a graph edited after export)."""
    from mamba_deploy.export.onnx import file_record

    manifest = manifest or json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_record(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))


@needs_openvino
def test_openvino_load_torch_state_copies_its_source(onnx_export):
    """load_torch_state takes a copy: a caller reusing (here: zeroing) its State's tensors afterwards
    must not change the runner's state, as with ONNX Runtime. A fresh state is float32, as every
    other runner's. Reference: ONNX Runtime on the same graph, loaded from a clone."""
    from mamba_deploy.runners.onnx_runner import open_onnx
    from mamba_deploy.runners.openvino_runner import open_openvino
    from mamba_deploy.state import State

    out = onnx_export("mamba")[0]
    ovr, ort = open_openvino(out, threads=1), open_onnx(out, threads=1)
    fresh = ovr.to_torch_state(ovr.new_state(3))
    assert fresh.conv.dtype == fresh.ssm.dtype == ort.to_torch_state(ort.new_state(3)).conv.dtype == torch.float32
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(45))
    _, s = ort.prefill(ids, ort.new_state(3))
    src = ort.to_torch_state(s)
    kept = State(src.conv.clone(), src.ssm.clone())
    st = ovr.new_state(3)
    ovr.load_torch_state(st, src)
    src.conv.zero_()
    src.ssm.zero_()
    got, _ = ovr.step(torch.tensor([3, 5, 7]), st)
    ref = ort.new_state(3)
    ort.load_torch_state(ref, kept)
    want, _ = ort.step(torch.tensor([3, 5, 7]), ref)
    assert rel_err(got, want) < 1e-4
    ovr.close()
    ort.close()


@needs_openvino
def test_openvino_puts_flush_to_zero_back_after_open_and_calls(onnx_export):
    """The runner turns FTZ/DAZ off around compile and inference (ieee_denormals) and must restore
    it: a process that switched it on (torch.set_flush_denormal(True)) kept it off for good."""
    from mamba_deploy.runners.openvino_runner import open_openvino

    def ftz() -> bool:  # the CPU's own behaviour: a denormal product flushed to 0
        return bool(np.float32(1e-40) * np.float32(1.0) == 0)

    out = onnx_export("mamba")[0]
    assert not ftz()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero control")
    try:
        assert ftz()
        r = open_openvino(out, threads=1)
        assert ftz(), "open_openvino left flush-to-zero off"
        r.prefill(torch.tensor([[1, 2, 3]]), r.new_state(1))
        assert ftz(), "prefill left flush-to-zero off"
        r.close()
    finally:
        torch.set_flush_denormal(False)
    assert not ftz()


@needs_openvino
def test_openvino_refuses_a_graph_without_an_optional_inputs_default(onnx_export, tmp_path):
    """A graph whose attention_mask has no default initializer (an older or edited export) is
    refused when opened, naming the input, not with a raw KeyError at the first prefill."""
    import onnx

    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners.openvino_runner import open_openvino

    out = _copy(onnx_export("mamba")[0], tmp_path / "o")
    proto = onnx.load(str(out / "model.onnx"))
    kept = [t for t in proto.graph.initializer if t.name != "attention_mask"]
    assert len(kept) == len(proto.graph.initializer) - 1
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    onnx.save_model(proto, str(out / "model.onnx"))
    _rerecord(out)
    with pytest.raises(ExportError, match=r"no default for the optional inputs \['attention_mask'\]"):
        open_openvino(out)


@pytest.fixture
def external_export(hf_checkpoint, tmp_path, monkeypatch):
    """The tiny Mamba1 exported with its weights in model.onnx.data (as graphs above 2 GB are)."""
    import mamba_deploy.export.onnx as onnx_export_module

    monkeypatch.setattr(onnx_export_module, "EXTERNAL_DATA_BYTES", 0)
    out = onnx_export_module.export_onnx(hf_checkpoint("mamba")[0], tmp_path / "ext", validate=False)
    assert (out / "model.onnx.data").exists()
    return out


@needs_openvino
def test_openvino_full_disk_copying_an_external_data_graph_is_an_export_error(external_export, monkeypatch):
    """A full disk while the stripped graph is written beside the weights: an ExportError saying
    the folder needs room for the copy, and no partial copy left (it was a raw OSError)."""
    import errno

    import onnx

    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners.openvino_runner import open_openvino

    before = sorted(p.name for p in external_export.iterdir())

    def full(proto, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    with pytest.raises(ExportError, match="must be writable, with room for a copy of the graph"):
        open_openvino(external_export)
    assert sorted(p.name for p in external_export.iterdir()) == before


@needs_openvino
def test_openvino_refuses_a_manifest_listing_inputs_the_graph_lacks(external_export):
    """A manifest edited to another n_layer (config and inputs edited together, self-consistent):
    an ExportError naming the inputs the graph lacks (it was a raw KeyError), and the stripped
    copy of the external-data graph is gone from the folder."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.onnx import io_spec
    from mamba_deploy.runners.openvino_runner import open_openvino

    before = sorted(p.name for p in external_export.iterdir())
    manifest = json.loads((external_export / "manifest.json").read_text())
    manifest["config"]["n_layer"] += 1
    manifest.update(io_spec(MambaConfig.from_own_dict(manifest["config"])))
    (external_export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"without the inputs \['past_conv\.2', 'past_ssm\.2'\]"):
        open_openvino(external_export)
    assert sorted(p.name for p in external_export.iterdir()) == before


@needs_openvino
def test_openvino_forgotten_runner_removes_its_stripped_graph(external_export):
    """A runner of an external-data graph that is never closed removes its temporary copy when it
    is garbage-collected (only close() did)."""
    import gc

    from mamba_deploy.runners.openvino_runner import open_openvino

    r = open_openvino(external_export, threads=1)
    tmp = r._tmpfile
    assert tmp is not None and tmp.exists()
    del r
    gc.collect()
    assert not tmp.exists()


@needs_openvino
def test_openvino_graph_it_cannot_read_is_an_export_error(onnx_export, tmp_path):
    """A valid ONNX graph with an operator OpenVINO does not know: ExportError naming the file (it
    was OpenVINO's raw RuntimeError)."""
    import onnx

    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners.openvino_runner import open_openvino

    out = _copy(onnx_export("mamba")[0], tmp_path / "o")
    proto = onnx.load(str(out / "model.onnx"))
    node = next(n for n in proto.graph.node if n.op_type not in ("Constant", "If"))
    node.op_type = "NoSuchOperator"
    onnx.save_model(proto, str(out / "model.onnx"))
    _rerecord(out)
    with pytest.raises(ExportError, match="OpenVINO cannot read .*model.onnx"):
        open_openvino(out)


@needs_openvino
def test_openvino_check_hash_hashes_the_external_weights(external_export):
    """check_hash=True hashes every listed file: model.onnx.data with one byte changed (same size)
    is refused, as ONNX Runtime's runner refuses it; without check_hash only sizes are compared."""
    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners.onnx_runner import open_onnx
    from mamba_deploy.runners.openvino_runner import open_openvino

    data = external_export / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    for opener in (open_onnx, open_openvino):
        with pytest.raises(ExportError, match=r"model\.onnx\.data does not match manifest\.json"):
            opener(external_export, check_hash=True)
    open_openvino(external_export, threads=1).close()


@needs_openvino
@pytest.mark.parametrize("device", ["AUTO:CPU", "HETERO:CPU"])
def test_openvino_virtual_devices_keep_a_level_0_quantized_graph_at_fp32(hf_checkpoint, tmp_path_factory, device):
    """OpenVINO's CPU plugin rounds MatMulNBits activations to int8 unless its dynamic quantization
    is switched off; a virtual device forwards the switch to the CPU. Asked whether AUTO / HETERO
    themselves list it, the answer is no, and the graph ran 2.5e-2 from the quantized model where
    plain CPU is 7e-7. Reference: the quantized torch model."""
    import warnings

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.quant.quantizer import quantize, save_quantized
    from mamba_deploy.runners.openvino_runner import open_openvino

    tmp = tmp_path_factory.mktemp(f"ov_q_{device.replace(':', '_')}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_quantized(quantize(load_model(hf_checkpoint("mamba2")[0]), "int8"), tmp / "q")
        out = export_onnx(tmp / "q", tmp / "onnx", accuracy_level=0, validate=False)
    model = load_model(tmp / "q")
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids, model.new_state(2)).logits
    with open_openvino(out, device=device, threads=1) as r:
        got, _ = r.prefill(ids, r.new_state(2))
    assert rel_err(got, want) < 1e-4, device
