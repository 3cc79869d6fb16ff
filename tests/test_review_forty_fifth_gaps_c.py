"""Mutation-testing round (review 45, part C): TensorRT engine build (export/tensorrt.py) and the
token cache (data.load_split). Each test pins behaviour a single-line change of the source could
break without any earlier test failing.

TensorRT is not installable here: build_engine is driven against a stand-in that records the calls
TensorRT 10's documented Python API receives (Builder.create_network(flags), OnnxParser.parse(model,
path), IOptimizationProfile.set_shape(name, min, opt, max) / set_shape_input, BuilderConfig.set_flag
/ set_memory_pool_limit(pool, bytes), build_serialized_network -> IHostMemory or None). Expected
values come from build_engine's documented contract and from the ONNX export read with onnx itself
(graph input shapes, initializers), never from the code under test. CPU only, no network."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from mamba_deploy.errors import ExportError
from trt_standin import RecordingTensorRT

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture
def fake_trt(monkeypatch):
    """fake_trt(**kw) -> RecordingTensorRT installed as `tensorrt` (and a fresh process logger)."""
    from mamba_deploy.export import tensorrt as trtmod

    monkeypatch.setattr(trtmod, "_LOGGER", [])

    def install(**kw):
        fake = RecordingTensorRT(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
        return fake

    return install


@pytest.fixture(scope="module")
def export(onnx_export):
    return onnx_export("mamba2")[0]


def _graph_inputs(folder):
    """{input name: [dims, None where symbolic]} of model.onnx, read with onnx."""
    import onnx

    m = onnx.load(str(folder / "model.onnx"))
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in m.graph.input}


def _initializer(folder, name):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "model.onnx"))
    return next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)


# ----------------------------------------------------------------------------- the optimization profile

def test_profile_covers_documented_ranges_for_every_input(export, tmp_path, fake_trt):
    """build_engine's docstring: batch 1..max_batch and seq 1..max_seq, optimized for opt_batch x
    opt_seq; state inputs take their static dims (model.onnx's own input shapes) with the same
    batch range. num_logits_to_keep is a shape tensor whose values must cover the export's default
    (its initializer, 0 = all logits) and every count up to max_seq (TensorRT refuses a value
    outside the profile at run time)."""
    from mamba_deploy.export.tensorrt import build_engine

    fake = fake_trt()
    build_engine(export, tmp_path / "m.engine", max_batch=4, max_seq=64, opt_batch=2, opt_seq=8)
    shapes, values = fake.rec["shapes"], fake.rec["values"]
    graph = _graph_inputs(export)
    assert set(shapes) == set(graph)
    for name in ("input_ids", "attention_mask"):
        assert shapes[name] == ((1, 1), (2, 8), (4, 64)), name
    states = [n for n in graph if n.startswith("past_")]
    assert states
    for name in states:
        rest = tuple(graph[name][1:])
        assert None not in rest
        assert shapes[name] == ((1, *rest), (2, *rest), (4, *rest)), name
    assert shapes["num_logits_to_keep"] == ((1,), (1,), (1,))
    (lo,), _, (hi,) = values["num_logits_to_keep"]
    default = int(_initializer(export, "num_logits_to_keep")[0])
    assert lo <= default <= hi and lo <= 1 and hi >= 64, values


def test_default_opt_seq_is_a_quarter_of_max_seq_and_opt_may_equal_max(export, tmp_path, fake_trt):
    """Docstring / --max-seq help: "tuned for N/4" when opt_seq is not given; opt_batch equal to
    max_batch is within 1..max_batch and must be accepted."""
    from mamba_deploy.export.tensorrt import build_engine

    fake = fake_trt()
    build_engine(export, tmp_path / "a.engine", max_batch=4, max_seq=64)
    assert fake.rec["shapes"]["input_ids"] == ((1, 1), (1, 16), (4, 64))
    fake = fake_trt()
    build_engine(export, tmp_path / "b.engine", max_batch=3, max_seq=40, opt_batch=3, opt_seq=40)
    assert fake.rec["shapes"]["input_ids"] == ((1, 1), (3, 40), (3, 40))
    with pytest.raises(ExportError, match="exceed"):
        build_engine(export, tmp_path / "c.engine", max_batch=3, max_seq=40, opt_batch=4)


def test_a_profile_tensorrt_refuses_is_a_typed_error_naming_the_input(export, tmp_path, fake_trt):
    """IOptimizationProfile.set_shape's bad arguments are a RuntimeError of the bindings; the
    build must say which input (ExportError), not leave a bare RuntimeError or any file."""
    from mamba_deploy.export.tensorrt import build_engine

    fake_trt(refuse_shape_of="past_ssm.1")
    with pytest.raises(ExportError, match="past_ssm.1"):
        build_engine(export, tmp_path / "m.engine", max_batch=2, max_seq=32)
    assert list(tmp_path.iterdir()) == []


def test_logits_limit_is_fewer_than_2_31_elements(export, tmp_path, fake_trt):
    """TensorRT tensors hold fewer than 2**31 elements (the comment in build_engine): logits of
    max_batch x max_seq x vocab == 2**31 exactly are over the limit, one row of positions less
    is not (vocab read from the graph's logits output)."""
    import onnx

    from mamba_deploy.export.tensorrt import build_engine

    m = onnx.load(str(export / "model.onnx"))
    vocab = next(o for o in m.graph.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    assert vocab > 0 and (2**31) % vocab == 0
    rows = 2**31 // vocab  # max_batch * max_seq
    fake = fake_trt()
    with pytest.raises(ExportError, match=r"2\*\*31"):
        build_engine(export, tmp_path / "a.engine", max_batch=rows // 65536, max_seq=65536)
    assert fake.rec["built"] == 0
    build_engine(export, tmp_path / "b.engine", max_batch=rows // 65536 - 1, max_seq=65536)
    assert fake.rec["built"] == 1


# ----------------------------------------------------------------------------- builder calls

@pytest.mark.parametrize("version,want", [("8.6.1", 1 << 3), ("10.15.1", 0)])
def test_network_is_explicit_batch_on_tensorrt_8_only(export, tmp_path, fake_trt, version, want):
    """TensorRT 8.x parses ONNX only into an explicit-batch network (create_network(1 <<
    EXPLICIT_BATCH)); in 10 the flag is deprecated and networks are always explicit-batch (0)."""
    from mamba_deploy.export.tensorrt import build_engine

    fake = fake_trt(version=version, explicit_batch=3)
    build_engine(export, tmp_path / "m.engine", max_batch=2, max_seq=32)
    assert fake.rec["network_flags"] == [want]


def test_parser_gets_the_onnx_files_path_for_external_weights(export, tmp_path, fake_trt):
    """OnnxParser.parse(model, path): the path of the model file, whose folder is where external
    weights (model.onnx.data) are resolved from."""
    from mamba_deploy.export.tensorrt import build_engine

    fake = fake_trt()
    build_engine(export, tmp_path / "m.engine", max_batch=2, max_seq=32)
    (path,) = fake.rec["parse_path"]
    assert Path(path).resolve() == (export / "model.onnx").resolve()
    assert Path(path).resolve().parent == export.resolve()


def test_fp16_sets_tensorrts_fp16_flag_and_workspace_is_in_mebibytes(export, tmp_path, fake_trt):
    """--fp16 "lets TensorRT pick half-precision kernels": BuilderFlag.FP16 is set (TF32 still
    cleared); workspace_mb is MiB, and set_memory_pool_limit takes bytes."""
    from mamba_deploy.export.tensorrt import build_engine

    fake = fake_trt()
    out = build_engine(export, tmp_path / "m.engine", fp16=True, max_batch=2, max_seq=32, workspace_mb=256)
    assert sorted(fake.rec["flags"]) == [("clear", "TF32"), ("set", "FP16")]
    assert fake.rec["pool"] == [("WORKSPACE", 256 * 1024 * 1024)]
    assert json.loads(Path(str(out) + ".json").read_text())["build"]["fp16"] is True


def test_fp16_on_a_tensorrt_without_the_flag_is_refused(export, tmp_path, fake_trt):
    """BuilderFlag.FP16 is gone in TensorRT 11 (strong typing): --fp16 must be an ExportError
    naming it, not an AttributeError, and nothing is built or written."""
    from mamba_deploy.export.tensorrt import build_engine

    fake = fake_trt(version="11.0.0", fp16_flag=False)
    with pytest.raises(ExportError, match="--fp16"):
        build_engine(export, tmp_path / "m.engine", fp16=True, max_batch=2, max_seq=32)
    assert fake.rec["built"] == 0 and list(tmp_path.iterdir()) == []
    build_engine(export, tmp_path / "m.engine", max_batch=2, max_seq=32)  # fp32 builds there


def test_a_failed_build_is_an_export_error_and_writes_nothing(export, tmp_path, fake_trt):
    """build_serialized_network returns None when TensorRT cannot build (its documented failure
    value): an ExportError, no engine and no sidecar."""
    from mamba_deploy.export.tensorrt import build_engine

    fake_trt(serialized=None)
    with pytest.raises(ExportError, match="failed to build"):
        build_engine(export, tmp_path / "m.engine", max_batch=2, max_seq=32)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- what is written

def test_sidecar_describes_the_engine_the_runner_reads(export, tmp_path, fake_trt):
    """The sidecar the runner reads (engine_and_sidecar) records the engine's size (check_engine_pair
    refuses an engine of another size), the build limits the runner uses, the export's manifest,
    and the optional inputs' defaults as model.onnx holds them."""
    from mamba_deploy.export.tensorrt import build_engine
    from mamba_deploy.runners.tensorrt_runner import check_engine_pair, engine_and_sidecar

    blob = b"\x00SERIALIZED-ENGINE\xff" * 7
    fake_trt(serialized=blob)
    out = build_engine(export, tmp_path / "m.engine", max_batch=3, max_seq=48, opt_batch=2, opt_seq=5)
    path, side = engine_and_sidecar(out)
    assert path.read_bytes() == blob
    assert side["build"]["engine_bytes"] == path.stat().st_size
    check_engine_pair(side, path.stat().st_size, path)
    with pytest.raises(ExportError):
        check_engine_pair(side, path.stat().st_size + 1, path)
    b = side["build"]
    assert (b["max_batch"], b["max_seq"], b["opt_batch"], b["opt_seq"], b["fp16"]) == (3, 48, 2, 5, False)
    assert side["manifest"] == json.loads((export / "manifest.json").read_text())
    for name in ("attention_mask", "num_logits_to_keep"):
        assert np.array_equal(np.asarray(side["defaults"][name]), _initializer(export, name)), name


def test_sidecar_is_renamed_into_place_before_the_engine(export, tmp_path, fake_trt, monkeypatch):
    """Module docstring: "The sidecar is written first, the engine renamed into place last, so an
    engine file on disk is always complete and described" (an engine without a sidecar in the
    export folder is then refused as a file of the export)."""
    from mamba_deploy.export.tensorrt import build_engine

    fake_trt()
    real, order = os.replace, []

    def replace(src, dst, *a, **k):
        order.append(Path(dst).name)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    build_engine(export, tmp_path / "m.engine", max_batch=2, max_seq=32)
    assert [n for n in order if n.startswith("m.engine")] == ["m.engine.json", "m.engine"]


def test_an_engine_in_the_export_folder_can_be_rebuilt(export, tmp_path, fake_trt):
    """The error for OUT = model.onnx suggests writing the engine to <export>/model.engine; a second
    build there (an engine with its sidecar) must replace it, not be refused as a file of the
    export."""
    from mamba_deploy.export.tensorrt import build_engine

    folder = tmp_path / "export"
    shutil.copytree(export, folder)
    fake_trt(serialized=b"first")
    first = build_engine(folder, folder / "model.engine", max_batch=2, max_seq=32)
    assert first.read_bytes() == b"first"
    fake_trt(serialized=b"second build")
    assert build_engine(folder, folder / "model.engine", max_batch=2, max_seq=32) == first
    assert first.read_bytes() == b"second build"
    assert json.loads(Path(str(first) + ".json").read_text())["build"]["engine_bytes"] == len(b"second build")


def test_a_new_folder_path_gets_model_engine_inside(export, tmp_path, fake_trt):
    """`out_path`: "engine file, or a folder for model.engine": a path without a suffix that does
    not exist yet is a folder, and the engine is its model.engine."""
    from mamba_deploy.export.tensorrt import build_engine

    fake_trt()
    out = build_engine(export, tmp_path / "engines", max_batch=2, max_seq=32)
    assert out == tmp_path / "engines" / "model.engine" and out.is_file()
    assert (tmp_path / "engines" / "model.engine.json").is_file()


# ----------------------------------------------------------------------------- static parser check

def _model(nodes, inputs, outputs, inits=(), opset=17):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset,ok", [(8, False), (9, True), (24, True), (25, False)])
def test_opset_range_is_inclusive(opset, ok):
    """onnx-tensorrt docs/operators.md: "operators in the inclusive range of opset 9 to opset 24"."""
    from mamba_deploy.export.tensorrt import trt_parser_issues

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    issues = trt_parser_issues(_model([helper.make_node("Identity", ["x"], ["y"])], [x], [y], opset=opset))
    assert (issues == []) == ok, issues


def _if_model(cond_const: bool, same_names: bool = False, then_shape=(2, 3), else_shape=(2, 4)):
    """An If whose branches return outer initializers of the given shapes; its condition is an
    initializer (a build-time constant) or a graph input (computed at run time)."""
    inits = [helper.make_tensor(f"{tag}_v", TensorProto.FLOAT, list(shape), [0.0] * int(np.prod(shape)))
             for tag, shape in (("then", then_shape), ("else", else_shape))]

    def branch(tag, shape):
        name = "out" if same_names else f"{tag}_out"
        return helper.make_graph([helper.make_node("Identity", [f"{tag}_v"], [name])], tag, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))])

    inputs = []
    if cond_const:
        inits.append(helper.make_tensor("c", TensorProto.BOOL, [], [True]))
    else:
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    node = helper.make_node("If", ["c"], ["y"], name="if0", then_branch=branch("then", then_shape),
                            else_branch=branch("else", else_shape))
    return _model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)


def test_if_with_a_constant_condition_may_have_branches_of_other_shapes():
    """TRT_ONNX_OPS["If"]: different branch shapes are refused only when the condition is computed
    at run time; a build-time constant condition (an initializer) is fine, as is one shape."""
    from mamba_deploy.export.tensorrt import trt_parser_issues

    assert trt_parser_issues(_if_model(cond_const=True)) == []
    assert trt_parser_issues(_if_model(cond_const=False, then_shape=(2, 3), else_shape=(2, 3))) == []
    issues = trt_parser_issues(_if_model(cond_const=False))
    assert len(issues) == 1 and "computed at run time" in issues[0], issues


def test_if_branches_sharing_an_output_name_are_reported():
    """The doc's If restriction: branch outputs "must have different names"."""
    from mamba_deploy.export.tensorrt import trt_parser_issues

    issues = trt_parser_issues(_if_model(cond_const=True, same_names=True, else_shape=(2, 3)))
    assert any("both branches name an output 'out'" in s for s in issues), issues


def test_an_initializer_that_is_also_a_graph_input_is_not_a_build_time_constant():
    """An initializer listed among the graph inputs is only a default the caller may override,
    so CumSum's `axis` from it is not a build-time constant; a plain initializer is."""
    from mamba_deploy.export.tensorrt import trt_parser_issues

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    ax_in = helper.make_tensor_value_info("ax", TensorProto.INT64, [])
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3])
    ax = helper.make_tensor("ax", TensorProto.INT64, [], [1])
    node = helper.make_node("CumSum", ["x", "ax"], ["c"])
    issues = trt_parser_issues(_model([node], [x, ax_in], [out], [ax]))
    assert len(issues) == 1 and "build-time constant" in issues[0], issues
    assert trt_parser_issues(_model([node], [x], [out], [ax])) == []


