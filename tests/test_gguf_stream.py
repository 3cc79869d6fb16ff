"""GGUF export streams its tensors: the header, metadata and tensor infos are written from the
tensors' shapes and types, then each tensor is converted only as it is written.

References: `gguf.quants.quantize` / `astype` applied here to each float32 tensor (the file must
hold exactly those bytes), the `gguf` package's own non-streaming writer (`add_tensor` for all,
then `write_tensors_to_file`, through conftest.rewrite_gguf: the streamed file must equal its
re-write byte for byte, so header, alignment and padding are the standard writer's), and
tracemalloc for the memory held while writing.
"""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from conftest import random_lm, rewrite_gguf
from mamba_deploy.config import MambaConfig
from mamba_deploy.export.gguf import export_gguf
from mamba_deploy.export.gguf_tables import TENSORS

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType


def _expected_type(gname: str, shape, outtype):
    """llama.cpp's converter rule, spelled out: norms, 1-D tensors, anything not a `.weight`
    (biases, ssm_a, ssm_d) and the conv stay F32; rows a block does not divide fall back to F16."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") or "ssm_conv1d" in gname:
        return QT.F32
    want = getattr(QT, outtype.upper())
    return want if shape[-1] % gguf.GGML_QUANT_SIZES[want][0] == 0 else QT.F16


def _gguf_arrays(model):
    """gguf name -> float32 array in the GGUF layout (gguf_tables' transforms, from the weights)."""
    cfg, sd = model.config, model.state_dict()
    out = {}
    for ours, gname, to_gguf, _, arches in TENSORS:
        for bid in range(cfg.n_layer) if "{bid}" in ours else [None]:
            key = ours.format(bid=bid)
            if cfg.arch in arches and key in sd and not (key == "lm_head.weight" and cfg.tie_embeddings):
                out[gname.format(bid=bid)] = np.ascontiguousarray(to_gguf(sd[key].float().numpy(), cfg))
    return out


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])  # mamba's ssm_dt rows (4) fall back to F16
def test_streamed_file_holds_the_converted_tensors_in_the_standard_layout(ckpt, tmp_path, kind, outtype):
    from mamba_deploy import load_model

    folder, _ = ckpt(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(folder, tmp_path / "m.gguf", outtype=outtype)
    want = _gguf_arrays(load_model(folder))
    reader = gguf.GGUFReader(str(out))
    assert [t.name for t in reader.tensors] == list(want)
    types = set()
    for t in reader.tensors:
        array = want[t.name]
        qtype = _expected_type(t.name, array.shape, outtype)
        types.add(qtype)
        assert t.tensor_type == qtype, t.name
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == array.shape, t.name
        ref = array if qtype == QT.F32 else array.astype(np.float16) if qtype == QT.F16 \
            else gguf.quants.quantize(array, qtype)
        assert np.asarray(t.data).tobytes() == ref.tobytes(), t.name
    if outtype in ("q8_0", "q4_0") and kind == "mamba":
        assert types == {QT.F32, QT.F16, getattr(QT, outtype.upper())}  # the fallback case is covered
    # the gguf package's own writer (every tensor added, then written) makes the same bytes
    again = rewrite_gguf(out, tmp_path / "again.gguf")
    assert out.read_bytes() == again.read_bytes()


def _mid_model():
    """~7M parameters (f16: 14 MB); its largest tensor, in_proj, is 1M (2 MB in f16)."""
    cfg = MambaConfig(arch="mamba1", d_model=512, n_layer=4, d_state=16, d_conv=4, expand=2, vocab_size=1024,
                      pad_vocab_size_multiple=8)
    return random_lm(cfg)


def test_export_holds_one_converted_tensor_at_a_time(tiny_tokenizer, tmp_path):
    """The whole converted model used to be held until the end (writer.add_tensor for each, then
    write): a peak of numpy memory >= the f16 file. Streamed, it is about the largest tensor."""
    model = _mid_model()
    f16_bytes = 2 * model.num_parameters()
    largest = 2 * max(p.numel() for p in model.parameters())
    tracemalloc.start()
    try:
        out = export_gguf(model, tmp_path / "m.gguf", outtype="f16", tokenizer=tiny_tokenizer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.stat().st_size > f16_bytes
    assert peak < largest + f16_bytes // 4, f"peak {peak / 1e6:.1f} MB, f16 model {f16_bytes / 1e6:.1f} MB"


def test_large_model_shows_a_bar_on_stderr(ckpt, tmp_path, monkeypatch, capfd):
    import mamba_deploy.progress

    folder, _ = ckpt("mamba2_g2")
    monkeypatch.setattr(mamba_deploy.progress, "LARGE_MODEL_PARAMS", 0)
    export_gguf(folder, tmp_path / "m.gguf", outtype="f16")
    captured = capfd.readouterr()
    assert "writing GGUF" in captured.err and "writing GGUF" not in captured.out
