"""TensorRT: engine build + runner (skipped here: TensorRT cannot be installed in this
environment), the typed error when TensorRT is missing, and a static check that every node of
our exported Mamba1 / Mamba2 graphs is one TensorRT's ONNX parser supports, against the table
recorded from onnx-tensorrt's docs/operators.md in export/tensorrt.py.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from conftest import rel_err
from mamba_deploy.checkpoint import load_model
from mamba_deploy.errors import BackendUnavailableError, ExportError, MambaDeployError
from mamba_deploy.export.onnx import ALLOWED_OPS, graph_op_types
from mamba_deploy.export.tensorrt import TRT_ONNX_OPS, build_engine, engine_graph, load_stripped_onnx, trt_parser_issues
from mamba_deploy.generation import generate
from mamba_deploy.runners import open_runner
from mamba_deploy.runners.tensorrt_runner import check_engine_pair, open_tensorrt
from mamba_deploy.runners.torch_runner import TorchRunner

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installable in this environment")
FP32_TOL = 1e-4


@pytest.fixture(scope="module")
def exported(onnx_export):
    """exported(kind, dtype) -> (onnx folder, hf folder); cached."""
    return lambda kind, dtype="fp32": onnx_export(kind, dtype)[:2]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=ids).logits.float()


# ---------------------------------------------------------------- runs everywhere

def test_missing_tensorrt_raises_typed_error(exported, tmp_path, monkeypatch):
    """With `tensorrt` unimportable, building and opening raise BackendUnavailableError (a
    MambaDeployError and an ImportError) that names `pip install tensorrt`; no file is left."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    out, _ = exported("mamba")
    engine = tmp_path / "m.engine"
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt") as e:
        build_engine(out, engine)
    assert isinstance(e.value, MambaDeployError) and isinstance(e.value, ImportError)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        open_tensorrt(engine)
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        open_runner(engine, "tensorrt")
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        open_runner(engine)  # guessed from the .engine suffix


def test_table_covers_every_op_the_exporter_may_emit():
    assert sorted(ALLOWED_OPS - set(TRT_ONNX_OPS)) == []


@pytest.mark.parametrize("kind,dtype", [("mamba", "fp32"), ("mamba2", "fp32"), ("mamba2_g2", "fp32"),
                                        ("mamba", "fp16")])
