"""Fixes of the twenty-fifth session; each test fails on the code before its fix.

GGUF metadata carried through re-export and convert (general.*, add_eos_token, eot / eom), and
generation ending at a GGUF's end-of-generation tokens as llama.cpp's own does.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import edited_copy, rewrite_gguf
from mamba_deploy.export.gguf import export_gguf

from test_gguf import HAVE_LLAMA, needs_llama

gguf = pytest.importorskip("gguf")


S, U32, BOOL, ARR = (gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL,
                     gguf.GGUFValueType.ARRAY)


def with_keys(src, dst, **extra):
    """A copy of the GGUF `src` with extra metadata keys (name -> (value, type[, sub_type]))."""
    return rewrite_gguf(src, dst, edit=extra)


LLAMA_KEYS = {
    "general.license": ("apache-2.0", S),
    "general.author": ("someone", S),
    "general.tags": (["text-generation", "mamba"], ARR, S),
    "tokenizer.ggml.eot_token_id": (5, U32),
    "tokenizer.ggml.add_eos_token": (True, BOOL),
    "tokenizer.chat_template.tool_use": ("{{ messages }}", S),
}


def test_requantizing_a_gguf_keeps_its_general_and_tokenizer_keys(tiny_gguf, tmp_path):
    src = with_keys(tiny_gguf, tmp_path / "src.gguf", **LLAMA_KEYS)
    out = export_gguf(src, tmp_path / "re.gguf", outtype="q8_0")
    r = gguf.GGUFReader(str(out))
    for key, (value, *_) in LLAMA_KEYS.items():
        assert r.get_field(key) is not None, key
        assert r.get_field(key).contents() == value, key
    # what describes the new file is the new file's own
    assert r.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert r.get_field("general.name").contents() == gguf.GGUFReader(str(src)).get_field("general.name").contents()


def test_add_eos_token_is_encoded_as_llamacpp_does_and_kept_by_convert(tiny_gguf, tmp_path):
    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.runners import open_runner

    src = with_keys(tiny_gguf, tmp_path / "eos.gguf", **{"tokenizer.ggml.add_eos_token": (True, BOOL)})
    eos = gguf.GGUFReader(str(src)).get_field("tokenizer.ggml.eos_token_id").contents()
    ids = open_runner(src, backend="torch").tokenizer.encode("the quick brown fox")
    assert ids[-1] == eos and len(ids) > 1
    if HAVE_LLAMA:  # llama.cpp's own tokenizer of the same file: the reference
        assert open_runner(src, backend="llama.cpp").tokenizer.encode("the quick brown fox") == ids
    out = save_checkpoint(load_model(src), tmp_path / "folder")
    assert json.loads((out / "tokenizer_config.json").read_text())["add_eos_token"] is True
    assert open_runner(out, backend="torch").tokenizer.encode("the quick brown fox") == ids


def _sampled(path, backend, prompt="the quick brown", n=12):
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    runner = open_runner(path, backend=backend)
    # sampled (seeded), as a random model's greedy text repeats one token
    return generate(runner, prompt, max_new_tokens=n, temperature=1.0, seed=3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("llama.cpp", marks=needs_llama)])
def test_generation_ends_at_a_gguf_eot_token(tiny_gguf, tmp_path, backend):
    toks = _sampled(tiny_gguf, "torch").tokens[0]
    eos = gguf.GGUFReader(str(tiny_gguf)).get_field("tokenizer.ggml.eos_token_id").contents()
    at = next(i for i, t in enumerate(toks) if t != eos and t not in toks[:i] and i >= 2)
    src = with_keys(tiny_gguf, tmp_path / "eot.gguf", **{"tokenizer.ggml.eot_token_id": (toks[at], U32)})
    ended = _sampled(src, backend)
    assert ended.tokens[0] == toks[:at], (ended.tokens[0], toks, at)  # the stop token itself is not kept


def test_end_ids_of_a_tokenizer_without_a_gguf_are_its_eos():
    from mamba_deploy.generation import end_ids

    class Tok:
        eos_token_id = 7

    assert end_ids(Tok()) == [7]
    Tok.end_token_ids = (9, 7)
    assert end_ids(Tok()) == [7, 9]
    assert torch.tensor(end_ids(Tok())).tolist() == [7, 9]


# ----------------------------------------------------------------------------- consumed states

def _runner(backend, ckpt, onnx_export):
    from mamba_deploy.runners import open_runner

    if backend == "onnx":
        return open_runner(onnx_export("mamba2")[0], backend="onnx")
    folder, _ = ckpt("mamba2")
    if backend == "cuda":  # the CUDA-graph runner: a consumed state's bucket is the returned state's
        return open_runner(folder, backend="torch", device="cuda")
    return open_runner(folder, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "onnx", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA-graph runner needs a CUDA GPU"))])
def test_a_state_gather_states_consumed_is_refused(backend, ckpt, onnx_export):
    from mamba_deploy.errors import ShapeError

    runner = _runner(backend, ckpt, onnx_export)
    a, b = runner.new_state(2), runner.new_state(1)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    runner.prefill(ids, a)
    runner.prefill(ids[:1], b)
    joined = runner.gather_states([(a, [1]), (b, None)])
    for old, n in ((a, 2), (b, 1)):
        with pytest.raises(ShapeError, match="consumed by gather_states"):
            runner.step(torch.tensor([1] * n), old)
        with pytest.raises(ShapeError, match="consumed by gather_states"):
            runner.gather_states([(old, None)])
    logits, _ = runner.step(torch.tensor([1, 2]), joined)  # the returned one runs
    assert logits.shape[0] == 2


@needs_llama
def test_a_llamacpp_state_gather_states_consumed_is_refused(tiny_gguf):
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.runners import open_runner

    runner = open_runner(tiny_gguf, backend="llama.cpp")
    a = runner.new_state(2)
    runner.prefill(torch.tensor([[3, 4], [5, 6]]), a)
    joined = runner.gather_states([(a, [0])])
    with pytest.raises(ShapeError, match="consumed by gather_states"):
        runner.to_torch_state(a)
    assert runner.step(torch.tensor([1]), joined)[0].shape[0] == 1


@needs_llama
def test_a_llamacpp_load_refusal_says_what_llamacpp_said(tiny_gguf, tmp_path):
    from mamba_deploy.errors import CheckpointError
    from mamba_deploy.runners import open_runner

    bad = rewrite_gguf(tiny_gguf, tmp_path / "noctx.gguf", drop=lambda k: k == "mamba.context_length")
    with pytest.raises(CheckpointError, match=r"llama\.cpp: .*key not found.*mamba\.context_length"):
        open_runner(bad, backend="llama.cpp")
    runner = open_runner(tiny_gguf, backend="llama.cpp")  # the log callback is llama-cpp-python's again
    assert runner.prefill(torch.tensor([[3, 4]]), runner.new_state(1))[0].shape[0] == 1


def test_a_mamba1_with_expand_3_is_refused_by_gguf_export_as_llamacpp_refuses_it(tiny_tokenizer, tmp_path):
    from conftest import build_hf_model
    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError, ExportError
    from mamba_deploy.export.gguf import write_gguf
    from mamba_deploy.export.gguf_tables import OUTTYPES
    from mamba_deploy.export.gguf_vocab import find_tokenizer_file, read_vocab

    hf = build_hf_model("mamba", expand=3)
    hf.save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="expansion factor other than 2"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", tokenizer=tiny_tokenizer)
    assert not (tmp_path / "m.gguf").exists()
    if HAVE_LLAMA:  # the file the check keeps from being written: llama.cpp itself refuses it
        from mamba_deploy.runners import open_runner

        model = load_model(tmp_path / "m")
        vocab = read_vocab(find_tokenizer_file(tiny_tokenizer, None), model.config.padded_vocab_size)
        write_gguf(model, vocab, tmp_path / "forced.gguf", *OUTTYPES["f32"])
        with pytest.raises(CheckpointError, match="expansion factor of 2"):
            open_runner(tmp_path / "forced.gguf", backend="llama.cpp")


def test_device_reaches_the_openvino_backend_from_the_cli(ckpt, tmp_path, capsys):
    """--device was refused for every backend but torch, though OpenVINO and TensorRT take one."""
    pytest.importorskip("openvino")
    from mamba_deploy.cli import main
    from mamba_deploy.export.onnx import export_onnx

    folder = str(export_onnx(ckpt("mamba")[0], tmp_path / "onnx"))  # with the tokenizer beside it
    run = ["generate", folder, "--backend", "openvino", "--prompt", "hello", "--max-new-tokens", "2", "--json"]
    assert main([*run, "--device", "CPU"]) == 0
    capsys.readouterr()
    assert main([*run, "--device", "npu9"]) == 2  # passed through: OpenVINO's own device list refuses it
    assert "OpenVINO device 'NPU9' is not available" in capsys.readouterr().err
    assert main([*run[:3], "onnx", *run[4:], "--device", "cuda"]) == 2  # ONNX Runtime takes none
    err = capsys.readouterr().err
    assert "--device cuda applies to the torch, openvino, tensorrt backends only" in err


LATE_SIGNAL = """
import os, signal, sys, time
from mamba_deploy.entry import _exit_on_signals

