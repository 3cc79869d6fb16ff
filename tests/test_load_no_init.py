"""load_gguf and the quantized loader allocate the model uninitialised (built on the meta device,
then `to_empty` on the target device in the target dtype) and copy every tensor in.

Built for real, MambaLM ran the random init of every weight (seconds for billions of them) and,
for a 16-bit GGUF load, held the float32 model beside its cast. A random init on real memory is
the sign of a model built for real; the values must still be the checkpoint's (references:
transformers' weights and logits, and the quantized model as `quantize` made it in memory), and
nothing `to_empty` left as garbage may survive (every tensor compared, tying checked).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import rel_err
from mamba_deploy import load_model
from mamba_deploy.quant import quantize, save_quantized

gguf = pytest.importorskip("gguf")


@pytest.fixture
def inits(monkeypatch):
    """The device types nn.init's random fills ran on while the fixture is active (nn.Linear,
    nn.Conv1d and nn.Embedding initialise through these)."""
    seen = []

    def spy(real):
        def init(*a, **k):
            seen.append((a[0] if a else k["tensor"]).device.type)
            return real(*a, **k)
        return init

    for name in ("kaiming_uniform_", "normal_", "uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, spy(getattr(torch.nn.init, name)))
    return seen


def _ids():
    return torch.randint(0, 100, (2, 19), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "mamba2_g2"])  # tied, Falcon, untied Mamba2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_gguf_runs_no_init_and_fills_every_tensor(ckpt, tmp_path, kind, dtype, request):
    from mamba_deploy.export.gguf import export_gguf

    folder, hf = ckpt(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    seen = request.getfixturevalue("inits")  # spies on from here: the export's own model is built
    model = load_model(path, dtype=dtype)
    assert "cpu" not in seen, seen
    assert (model.lm_head.weight is model.backbone.embeddings.weight) == hf.config.tie_word_embeddings
    want, got = hf.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    eps = torch.finfo(torch.float32).eps
    for k, v in got.items():
        assert v.dtype == dtype, k
        if k.endswith("A_log"):  # stored as -exp(A_log): back within float32 rounding, then cast
            torch.testing.assert_close(v.float(), want[k], rtol=2 * eps if dtype == torch.float32 else 8e-3,
                                       atol=2 * eps, msg=k)
        else:
            assert torch.equal(v, want[k].to(dtype)), k
    if dtype == torch.float32:
        ids = _ids()
        with torch.no_grad():
            assert rel_err(model(ids).logits, hf(ids).logits) <= 1e-5


@pytest.mark.parametrize("kind,method,opts", [
    ("mamba", "int8", dict(include=("embeddings", "lm_head"))),  # tied head quantized with the embeddings
    ("mamba", "int4", dict(group_size=32)),  # tied float embeddings / head, quantized layers
    ("mamba2_g2", "int8", dict(include=("embeddings", "lm_head"))),  # untied: a quantized head of its own
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_quantized_runs_no_init_and_fills_every_tensor(hf_checkpoint, tmp_path, kind, method, opts, dtype,
                                                            request):
    folder, _ = hf_checkpoint(kind)
    made = quantize(load_model(folder, dtype=dtype), method, progress=False, **opts)
    out = save_quantized(made, tmp_path / "q")
    seen = request.getfixturevalue("inits")
    model = load_model(out, dtype=dtype)
    assert "cpu" not in seen, seen
    want, got = made.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k
    head, emb = model.lm_head, model.backbone.embeddings
    if kind == "mamba" and "include" in opts:  # one set of codes, read by both
        assert all(head._buffers[k] is emb._buffers[k] for k in head.stored())
    elif kind == "mamba":
        assert head.weight is emb.weight
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, made(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loads onto a CUDA GPU; none here (runs on the GPU machine)")
@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_loads_onto_cuda_without_init(ckpt, hf_checkpoint, tmp_path, kind, request):
    """The same two loaders with device="cuda": allocated there uninitialised, every tensor the
    file's (GGUF: transformers' weights cast to bf16; quantized: the codes `quantize` made)."""
    from mamba_deploy.export.gguf import export_gguf

    folder, hf = ckpt(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    made = quantize(load_model(hf_checkpoint(kind)[0]), "int8", progress=False, include=("embeddings", "lm_head"))
    out = save_quantized(made, tmp_path / "q")
    seen = request.getfixturevalue("inits")
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    qmodel = load_model(out, device="cuda")
    assert set(seen) <= {"meta"}, seen  # nn.init on meta tensors does nothing
    want = hf.state_dict()
    for k, v in model.state_dict().items():
        assert v.device.type == "cuda" and v.dtype == torch.bfloat16, k
        if not k.endswith("A_log"):
            assert torch.equal(v.cpu(), want[k].to(torch.bfloat16)), k
    for k, v in qmodel.state_dict().items():
        assert v.device.type == "cuda" and torch.equal(v.cpu(), made.state_dict()[k]), k
