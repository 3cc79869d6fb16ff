"""The weight type an ONNX export records in its own graph (metadata_props, under the manifest's
hash) against the one manifest.json claims, which `verify` reads for its limits: an edited
manifest is refused by every runner that opens the folder. The graph's metadata is read without
parsing the graph (export/onnx_meta.py); its reference here is onnx's own reader and writer.
"""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import edited_copy
from mamba_deploy.checkpoint import load_model
from mamba_deploy.errors import ExportError
from mamba_deploy.export import onnx as onnx_export
from mamba_deploy.export.onnx import export_onnx
from mamba_deploy.export.onnx_meta import WEIGHTS_KEY, read_metadata
from mamba_deploy.runners import open_runner


def _edited_copy(src, tmp_path, **changes):
    return edited_copy(src, tmp_path / "edited", "manifest.json", **changes)


def _recorded(folder) -> str:
    """onnx's own reader: the label in model.onnx's metadata_props."""
    props = onnx.load(str(folder / "model.onnx"), load_external_data=False).metadata_props
    return {p.key: p.value for p in props}[WEIGHTS_KEY]


@pytest.mark.parametrize("dtype,edit", [("fp32", "fp16"), ("fp16", "fp32")])
def test_an_edited_dtype_is_refused_by_every_runner(onnx_export, tmp_path, dtype, edit):
    out, _, _ = onnx_export("mamba", dtype)
    assert _recorded(out) == dtype
    open_runner(out, "onnx", threads=1).close()  # as exported: opens
    edited = _edited_copy(out, tmp_path, dtype=edit)
    backends = ["onnx"] + (["openvino"] if _have("openvino") else [])
    for backend in backends:
        with pytest.raises(ExportError, match=f"says the weights are '{edit}' but model.onnx was exported as '{dtype}'"):
            open_runner(edited, backend, threads=1)


def test_an_edited_source_weights_is_refused(onnx_export, tmp_path):
    out, _, _ = onnx_export("mamba2_g2")
    edited = _edited_copy(out, tmp_path, source_weights="q4_0")  # would loosen verify's limits to q4_0's
    with pytest.raises(ExportError, match="'q4_0' but model.onnx was exported as 'fp32'"):
        open_runner(edited, "onnx", threads=1)


def test_a_quantized_graph_records_its_method(hf_checkpoint, tmp_path):
    from mamba_deploy.quant import quantize
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx

    folder, _ = hf_checkpoint("mamba")
    out = export_quantized_onnx(quantize(load_model(folder), "int8", progress=False), tmp_path / "q",
                                validate=False, accuracy_level=0)
    assert _recorded(out) == "quantized:int8"
    open_runner(out, "onnx", threads=1).close()
    manifest = json.loads((out / "manifest.json").read_text())
    edited = _edited_copy(out, tmp_path, quantization=dict(manifest["quantization"], method="int4"))
    with pytest.raises(ExportError, match="'quantized:int4' but model.onnx was exported as 'quantized:int8'"):
        open_runner(edited, "onnx", threads=1)
    no_quant = {k: v for k, v in manifest.items() if k != "quantization"}  # the report dropped: fp32 limits
    (edited / "manifest.json").write_text(json.dumps(no_quant))
    with pytest.raises(ExportError, match="'fp32' but model.onnx was exported as 'quantized:int8'"):
        open_runner(edited, "onnx", threads=1)


def test_metadata_scan_equals_onnx_reader(hf_checkpoint, tmp_path, monkeypatch):
    """Entries written by onnx's writer, in a graph with inline weights and in one with external
    data; a graph without any; a file that is not a model."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    folder, _ = hf_checkpoint("mamba")
    ext = export_onnx(folder, tmp_path / "ext", validate=False)
    assert (ext / "model.onnx.data").exists()
    for name, save in (("inline", dict()), ("external", dict(save_as_external_data=True, location="w.data"))):
        proto = onnx.load(str(ext / "model.onnx"))
        proto.metadata_props.add(key="ünïcode", value="välue " * 300)  # a length past one varint byte
        path = tmp_path / f"{name}.onnx"
        onnx.save_model(proto, str(path), **save)
        want = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert read_metadata(path) == want and want[WEIGHTS_KEY] == "fp32", name
    del proto.metadata_props[:]
    onnx.save_model(proto, str(tmp_path / "none.onnx"))
    assert read_metadata(tmp_path / "none.onnx") == {}
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    assert read_metadata(tmp_path / "junk.onnx") == {}


def _have(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