class Late:  # collected at module teardown, after Python put its signal handlers back to default
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

keep = Late()
_exit_on_signals(3)
sys.exit(3)
"""


def test_a_signal_late_in_the_shutdown_keeps_the_commands_exit_status(tmp_path):
    """A Ctrl-C after a complete write, late in the interpreter's shutdown, killed the process
    (exit 130) instead of ending it with the command's status, as entry.py promises."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "late.py"
    script.write_text(LATE_SIGNAL)
    src = str(Path(__file__).resolve().parents[1] / "src")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": src})
    assert res.returncode == 3, (res.returncode, res.stderr[-500:])


# ----------------------------------------------------------------------------- bad inputs (review)

def _edited_config(hf_checkpoint, tmp_path, kind="mamba", **edits):
    return edited_copy(hf_checkpoint(kind)[0], tmp_path / "edited", "config.json", **edits)


@pytest.mark.parametrize("key,value", [("hidden_size", 2**64), ("state_size", 2**63), ("vocab_size", 2**40),
                                       ("eos_token_id", 2**63)])
def test_a_size_past_int32_is_a_config_error_naming_it(hf_checkpoint, tmp_path, key, value):
    from mamba_deploy import load_model
    from mamba_deploy.errors import ConfigError

    folder = _edited_config(hf_checkpoint, tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=f"{key}={value} must be an integer in"):
        load_model(folder)