def test_scan_inputs_of_an_unsupported_type_are_reported():
    """TRT_ONNX_OPS["Scan"]: FLOAT / FLOAT16 / BFLOAT16, "checked over all its inputs"; an INT64
    scan input is reported, the same Scan over FLOAT is not."""
    from mamba_deploy.export.tensorrt import trt_parser_issues

    def model(elem):
        body = helper.make_graph([helper.make_node("Identity", ["xi"], ["yi"])], "body",
                                 [helper.make_tensor_value_info("xi", elem, [3])],
                                 [helper.make_tensor_value_info("yi", elem, [3])])
        scan = helper.make_node("Scan", ["xs"], ["ys"], name="scan0", body=body, num_scan_inputs=1)
        return _model([scan], [helper.make_tensor_value_info("xs", elem, [4, 3])],
                      [helper.make_tensor_value_info("ys", elem, [4, 3])])

    issues = trt_parser_issues(model(TensorProto.INT64))
    assert any("scan0" in s and "INT64" in s for s in issues), issues
    assert trt_parser_issues(model(TensorProto.FLOAT)) == []


# ----------------------------------------------------------------------------- token cache (data.load_split)

@pytest.fixture
def two_tokenizers(tmp_path, tiny_tokenizer):
    """(tokenizer A, tokenizer B, corpus root): two tokenizers that encode the corpus differently."""
    from mamba_deploy import data

    tok_a, tok_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(MODELS / "demo-mamba2", tok_a)
    shutil.copytree(tiny_tokenizer, tok_b)
    assert data.tokenizer_digest(tok_a) != data.tokenizer_digest(tok_b)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    assert data.corpus_files("train", corpus) and data.corpus_files("val", corpus)
    return tok_a, tok_b, corpus


