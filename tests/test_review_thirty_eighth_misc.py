"""The thirty-eighth session's CLI consistency fixes: every verb that takes --dtype /
--state-dtype takes the same spellings (fp32 / float32, bf16 / bfloat16, fp16 / float16); serve
and bench took only the short ones, --state-dtype only those anywhere."""

from __future__ import annotations

import pytest
import torch

from mamba_deploy.cli import build_parser, runner_options

LONG = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("verb", [["serve", "m"], ["bench", "m"], ["generate", "m", "--prompt", "x"],
                                  ["eval", "m", "--corpus", "stdlib-val"]])
@pytest.mark.parametrize("name", sorted(LONG))
def test_every_verb_takes_the_long_dtype_spellings(verb, name):
    args = build_parser().parse_args(verb + ["--dtype", name, "--state-dtype", name])
    if verb[0] == "bench":  # bench opens each artifact itself; the parse is what differed
        assert args.dtype == name and args.state_dtype == name
        return
    args.backend = "torch"
    opts = runner_options(args)
    assert opts["dtype"] == LONG[name] and opts["state_dtype"] == LONG[name]


def test_the_readme_runner_example_runs_as_written(tmp_path, monkeypatch):
    """README's open_runner block, pasted after the export command its first line names: it used
    names nothing defined and a (b, 1) next_ids that step refuses."""
    import re
    from pathlib import Path

    from mamba_deploy.cli import main

    repo = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (repo / "README.md").read_text(), re.S)
    block = next(b for b in blocks if 'open_runner("out/onnx"' in b)
    command = re.match(r"# after: mamba-deploy (.*)\n", block).group(1).split()
    monkeypatch.chdir(tmp_path)
    command[command.index("models/demo-mamba2")] = str(repo / "models" / "demo-mamba2")
    assert main(command) == 0
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert tuple(scope["logits"].shape) == (2, scope["r"].vocab_size)
    assert scope["next_ids"].shape == (2,)


@pytest.mark.parametrize("quantized", [False, True])
def test_a_checkpoint_saved_and_loaded_under_a_name_that_is_not_utf8(hf_checkpoint, tmp_path, quantized):
    """safetensors takes UTF-8 names only: save_checkpoint / load_model (and a quantized folder's
    code digest) failed under b'mod\\xe9l' with a UnicodeEncodeError. Logits against transformers."""
    import os

    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint

    src, hf_model = hf_checkpoint("mamba2")
    folder = tmp_path / os.fsdecode(b"mod\xe9l")
    model = load_model(src)
    if quantized:
        from mamba_deploy.quant import quantize, save_quantized

        model = quantize(model, "int8")
        save_quantized(model, folder)
    else:
        save_checkpoint(model, folder)
    again = load_model(folder)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        got = again(ids).logits
        want = model(ids).logits if quantized else hf_model.eval()(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


def test_a_backend_missing_two_packages_names_both_in_one_command(monkeypatch, tmp_path):
    """A user who installed the one package named was told of the next on the next run."""
    import importlib.util

    from mamba_deploy.errors import BackendUnavailableError
    from mamba_deploy.runners import open_runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gguf", "llama_cpp") else real(name, *a))
    with pytest.raises(BackendUnavailableError) as e:
        open_runner(tmp_path / "m.gguf")
    msg = str(e.value)
    assert "'llama_cpp' and 'gguf'" in msg and "pip install 'mamba-deploy[llama,gguf]'" in msg, msg
    assert "pip install llama-cpp-python gguf" in msg
    assert "--backend torch" not in msg  # which reads a .gguf with the gguf package: missing too


@pytest.mark.parametrize("kind, backend, guessed", [("onnx", "torch", "onnx"), ("gguf", "onnx", "llama.cpp"),
                                                    ("folder", "llama.cpp", "torch")])
def test_a_named_backend_that_cannot_open_the_path_says_which_would(tmp_path, kind, backend, guessed):
    import importlib.util
    from pathlib import Path

    from mamba_deploy.cli import main
    from mamba_deploy.errors import MambaDeployError
    from mamba_deploy.runners import open_runner

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    path = {"folder": demo, "onnx": tmp_path / "onnx", "gguf": tmp_path / "m.gguf"}[kind]
    if kind != "folder":
        assert main(["export", kind, str(demo), str(path)] + (["--no-validate"] if kind == "onnx" else [])) == 0
    with pytest.raises(MambaDeployError) as e:
        open_runner(path, backend)
    assert f"(the {backend} backend was asked for; this path opens with the {guessed} backend when none is " \
           f"named: leave --backend out, or give --backend {guessed})" in str(e.value)
    if guessed != "llama.cpp" or importlib.util.find_spec("llama_cpp") is not None:
        open_runner(path).close()  # and the guess opens it (llama.cpp: where llama-cpp-python is installed)


@pytest.mark.parametrize("validate", [True, False])
def test_export_onnx_of_a_large_model_shows_its_stages(hf_checkpoint, tmp_path, monkeypatch, capsys, validate):
    """A multi-gigabyte export ran for minutes with nothing on the terminal until validation's report."""
    import mamba_deploy.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "progress_wanted", lambda model: True)  # as for a model past 50M parameters
    folder, _ = hf_checkpoint("mamba")
    onnx_export.export_onnx(folder, tmp_path / "out", validate=validate)
    err = capsys.readouterr().err
    names = (["reference outputs"] if validate else []) + ["building the graph", "saving", "checking the graph"]
    assert "export onnx" in err and all(n in err for n in names), err
    assert err.index(names[0]) < err.index(names[-1])
    assert (tmp_path / "out" / "model.onnx").is_file()


