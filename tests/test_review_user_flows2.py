"""Python-API user flows that went wrong in a second review: each test makes a mistake a user of
`load_model` / `open_runner` can make and checks that it gets a typed error naming the problem
instead of a bare traceback or a silently wrong result (shipped demo models, CPU, no network)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import rel_err

from mamba_deploy import load_model
from mamba_deploy.errors import ShapeError
from mamba_deploy.runners import open_runner

REPO = Path(__file__).resolve().parents[1]
DEMO1 = REPO / "models" / "demo-mamba1"
DEMO2 = REPO / "models" / "demo-mamba2"
BACKENDS = ["torch", "onnx", "openvino", "llama.cpp"]
NEEDS = {"onnx": "onnxruntime", "openvino": "openvino", "llama.cpp": "llama_cpp"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(backend, demo) -> path of that demo model in the backend's format."""
    tmp = tmp_path_factory.mktemp("flows2")
    paths = {("torch", 1): DEMO1, ("torch", 2): DEMO2}
    for n, demo in ((1, DEMO1), (2, DEMO2)):
        try:
            from mamba_deploy.export.onnx import export_onnx

            paths["onnx", n] = paths["openvino", n] = export_onnx(demo, tmp / f"onnx{n}")
        except ImportError:
            pass
        try:
            from mamba_deploy.export.gguf import export_gguf

            paths["llama.cpp", n] = export_gguf(demo, tmp / f"m{n}.gguf", outtype="f32")
        except ImportError:
            pass
    return paths


def _open(artifacts, backend, n=2):
    if backend in NEEDS:
        pytest.importorskip(NEEDS[backend])
    return open_runner(artifacts[backend, n], backend)


# ----------------------------------------------------------------------------- the model itself

def test_model_call_refuses_the_masks_every_runner_refuses():
    """`model(ids, attention_mask=...)` took any mask: right padding, 2s and padding on a state
    that already held tokens all ran and returned logits that are not the prompt's (the Runners
    refused each of them)."""
    model = load_model(DEMO2)
    ids = torch.tensor([[5, 9, 4, 7]])
    with pytest.raises(ShapeError, match="left padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ShapeError, match="0 .padding. and 1"):
        model(ids, attention_mask=torch.tensor([[1, 1, 2, 2]]))
    used = model(ids).state
    with pytest.raises(ShapeError, match="already holds tokens"):
        model(ids, state=used, attention_mask=torch.tensor([[0, 1, 1, 1]]))
    # what stays allowed: left padding on a fresh state equals the unpadded prompt
    padded = model(torch.tensor([[0, 0, 9, 4], [5, 9, 4, 7]]), attention_mask=[[0, 0, 1, 1], [1, 1, 1, 1]])
    alone = model(torch.tensor([[9, 4]]))
    assert rel_err(padded.logits[0, -1], alone.logits[0, -1]) < 1e-4


def test_model_state_that_is_not_a_state_is_named():
    model = load_model(DEMO2)
    for call in (lambda: model(torch.tensor([[5, 9]]), state=(1, 2)), lambda: model.step(torch.tensor([5]), None)):
        with pytest.raises(ShapeError, match="not a State; create it with model.new_state"):
            call()


# ----------------------------------------------------------------------------- runners

@pytest.mark.parametrize("backend", BACKENDS)
def test_new_state_refuses_a_batch_that_is_not_a_count(artifacts, backend):
    """new_state(-1) was a RuntimeError / ValueError from torch or numpy (llama.cpp: an empty state),
    new_state(1.5) / new_state("2") a TypeError."""
    r = _open(artifacts, backend)
    try:
        for bad in (-1, 1.5, "2", True):
            with pytest.raises(ShapeError, match=f"batch must be an integer >= 0.*got {bad!r}"):
                r.new_state(bad)
        assert r.prefill(torch.tensor([[5, 9]]), r.new_state(1))[0].shape == (1, 2, r.vocab_size)
    finally:
        r.close()
    with pytest.raises(ShapeError, match="batch must be an integer"):
        load_model(DEMO2).new_state(-2)


@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
def test_state_of_another_models_runner_is_refused(artifacts, backend):
    """An ONNX Runtime state made by the runner of another model reached ORT (a bare
    RuntimeError about `past_conv.0`), and `to_torch_state` read it back as if it were this model's
    (OpenVINO: a numpy ValueError)."""
    r, other = _open(artifacts, backend, 2), _open(artifacts, backend, 1)
    try:
        st = other.new_state(2)
        other.prefill(torch.tensor([[5, 9], [4, 7]]), st)  # a state that holds tokens, as a user's would
        for call in (lambda: r.prefill(torch.tensor([[5, 9], [4, 7]]), st), lambda: r.step(torch.tensor([5, 9]), st),
                     lambda: r.to_torch_state(st)):
            with pytest.raises(ShapeError, match="expected|another model"):
                call()
    finally:
        r.close()
        other.close()


def test_llamacpp_state_of_another_runner_is_refused(artifacts):
    """A llama.cpp state holds sequence ids of its runner's context; another runner took them as
    its own and silently continued whichever of its sequences had those ids."""
    pytest.importorskip("llama_cpp")
    a, b = _open(artifacts, "llama.cpp"), _open(artifacts, "llama.cpp")
    try:
        sa, sb = a.new_state(1), b.new_state(1)
        a.prefill(torch.tensor([[5, 9, 4]]), sa)
        b.prefill(torch.tensor([[7, 7, 7]]), sb)
        with pytest.raises(ShapeError, match="made by another runner"):
            b.step(torch.tensor([3]), sa)
        with pytest.raises(ShapeError, match="made by another runner"):
            b.to_torch_state(sa)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_torch_state_of_something_else_is_a_typed_error(artifacts, backend):
    r = _open(artifacts, backend)
    try:
        for bad in (None, (1, 2)):
            with pytest.raises(ShapeError, match="create it with runner.new_state"):
                r.to_torch_state(bad)
    finally:
        r.close()