def _encoded(tok, split, corpus):
    """The reference: the tokenizer's own encoding of the split, no cache."""
    from mamba_deploy import data
    from mamba_deploy.tokenizer import load_tokenizer

    return data.encode_split(load_tokenizer(tok), split, corpus, progress=False)


def test_token_cache_killed_before_the_array_rename_is_encoded_again(two_tokenizers, tmp_path, monkeypatch):
    """load_split writes meta.json without the split's digest first, then renames the array, then
    writes the full meta.json. Killed at the array rename (after the first meta.json), the cache
    holds tokenizer A's array beside a meta.json naming B: loading with B must encode again, never
    return A's ids as B's."""
    from mamba_deploy import data

    tok_a, tok_b, corpus = two_tokenizers
    cache = tmp_path / "cache"
    want_a, want_b = _encoded(tok_a, "train", corpus), _encoded(tok_b, "train", corpus)
    assert not np.array_equal(want_a, want_b)
    assert np.array_equal(data.load_split(tok_a, "train", cache, root=corpus), want_a)

    @contextlib.contextmanager
    def killed_before_rename(path):
        yield tmp_path / "scratch.npy"
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "atomic_file", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        data.load_split(tok_b, "train", cache, root=corpus)
    monkeypatch.undo()
    assert np.array_equal(np.load(cache / "train.npy"), want_a)  # A's ids are still on disk
    assert np.array_equal(data.load_split(tok_b, "train", cache, root=corpus), want_b)
    assert np.array_equal(data.load_split(tok_b, "train", cache, root=corpus), want_b)  # now from the cache