@pytest.mark.parametrize("under", ["afile/x.gguf", "afile/sub/x.gguf"])
def test_an_output_under_a_file_says_that_file_is_no_folder(tmp_path, under):
    """mkdir's "File exists" was all the message said."""
    from mamba_deploy.atomic import prepare_output_file
    from mamba_deploy.errors import OutputPathError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match=r"afile is a file, not a folder; choose an output path under a folder"):
        prepare_output_file(tmp_path / under)


# ----------------------------------------------------------------------------- review of the above

def test_the_onnx_backend_runs_without_the_onnx_package(tmp_path, monkeypatch):
    """The ONNX runner imports onnxruntime only; preflight listed `onnx` too and refused."""
    import importlib.util
    from pathlib import Path

    from mamba_deploy.cli import main
    from mamba_deploy.runners import open_runner

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    assert main(["export", "onnx", str(demo), str(tmp_path / "o"), "--no-validate"]) == 0
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with open_runner(tmp_path / "o") as r:
        logits, _ = r.prefill(torch.tensor([[1, 2, 3]]), r.new_state(1))
    assert logits.shape[-1] == r.vocab_size


def test_only_gguf_missing_does_not_suggest_the_backend_that_needs_it(tmp_path, monkeypatch):
    import importlib.util

    from mamba_deploy.errors import BackendUnavailableError
    from mamba_deploy.runners import open_runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(BackendUnavailableError) as e:
        open_runner(tmp_path / "m.gguf")
    assert "'gguf'" in str(e.value) and "--backend torch" not in str(e.value)


def test_a_stand_in_module_without_a_spec_counts_as_installed(monkeypatch):
    import sys
    import types

    from mamba_deploy.runners.preflight import check_installed

    monkeypatch.setitem(sys.modules, "onnxruntime", types.ModuleType("onnxruntime"))  # __spec__ None
    check_installed("onnx")  # find_spec raised ValueError here


def test_a_broken_checkpoint_keeps_its_cause_and_gets_no_backend_hint(tmp_path):
    from pathlib import Path

    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import CheckpointError, ModelNotFoundError
    from mamba_deploy.runners import open_runner

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    from mamba_deploy import load_model

    save_checkpoint(load_model(demo), tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError) as e:
        open_runner(tmp_path / "c", "torch")
    assert e.value.__cause__ is not e.value and "backend was asked for" not in str(e.value)
    with pytest.raises(ModelNotFoundError) as e:  # a missing file is no wrong backend
        open_runner(tmp_path / "missing.gguf", "torch")
    assert "backend was asked for" not in str(e.value)


def test_a_gguf_exported_into_a_fifo_is_the_file_a_regular_export_writes(tmp_path):
    """gguf's writer seeks back to fill its header: a pipe took part of a file, then 'Illegal seek'."""
    import os
    import threading
    import warnings
    from pathlib import Path

    from mamba_deploy.cli import main

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    assert main(["export", "gguf", str(demo), str(tmp_path / "plain.gguf")]) == 0
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "pipe.gguf exists (0.0 MiB); it is replaced"
            assert main(["export", "gguf", str(demo), str(fifo)]) == 0
    finally:
        if reader.is_alive():  # the export failed before opening the pipe: let the reader go
            with open(fifo, "wb"):
                pass
        reader.join(30)
    assert got and got[0] == (tmp_path / "plain.gguf").read_bytes()


def test_a_mamba_ssm_bin_under_a_name_that_is_not_utf8_loads(hf_checkpoint, tmp_path):
    import os

    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint

    src, hf_model = hf_checkpoint("mamba")
    folder = tmp_path / os.fsdecode(b"ssm-\xe9")
    save_checkpoint(load_model(src), folder, fmt="mamba_ssm")
    assert (folder / "pytorch_model.bin").is_file()
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 7))
    with torch.no_grad():
        got, want = load_model(folder)(ids).logits, hf_model.eval()(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_named_backend_that_is_missing_and_wrong_for_the_path_says_both(monkeypatch):
    """--backend llama.cpp on a checkpoint folder where llama-cpp-python is missing: the install
    hint said to run "the .gguf" with --backend torch (there is no .gguf), nothing of the folder."""
    import importlib.util
    from pathlib import Path

    from mamba_deploy.errors import BackendUnavailableError
    from mamba_deploy.runners import open_runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    with pytest.raises(BackendUnavailableError) as e:
        open_runner(demo, "llama.cpp")
    msg = str(e.value)
    assert "'llama_cpp'" in msg and ".gguf" not in msg and "opens with the torch backend" in msg, msg
