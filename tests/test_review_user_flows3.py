"""Python entry points called with bad arguments, found in a third review: `quantize` options,
`verify`, `make_server`, `export_onnx`. Each mistake must raise a typed error (MambaDeployError)
naming the value, never a bare traceback or a silently different run (shipped demo models, CPU)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from mamba_deploy import load_model
from mamba_deploy.errors import ConfigError, ExportError, MambaDeployError, QuantizationError
from mamba_deploy.quant import quantize

REPO = Path(__file__).resolve().parents[1]
DEMO1 = REPO / "models" / "demo-mamba1"


@pytest.fixture(scope="module")
def demo_runner():
    from mamba_deploy.runners import open_runner

    r = open_runner(DEMO1, "torch")
    yield r
    r.close()


# ----------------------------------------------------------------------------- quantize options

@pytest.mark.parametrize("method, option, value", [
    ("gptq", "damp", "abc"), ("gptq", "damp", -1.0), ("gptq", "damp", float("nan")),
    ("gptq", "block_size", "x"), ("gptq", "block_size", 0),
    ("awq", "grid", "x"), ("awq", "grid", 0), ("awq", "grid", -3),  # grid 0: no search, plain rounding
    ("smoothquant", "alpha", "x"),
    ("gptq", "act_order", "no"), ("awq", "clip", "no"), ("int4", "symmetric", "false"),  # bool("no") is True
])
def test_quantize_bad_option_value_is_typed(method, option, value):
    model = load_model(DEMO1)
    with pytest.raises(QuantizationError, match=option):
        quantize(model, method, progress=False, n_calib=1, calib_len=16, **{option: value})
    assert not getattr(model, "quantization_config", None)


def test_quantize_include_as_a_string_names_it():
    """include="embeddings" (not a list) must not be split into letters."""
    with pytest.raises(QuantizationError, match="'embeddings'"):
        quantize(load_model(DEMO1), "int8", progress=False, include="embeddings")


def test_gguf_export_of_model_quantized_in_memory_does_not_call_the_float_checkpoint_quantized(tmp_path):
    from mamba_deploy.export.gguf import export_gguf

    q = quantize(load_model(DEMO1), "int8", progress=False)
    with pytest.raises(ExportError) as e:
        export_gguf(q, tmp_path / "q.gguf")
    assert f"{DEMO1} is quantized" not in str(e.value)  # the checkpoint on disk is the float one
    assert "in memory" in str(e.value)


# ----------------------------------------------------------------------------- verify

@pytest.mark.parametrize("kwargs", [
    dict(lengths="abc"), dict(lengths=5), dict(lengths="17"), dict(batches=3),
    dict(decode_steps="2"), dict(decode_steps=1.5), dict(seed="x"),
])
def test_verify_bad_arguments_are_typed(demo_runner, kwargs):
    from mamba_deploy.verify import verify

    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        verify(demo_runner, demo_runner, progress=False, **kwargs)


@pytest.mark.parametrize("which", ["reference_runner", "artifact_runner"])
def test_verify_a_path_instead_of_a_runner_is_typed(demo_runner, which):
    from mamba_deploy.verify import verify

    args = {"reference_runner": demo_runner, "artifact_runner": demo_runner, which: str(DEMO1)}
    with pytest.raises(ConfigError, match="open_pair|open_runner"):
        verify(**args, progress=False)


def test_verify_text_ids_outside_the_vocabulary_are_typed(demo_runner):
    from mamba_deploy.verify import verify

    ids = torch.full((1, 20), demo_runner.vocab_size + 5)
    with pytest.raises(MambaDeployError, match="text_ids"):
        verify(demo_runner, demo_runner, lengths=(3,), batches=(1,), text_ids=ids, progress=False)


# ----------------------------------------------------------------------------- make_server

@pytest.mark.parametrize("kwargs", [
    dict(port="abc"), dict(port=70000), dict(port=-1), dict(max_batch="8"), dict(max_tokens_limit=2.5),
    dict(request_timeout=-1), dict(request_timeout=0), dict(host="no.such.host.invalid"),
])
def test_make_server_bad_arguments_are_typed(demo_runner, kwargs):
    from mamba_deploy.serve import make_server

    kwargs.setdefault("port", 0)
    with pytest.raises(ConfigError):
        make_server(demo_runner, **kwargs).server_close()


def test_make_server_port_in_use_is_typed(demo_runner):
    from mamba_deploy.serve import make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match=str(s.getsockname()[1])):
            make_server(demo_runner, port=s.getsockname()[1]).server_close()


@pytest.mark.parametrize("runner", [None, str(DEMO1)])
def test_make_server_needs_a_runner(runner):
    from mamba_deploy.serve import make_server

    with pytest.raises(ConfigError, match="open_runner"):
        make_server(runner, port=0)


# ----------------------------------------------------------------------------- export_onnx

@pytest.mark.parametrize("opset", ["abc", 17.9, True])
def test_export_onnx_bad_opset_is_typed_and_writes_nothing(tmp_path, opset):
    pytest.importorskip("onnx")
    from mamba_deploy.export.onnx import export_onnx

    with pytest.raises(ConfigError, match="opset"):
        export_onnx(DEMO1, tmp_path / "out", opset=opset, validate=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ids, pattern", [
    (torch.full((2, 64), 10**6), "outside the vocabulary"), (torch.full((2, 64), -1), "outside the vocabulary"),
    (torch.rand(2, 64) * 50, "integer"),  # .long() would truncate these to other tokens
])
def test_quantize_bad_calib_ids_are_typed(ids, pattern):
    with pytest.raises(QuantizationError, match=pattern):
        quantize(load_model(DEMO1), "gptq", progress=False, calib_ids=ids, calib_len=32, n_calib=2)


def test_quantize_calib_ids_as_a_list_are_ids_not_a_file_name():
    """A list of token ids is calibration data, like the LongTensor form."""
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    a = quantize(load_model(DEMO1), "gptq", progress=False, calib_ids=ids, calib_len=32, n_calib=2)
    b = quantize(load_model(DEMO1), "gptq", progress=False, calib_ids=ids.tolist(), calib_len=32, n_calib=2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_numpy_integers_are_integers_for_the_python_entry_points():
    """The typed checks added in this review take numpy integers as integers (np.arange lengths,
    a port read from a numpy config), not only Python ints."""
    import numpy as np

    from mamba_deploy.verify import _int_tuple

    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    assert _int_tuple("lengths", np.array([1, 7])) == [1, 7]
    with pytest.raises(ConfigError, match="integers only"):
        _int_tuple("lengths", [1.5])
    srv = make_server(open_runner(DEMO1, "torch"), port=np.int64(0), max_batch=np.int32(2), quiet=True,
                      request_timeout=np.float32(5))
    try:
        assert srv.server_address[1] > 0 and srv.max_batch == 2
    finally:
        srv.server_close()


def test_generate_seed_and_top_k_types_are_checked():
    """`model.generate(..., seed="a")` was torch's bare RuntimeError and top_k="5" a TypeError from
    a comparison deep in sampling; both are ConfigErrors naming the setting."""
    model = load_model(DEMO1)
    for kwargs, match in [({"seed": "a"}, "seed must be an int"), ({"seed": -1}, "seed must be an int"),
                          ({"temperature": 1.0, "top_k": "5"}, "top_k must be an int")]:
        with pytest.raises(ConfigError, match=match):
            model.generate(["def"], max_new_tokens=2, **kwargs)
    a = model.generate(["def"], max_new_tokens=4, temperature=1.0, seed=2**64 - 1)
    b = model.generate(["def"], max_new_tokens=4, temperature=1.0, seed=2**64 - 1)
    assert a.tokens == b.tokens  # the largest seed still seeds


def test_make_server_checks_its_template_and_runner_before_serving(tmp_path):
    """A chat template that does not compile surfaced at the first chat request (a 400 for every
    client), and a closed runner at the first request of any kind; both are refused up front.
    `generate --chat --chat-template FILE` checks the file the same way before the model loads."""
    from mamba_deploy.chat import ChatTemplateError
    from mamba_deploy.cli import main
    from mamba_deploy.errors import RunnerClosedError
    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    runner = open_runner(DEMO1, "torch")
    with pytest.raises(ChatTemplateError, match="does not compile.*line 1"):
        make_server(runner, port=0, quiet=True, chat_template="{% for m in messages %}{{ m['content'] }}")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages[0]['content'] ")
    assert main(["generate", str(DEMO1), "--chat", "--chat-template", str(bad), "--prompt", "x"]) == 2
    runner.close()
    with pytest.raises(RunnerClosedError, match="closed"):
        make_server(runner, port=0, quiet=True)