@pytest.mark.parametrize("damage", ["empty", "2-d", "float"])
def test_a_cached_split_that_is_not_token_ids_is_encoded_again(two_tokenizers, tmp_path, damage):
    """_cached_split: a file that cannot be read whole (a zero-byte copy: numpy raises EOFError) or
    that holds something other than a 1-D integer array is encoded again with a warning, never
    returned and never a traceback."""
    from mamba_deploy import data

    tok, _, corpus = two_tokenizers
    cache = tmp_path / "cache"
    want = _encoded(tok, "train", corpus)
    assert np.array_equal(data.load_split(tok, "train", cache, root=corpus), want)
    arr = cache / "train.npy"
    if damage == "empty":
        arr.write_bytes(b"")
    elif damage == "2-d":
        np.save(arr, want.reshape(-1, 1))  # same count: meta's train_tokens still matches
    else:
        np.save(arr, want.astype(np.float32))
    with pytest.warns(UserWarning, match="encoding it again"):
        got = data.load_split(tok, "train", cache, root=corpus)
    assert got.ndim == 1 and np.issubdtype(got.dtype, np.integer) and np.array_equal(got, want)
    assert np.array_equal(np.load(arr), want)  # and the cache is repaired


def test_a_split_dropped_by_a_tokenizer_switch_is_encoded_without_a_warning(two_tokenizers, tmp_path):
    """Switching tokenizers drops the other split's array (never loaded for the new tokenizer); that
    missing file is an ordinary cache miss, not an unreadable cache worth a warning."""
    from mamba_deploy import data

    tok_a, tok_b, corpus = two_tokenizers
    cache = tmp_path / "cache"
    for split in ("train", "val"):
        data.load_split(tok_a, split, cache, root=corpus)
    data.load_split(tok_b, "train", cache, root=corpus)
    assert not (cache / "val.npy").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = data.load_split(tok_b, "val", cache, root=corpus)
    assert np.array_equal(got, _encoded(tok_b, "val", corpus))