def test_a_huge_pad_vocab_size_multiple_is_refused_before_any_allocation(hf_checkpoint, tmp_path):
    """mamba_ssm's config pads the vocabulary (an HF one's multiple is ignored, as transformers does)."""
    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import ConfigError

    ssm = save_checkpoint(load_model(hf_checkpoint("mamba")[0]), tmp_path / "ssm", fmt="mamba_ssm")
    folder = edited_copy(ssm, tmp_path / "edited", "config.json", pad_vocab_size_multiple=10**9)
    with pytest.raises(ConfigError, match="pad_vocab_size_multiple=1000000000 is larger than the vocabulary"):
        load_model(folder)
    ok = load_model(edited_copy(ssm, tmp_path / "ok", "config.json", pad_vocab_size_multiple=96))  # usual values load
    assert ok.config.padded_vocab_size == 192


def test_an_edited_manifest_n_layer_is_refused_at_once(onnx_export, tmp_path):
    import shutil
    import tracemalloc

    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners import open_runner

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_export("mamba")[0], folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["config"]["n_layer"] = 2_000_000  # took 61 s and 5.9 GB before its error
    (folder / "manifest.json").write_text(json.dumps(m))
    tracemalloc.start()
    with pytest.raises(ExportError, match="implies 4000000 state inputs, the manifest lists 7 inputs in all"):
        open_runner(folder, backend="onnx")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, peak


def test_a_memory_error_without_a_message_is_the_out_of_memory_line(monkeypatch, capsys):
    import mamba_deploy.cli as cli

    def no_memory(args):
        raise MemoryError()  # what a list or dict that cannot grow raises

    monkeypatch.setattr(cli, "cmd_inspect", no_memory)
    assert cli.main(["inspect", "models/demo-mamba1"]) == 2
    assert "error: out of memory in inspect: MemoryError" in capsys.readouterr().err


def test_a_corrupt_generation_config_is_an_error_naming_it(ckpt, tmp_path):
    import shutil

    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import ConfigError

    folder = save_checkpoint(load_model(ckpt("mamba")[0]), tmp_path / "ssm", fmt="mamba_ssm")
    gen = folder / "generation_config.json"
    assert json.loads(gen.read_text())  # the mamba_ssm layout keeps its token ids there only
    gen.write_text(gen.read_text()[:-5])  # truncated
    with pytest.raises(ConfigError, match="cannot read .*generation_config.json"):
        load_model(folder)
    shutil.rmtree(folder)


@pytest.mark.parametrize("name,kind", [("blk.0.ssm_in.weight", "I8"), ("token_embd.weight", "I32"),
                                       ("blk.1.ssm_out.weight", "F64")])
def test_a_gguf_tensor_of_a_non_weight_type_is_refused_before_llamacpp_sees_it(tiny_gguf, tmp_path, name, kind):
    import numpy as np

    from mamba_deploy.errors import CheckpointError
    from mamba_deploy.runners import open_runner

    t = next(t for t in gguf.GGUFReader(str(tiny_gguf)).tensors if t.name == name)
    dtype = {"I8": np.int8, "I32": np.int32, "F64": np.float64}[kind]
    bad = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf", tensors={name: np.zeros(t.data.shape, dtype)})
    for backend in ["torch"] + (["llama.cpp"] if HAVE_LLAMA else []):  # llama.cpp segfaulted or aborted
        with pytest.raises(CheckpointError, match=f"tensor {name} is stored as {kind}"):
            open_runner(bad, backend=backend)


def test_a_ctrl_c_during_an_import_is_an_interrupt_not_a_missing_package(onnx_export, monkeypatch, capsys):
    import importlib.abc
    import sys

    import mamba_deploy.cli as cli

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "onnxruntime":
                try:
                    raise KeyboardInterrupt
                except KeyboardInterrupt as e:  # as numpy / onnxruntime wrap it in their __init__
                    raise ImportError(f"import {name} failed") from e
            return None

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    assert cli.main(["generate", str(onnx_export("mamba")[0]), "--prompt", "x"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "pip install" not in err
