"""Findings of the thirty-fifth session's review of the ONNX Runtime / OpenVINO runners and
`bench`; each test fails on the code before its fix."""

from __future__ import annotations

import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

from mamba_deploy.errors import ConfigError, RunnerClosedError, ShapeError


def test_a_backend_runtime_error_keeps_the_other_targets_and_the_rows_before_it(onnx_export, hf_checkpoint,
                                                                                 monkeypatch):
    """ONNX Runtime and OpenVINO raise their own errors (RuntimeError, ORT's Fail) when a run
    fails, e.g. out of memory at a large batch; bench caught only typed errors, so one target's
    failure ended the whole run and nothing was written."""
    from mamba_deploy.bench import run_bench
    from mamba_deploy.runners.onnx_runner import OnnxRunner

    out = onnx_export("mamba")[0]
    real = OnnxRunner._run

    def fails_at_batch_2(self, ids, state, *a, **k):
        if ids.shape[0] == 2:
            raise RuntimeError("Error in execution: Failed to allocate memory for requested buffer")
        return real(self, ids, state, *a, **k)

    monkeypatch.setattr(OnnxRunner, "_run", fails_at_batch_2)
    data = run_bench([(str(out), "onnx"), (str(hf_checkpoint("mamba")[0]), "torch")], [1, 2], [4], gen_len=2,
                     warmup=0, repeats=1, progress=False)
    onnx_err = data["targets"][0]["error"]
    assert onnx_err and "Failed to allocate" in onnx_err and data["targets"][1]["error"] is None
    rows = [(r["backend"], r["batch"]) for r in data["results"]]
    assert rows == [("onnx", 1), ("torch", 1), ("torch", 2)]


def test_bench_passes_device_to_openvino(onnx_export, tmp_path):
    """--device was refused for an OpenVINO-only bench ("applies to the torch, openvino, tensorrt
    backends only; no target runs on the torch backend (openvino)"), and in a run with a torch
    target it was silently dropped for the OpenVINO one."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.cli import main

    out = onnx_export("mamba")[0]
    args = ["bench", str(out), "--backends", "openvino", "--device", "CPU", "--batch", "1", "--prompt-len", "3",
            "--gen-len", "1", "--warmup", "0", "--repeats", "1", "--quiet", "--out", str(tmp_path / "b")]
    assert main(args) == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["targets"][0]["device"] == "CPU" and data["targets"][0]["error"] is None
    # a flag OpenVINO does not take is still refused when no target runs on torch
    assert main(args[:-2] + ["--dtype", "bf16", "--out", str(tmp_path / "c")]) == 2


def test_targets_of_the_same_name_are_told_apart_in_the_table(onnx_export, tmp_path):
    """Two exports in folders of one name (a/model, b/model) were both labelled `model`, and
    their plot lines merged into one."""
    from mamba_deploy.bench import markdown_table, run_bench

    out = onnx_export("mamba")[0]
    for d in ("a", "b"):
        shutil.copytree(out, tmp_path / d / "model")
    data = run_bench([(str(tmp_path / d / "model"), "onnx") for d in ("a", "b")], [1], [3], gen_len=1, warmup=0,
                     repeats=1, progress=False)
    table = markdown_table(data)
    assert "| a/model (onnx) |" in table and "| b/model (onnx) |" in table


def _state_feeds(runner, ids, **extra):
    from mamba_deploy.export.onnx_meta import state_names
    from mamba_deploy.state import State

    arrays = [np.zeros(s, np.float32) for s in State.layer_shapes(runner.config, ids.shape[0])]
    return {"input_ids": ids, **dict(zip(state_names(runner.n_layer), arrays)), **extra}


@pytest.mark.parametrize("ids, extra, says", [
    (np.array([[1.0, 2.0]]), {}, "is float64, the graph takes int64"),
    (np.array([[1, 2]], np.int32), {}, "is int32, the graph takes int64"),
    (np.array([[-5]]), {}, "token id -5 outside the vocabulary"),  # Gather wrapped it to another token
    (np.array([[1, 2, 3]]), {"attention_mask": np.array([[1, 0, 1]])}, "rows must be left padding"),
    (torch.tensor([[1, 2]]), {}, "run() takes numpy arrays"),
])
def test_onnx_run_checks_its_feeds_as_prefill_does(onnx_export, ids, extra, says):
    """OnnxRunner.run checked only shapes: other dtypes came back as ORT's InvalidArgument, a
    negative id ran as another token, a mask with a hole ran."""
    from mamba_deploy.runners.onnx_runner import open_onnx

    runner = open_onnx(onnx_export("mamba")[0])
    with pytest.raises(ShapeError, match=says.replace("(", r"\(").replace(")", r"\)")):
        runner.run(_state_feeds(runner, ids, **extra))
    good = runner.run(_state_feeds(runner, np.array([[1, 2, 3]])))
    assert good["logits"].shape[:2] == (1, 3)


def test_closing_an_openvino_runner_while_a_call_waits_says_it_is_closed(onnx_export):
    """A call waiting for the infer request's lock when close() ran found the request gone
    (AttributeError: 'NoneType' object has no attribute 'infer')."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.runners.openvino_runner import open_openvino

    runner = open_openvino(onnx_export("mamba")[0])
    state = runner.new_state(1)
    got = []

    def call():
        try:
            runner.prefill(torch.tensor([[1, 2]]), state)
            got.append("ran")
        except Exception as e:  # noqa: BLE001
            got.append(type(e))

    with runner.call_lock:  # another call is running
        t = threading.Thread(target=call)
        t.start()
        t.join(0.5)  # now waiting for the lock, past the closed check at the method's entry
        runner.close()
    t.join(30)
    assert got == [RunnerClosedError]


def test_openvino_says_when_it_runs_another_precision(onnx_export):
    """precision='f16' on a CPU without fp16 arithmetic compiled to bf16 without a word."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.runners.openvino_runner import open_openvino

    out = onnx_export("mamba")[0]
    for precision in ("f32", "bf16", "f16"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            runner = open_openvino(out, precision=precision)
        ran = runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # OpenVINO's own report
        said = [str(x.message) for x in w if "runs precision" in str(x.message)]
        assert bool(said) == (ran != precision), (precision, ran, said)
        assert not said or f"as {ran}" in said[0]
        runner.close()


def test_openvino_properties_it_cannot_take_are_a_config_error_naming_them(onnx_export):
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.runners.openvino_runner import open_openvino

    out = onnx_export("mamba")[0]
    with pytest.raises(ConfigError, match="properties must be a dict"):
        open_openvino(out, properties=["INFERENCE_NUM_THREADS"])
    with pytest.raises(ConfigError, match=r"(?s)with properties \{'NOT_A_PROPERTY': 1\}.*leave them out"):
        open_openvino(out, properties={"NOT_A_PROPERTY": 1})


def test_load_torch_state_names_the_source_rows(onnx_export):
    """A source state of another batch was reported as 'ids have batch 3', with no ids in the call."""
    from mamba_deploy.runners.onnx_runner import open_onnx
    from mamba_deploy.state import State

    runner = open_onnx(onnx_export("mamba")[0])
    src = State.from_layers([torch.zeros(s) for s in State.layer_shapes(runner.config, 3)])
    with pytest.raises(ShapeError, match="the source state's rows have batch 3 but the state was made for batch 2"):
        runner.load_torch_state(runner.new_state(2), src)