def test_engine_graph_ops_are_supported_by_tensorrt_parser(exported, kind, dtype):
    """Every op type of the graph TensorRT gets (subgraphs included) is in TensorRT's supported
    list, with a supported input type, constant inputs where the doc requires them and no If.
    The export itself has one: its condition reads the mask's values and its branches' logits
    differ in shape, which the check reports (TensorRT before 10.11 refuses it; 10.11+ cannot size
    the logits before running)."""
    out, _ = exported(kind, dtype)
    raw, _ = load_stripped_onnx(out)
    issues = trt_parser_issues(raw)
    assert len(issues) == 1 and "if_one_token (If)" in issues[0] and "computed at run time" in issues[0], issues
    proto, defaults = engine_graph(out)
    ops = graph_op_types(proto)
    assert ops - set(TRT_ONNX_OPS) == set(), f"ops TensorRT's parser lacks: {sorted(ops - set(TRT_ONNX_OPS))}"
    assert "If" not in ops
    if kind == "mamba":
        assert "Scan" in ops  # the Mamba1 prefill loop: the op most likely to be unsupported
    assert trt_parser_issues(proto) == []
    assert set(defaults) == {"attention_mask", "num_logits_to_keep"}


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "mamba2_g2"])
def test_engine_graph_computes_what_transformers_does(onnx_export, kind):
    """The graph TensorRT gets (the any-length network in place of the If) run by ONNX Runtime:
    prefill of 1 and 7 tokens at batch 1 and 3 then 8 one-token steps (which the export itself
    takes through its one-token branch), and a left-padded batch, against transformers (fp32,
    1e-4 relative)."""
    import onnx
    import onnxruntime as ort

    out, _, hf = onnx_export(kind)
    proto, _ = engine_graph(out)
    onnx.load_external_data_for_model(proto, str(out))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    states = [i.name for i in sess.get_inputs() if i.name.startswith("past_")]

    def run(ids, state, mask=None):
        feed = {"input_ids": ids.numpy(), "attention_mask": (torch.ones_like(ids) if mask is None else mask).numpy(),
                "num_logits_to_keep": np.zeros(1, np.int64), **dict(zip(states, state))}
        logits, *present = sess.run(None, feed)
        return torch.from_numpy(logits), present

    def fresh(batch):
        return [np.zeros([batch, *i.shape[1:]], np.float32) for i in sess.get_inputs() if i.name in states]

    gen = torch.Generator().manual_seed(11)
    for batch in (1, 3):
        for length in (1, 7):
            ids = torch.randint(0, 128, (batch, length + 8), generator=gen)
            want = hf_logits(hf, ids)
            got, st = run(ids[:, :length], fresh(batch))
            errs = [rel_err(got, want[:, :length])]
            for t in range(length, length + 8):
                got, st = run(ids[:, t:t + 1], st)
                errs.append(rel_err(got[:, 0], want[:, t]))
            assert max(errs) < FP32_TOL, (kind, batch, length, errs)
    ids = torch.randint(0, 128, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1: a 5-token prompt, left-padded
    got, _ = run(ids, fresh(2), mask)
    assert rel_err(got[0, -1], hf_logits(hf, ids[:1])[0, -1]) < FP32_TOL
    assert rel_err(got[1, -1], hf_logits(hf, ids[1:, 4:])[0, -1]) < FP32_TOL


def test_parser_check_reports_what_tensorrt_rejects():
    """The checker itself: an op missing from TensorRT's list, an unsupported input type and a
    runtime `axis` where a build-time constant is required are each reported."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])
    ax = helper.make_tensor_value_info("ax", TensorProto.INT64, [])
    nodes = [helper.make_node("Det", ["x"], ["d"]),  # "Det | N" in the doc
             helper.make_node("Exp", ["i"], ["e"]),  # Exp: FP32/FP16/BF16 only (invalid ONNX too)
             helper.make_node("CumSum", ["x", "ax"], ["c"])]  # axis must be a build-time constant
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("d", "e", "c")]
    graph = helper.make_graph(nodes, "g", [x, i, ax], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    issues = trt_parser_issues(model)
    assert any("Det" in s and "not in TensorRT" in s for s in issues), issues
    assert any("Exp" in s and "INT64" in s for s in issues), issues
    assert any("CumSum" in s and "build-time constant" in s for s in issues), issues
    # the same CumSum with a constant axis passes
    ok = helper.make_graph([helper.make_node("CumSum", ["x", "axc"], ["c"])], "g", [x], [outs[2]],
                           [helper.make_tensor("axc", TensorProto.INT64, [], [1])])
    assert trt_parser_issues(helper.make_model(ok, opset_imports=[helper.make_opsetid("", 17)])) == []


# ---------------------------------------------------------------- needs TensorRT + a GPU

@pytest.fixture(scope="module")
def engine(exported, tmp_path_factory):
    cache = {}

    def make(kind):
        if kind not in cache:
            out, folder = exported(kind)
            path = build_engine(out, tmp_path_factory.mktemp(f"trt_{kind}") / "model.engine",
                                max_batch=4, max_seq=64)
            cache[kind] = (path, out, folder)
        return cache[kind]

    return make


@needs_trt
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_engine_matches_onnxruntime_and_torch(engine, kind):
    from mamba_deploy.runners.onnx_runner import open_onnx

    path, out, folder = engine(kind)
    trt_runner, ort, model = open_tensorrt(path), open_onnx(out), load_model(folder)
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 3):
        for length in (1, 7, 40):
            ids = torch.randint(0, 128, (batch, length + 8), generator=gen)
            with torch.inference_mode():
                want = model(ids, model.new_state(batch)).logits
            st, so = trt_runner.new_state(batch), ort.new_state(batch)
            got, st = trt_runner.prefill(ids[:, :length], st)
            ref, so = ort.prefill(ids[:, :length], so)
            errs = [rel_err(got, ref), rel_err(got, want[:, :length])]
            for t in range(length, length + 8):
                got, st = trt_runner.step(ids[:, t], st)
                ref, so = ort.step(ids[:, t], so)
                errs += [rel_err(got, ref), rel_err(got, want[:, t])]
            assert max(errs) < FP32_TOL, (kind, batch, length, errs)


@needs_trt
def test_engine_generate_matches_torch_greedy(engine):
    path, _, folder = engine("mamba2")
    prompts = [[5, 9, 17, 33, 2, 8, 1], [7, 3], [1] * 12]
    mine = generate(open_tensorrt(path), prompts, max_new_tokens=12)
    assert mine.tokens == generate(TorchRunner(load_model(folder)), prompts, max_new_tokens=12).tokens


@needs_trt
def test_prompt_longer_than_max_seq_is_prefilled_in_chunks(engine):
    from mamba_deploy.runners.onnx_runner import open_onnx

    path, out, _ = engine("mamba")
    ids = torch.randint(0, 128, (2, 150), generator=torch.Generator().manual_seed(6))  # max_seq 64
    r, ort = open_tensorrt(path), open_onnx(out)
    got, _ = r.prefill(ids, r.new_state(2))
    ref, _ = ort.prefill(ids, ort.new_state(2))
    assert rel_err(got, ref) < FP32_TOL


def test_engine_and_sidecar_from_different_builds_are_refused(tmp_path):
    """build_engine renames the sidecar, then the engine, into place: a build stopped between the
    two leaves a new sidecar beside an old engine. The sidecar records the engine's size and the
    runner refuses a pair that disagrees (this check runs without TensorRT); sidecars written
    before the size was recorded still load."""
    engine = tmp_path / "model.engine"
    with pytest.raises(ExportError, match=r"model.engine has 100 bytes but its sidecar .* describes an engine of 120"):
        check_engine_pair({"build": {"engine_bytes": 120}}, 100, engine)
    check_engine_pair({"build": {"engine_bytes": 100}}, 100, engine)
    check_engine_pair({"build": {}}, 100, engine)
