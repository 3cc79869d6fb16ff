"""Every "needs package X" error names the mamba-deploy extra that installs X (from the one table
in mamba_deploy/extras.py), and that table agrees with pyproject.toml's extras.

A missing package is simulated with `sys.modules[name] = None`, which makes `import name` raise
ModuleNotFoundError as on an install without that extra."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from mamba_deploy.cli import main
from mamba_deploy.errors import BackendUnavailableError, ModelNotFoundError
from mamba_deploy.extras import PACKAGES, install_hint

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "models" / "demo-mamba1")


def _extras() -> dict[str, set[str]]:
    """pyproject.toml's extras -> the normalized names of the packages each installs."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {extra: {_normalize(re.match(r"[A-Za-z0-9._-]+", req).group(0)) for req in reqs}
            for extra, reqs in project["optional-dependencies"].items()}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


# ----------------------------------------------------------------------------- the table

@pytest.mark.parametrize("module", sorted(m for m, p in PACKAGES.items() if p.extra))
def test_each_extra_in_the_table_installs_its_package(module):
    package = PACKAGES[module]
    extras = _extras()
    assert package.extra in extras, f"extras.py names the extra {package.extra!r}, which pyproject.toml lacks"
    assert _normalize(package.pip) in extras[package.extra], \
        f"pyproject.toml's extra {package.extra!r} does not install {package.pip!r}"


def test_every_user_facing_extra_is_named_by_some_hint():
    named = {p.extra for p in PACKAGES.values()}
    assert sorted(set(_extras()) - named - {"dev"}) == []


def test_install_hint_wording():
    assert install_hint("onnxruntime") == "pip install 'mamba-deploy[onnx]' (or pip install onnxruntime)"
    assert install_hint("onnxruntime.capi") == install_hint("onnxruntime")  # ModuleNotFoundError.name of a submodule
    assert install_hint("llama_cpp") == "pip install 'mamba-deploy[llama]' (or pip install llama-cpp-python)"
    assert install_hint("openvino") == "pip install 'mamba-deploy[openvino]' (or pip install openvino)"
    # no extra installs TensorRT: the plain hint with what it needs, as before
    assert install_hint("tensorrt") == "pip install tensorrt (needs an NVIDIA GPU with a matching CUDA driver)"
    assert install_hint("huggingface_hub") == "pip install huggingface_hub"  # not in the table: a plain pip install


# ----------------------------------------------------------------------------- each site that says it

def _open_onnx():
    from mamba_deploy.runners.onnx_runner import open_onnx

    open_onnx("no-such-folder")


def _open_openvino():
    from mamba_deploy.runners.openvino_runner import open_openvino

    open_openvino("no-such-folder")


def _llamacpp_runner():
    from mamba_deploy.runners.llamacpp_runner import _lib

    _lib()


def _gguf_kquant():
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import _llamacpp_quantizer

    _llamacpp_quantizer("q4_k_m")


@pytest.mark.parametrize("missing, call, extra", [
    ("onnxruntime", _open_onnx, "onnx"),
    ("openvino", _open_openvino, "openvino"),
    ("llama_cpp", _llamacpp_runner, "llama"),
    ("llama_cpp", _gguf_kquant, "llama"),
], ids=["onnx-runner", "openvino-runner", "llamacpp-runner", "gguf-kquant"])
def test_missing_package_error_names_the_extra(missing, call, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(BackendUnavailableError) as e:
        call()
    message = str(e.value)
    assert f"pip install 'mamba-deploy[{extra}]'" in message and f"pip install {PACKAGES[missing].pip}" in message


def test_openvino_without_onnx_names_the_onnx_extra(monkeypatch):
    pytest.importorskip("openvino")  # the onnx check comes after openvino's own
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(BackendUnavailableError, match=re.escape("pip install 'mamba-deploy[onnx]'")):
        _open_openvino()


def test_tensorrt_keeps_its_hint_without_an_extra(monkeypatch):
    from mamba_deploy.export.tensorrt import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt") as e:
        import_tensorrt()
    assert "mamba-deploy[" not in str(e.value)


def test_open_runner_names_the_extra_of_a_runner_dependency(tmp_path, monkeypatch):
    """A runner module that imports its package at module level: open_runner's ModuleNotFoundError
    branch names the package and its extra."""
    from mamba_deploy.runners import BACKENDS, open_runner

    (tmp_path / "_needs_openvino_runner.py").write_text("import openvino\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BACKENDS, "openvino", ("_needs_openvino_runner", "open"))
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailableError, match=r"needs the package 'openvino'.*mamba-deploy\[openvino\]"):
        open_runner(tmp_path, "openvino")


def test_tokenizer_without_transformers_says_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "vocab.json").write_text("{}")  # no tokenizer.json: transformers would build it
    monkeypatch.setitem(sys.modules, "transformers", None)
    from mamba_deploy.tokenizer import load_tokenizer

    with pytest.raises(ModelNotFoundError, match="pip install transformers"):
        load_tokenizer(tmp_path)


def test_cli_prints_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["generate", DEMO, "--backend", "openvino", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'mamba-deploy[openvino]'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- only the extra a verb needs

def test_onnx_export_and_convert_need_no_gguf_package(tmp_path, monkeypatch):
    """`export onnx` and `convert` of a checkpoint that is not a GGUF work without the gguf package
    (an install with only the `onnx` extra): they imported the GGUF reader to label a GGUF source's
    weight type, and failed with "No module named 'gguf'" before exporting anything. The export is
    checked against onnxruntime by its own validation (on by default)."""
    pytest.importorskip("onnxruntime")
    for name in [m for m in sys.modules if m == "gguf" or m.startswith(("gguf.", "mamba_deploy.export.gguf"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["export", "onnx", DEMO, str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert main(["convert", DEMO, str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
