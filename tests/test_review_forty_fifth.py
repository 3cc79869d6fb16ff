"""Forty-fifth session: `serve --host` checks made before the model loads, and `verify` sizes
checked before allocating (tests/test_cli.py holds the verify ones)."""

from __future__ import annotations

import pytest

from mamba_deploy.cli import main
from mamba_deploy.errors import ConfigError
from mamba_deploy.serve_http import check_can_listen


@pytest.fixture
def no_model_load(monkeypatch):
    """Make reaching the model load visible: it is what the early checks exist to spare."""
    import mamba_deploy.runners as runners

    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("open_runner reached: the host should have been refused before the load")

    monkeypatch.setattr(runners, "open_runner", refuse)
    return calls


@pytest.mark.parametrize("host,says", [
    ("", "is empty, which would listen on every interface"),
    ("   ", "is empty, which would listen on every interface"),
    ("::1", "is an IPv6 address, and the server listens on IPv4 only"),
    ("[::1]", "is an IPv6 address, and the server listens on IPv4 only"),
])
def test_a_bad_host_is_refused_before_the_model_loads(host, says, no_model_load, capsys):
    assert main(["serve", "no-such-model-folder", "--backend", "torch", "--host", host, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert says in err and "127.0.0.1" in err, err
    assert no_model_load == []


def test_check_can_listen_takes_the_hosts_the_server_takes():
    check_can_listen("127.0.0.1", 0)
    check_can_listen("localhost", 0)
    for host in ("", "::1", None):
        with pytest.raises(ConfigError, match="host"):
            check_can_listen(host, 0)


def test_a_constant_node_is_a_supported_build_time_constant_for_tensorrt():
    """onnx-tensorrt's operator list has Constant, and the check treats a Constant's output as a
    build-time constant (an If on it may have branches of other shapes); a graph with one was
    reported as using an unsupported op, which made that rule dead code."""
    import numpy as np
    from onnx import TensorProto, helper

    from mamba_deploy.export.tensorrt import trt_parser_issues

    def branch(tag, shape):
        v = helper.make_tensor(f"{tag}_v", TensorProto.FLOAT, list(shape), [0.0] * int(np.prod(shape)))
        return helper.make_graph([helper.make_node("Constant", [], [f"{tag}_out"], value=v)], tag, [],
                                 [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, list(shape))])

    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("cv", TensorProto.BOOL, [], [True]))
    node = helper.make_node("If", ["c"], ["y"], name="if0", then_branch=branch("then", (2, 3)),
                            else_branch=branch("else", (2, 4)))
    graph = helper.make_graph([cond, node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert trt_parser_issues(model) == []
    # the same If on a condition computed at run time is what TensorRT before 10.11 refuses
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    del model.graph.node[0]
    issues = trt_parser_issues(model)
    assert len(issues) == 1 and "computed at run time" in issues[0], issues


def test_an_upper_case_gguf_name_opens_everywhere_a_gguf_does(ckpt, tmp_path, capsys):
    """`MODEL.GGUF` (llama.cpp and Ollama read it): every verb took the suffix case-sensitively,
    so load_model called it "a file; pass the checkpoint folder or a .gguf file" while the
    llama.cpp preflight advised `--backend torch` for it. Reference: transformers on the same
    checkpoint, and the same file under its lower-case name."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from conftest import HAVE_LLAMA, rel_err
    from mamba_deploy import load_model
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.runners import guess_backend, open_runner

    src = ckpt("mamba")[0]
    upper = tmp_path / "TINY.GGUF"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_gguf(src, upper)  # the output's suffix in any case
    assert upper.is_file() and guess_backend(upper) == "llama.cpp"
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(ids).logits
        assert rel_err(load_model(upper)(ids).logits, want) < 1e-4
    with open_runner(upper, "torch") as r:
        logits, _ = r.prefill(ids, r.new_state(2))
    assert rel_err(logits[..., :128], want) < 1e-4
    if HAVE_LLAMA:
        with open_runner(upper) as r:  # llama.cpp, guessed from the name
            logits, _ = r.prefill(ids[:1], r.new_state(1))
        assert rel_err(logits[..., :128], want[:1]) < 1e-4
    capsys.readouterr()
    assert main(["inspect", str(upper), "--json"]) == 0
    shown_upper = capsys.readouterr().out
    lower = tmp_path / "tiny.gguf"
    shutil.copy(upper, lower)
    assert main(["inspect", str(lower), "--json"]) == 0
    assert shown_upper.replace("TINY.GGUF", "tiny.gguf") == capsys.readouterr().out


def test_resume_with_moments_of_another_shape_is_a_typed_error_before_any_step(tmp_path, fake_data):
    """torch's Optimizer.load_state_dict takes an AdamW state whose exp_avg / exp_avg_sq have
    another shape than their parameter (a hand-edited or mixed-up train_state.pt); the resumed run
    then died in its first opt.step with a bare RuntimeError. It is now the CheckpointError the
    other foreign optimizer states get, before anything trains or is saved."""
    import torch
    from test_review_forty_fifth_cov_c import _train_args

    from mamba_deploy import train
    from mamba_deploy.errors import CheckpointError

    train.train(_train_args(tmp_path))
    state_path = tmp_path / "work" / "train_state.pt"
    st = torch.load(state_path, weights_only=False)
    first = next(iter(st["opt"]["state"].values()))
    first["exp_avg"], first["exp_avg_sq"] = torch.zeros(3, 5), torch.zeros(3, 5)
    torch.save(st, state_path)
    before = state_path.read_bytes(), (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="holds an optimizer or data-order state this run cannot take") as e:
        train.train(_train_args(tmp_path, steps=4, resume=True))
    assert "of shape (3, 5) belongs to a parameter of shape" in str(e.value)
    assert (state_path.read_bytes(), (tmp_path / "out" / "model.safetensors").read_bytes()) == before


def test_a_missing_package_before_any_verb_names_the_program_once(capsys):
    """A ModuleNotFoundError for an optional package raised while the command line is read (no
    verb yet) said "`mamba-deploy mamba-deploy` needs the package ..."."""
    def build():
        raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    assert main([], build=build) == 2
    err = capsys.readouterr().err
    assert "`mamba-deploy` needs the package 'onnx'" in err and "mamba-deploy mamba-deploy" not in err, err


def test_stdout_to_devnull_leaks_no_descriptor_when_stdout_has_none(capsys):
    """cli._stdout_to_devnull opened /dev/null before asking stdout for its descriptor, so a
    stdout without one (pytest's capture, an in-process caller's StringIO) left the opened
    descriptor behind on every failed write."""
    import os

    from mamba_deploy import cli

    fds = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        cli._stdout_to_devnull()
    assert set(os.listdir("/proc/self/fd")) == fds
