"""Found by the twenty-ninth session's packaging / fresh-install review: the C kernel cache on
hosts where it cannot be written, loaded or shared; optional packages missing behind the llama.cpp
backend, GGUF loading, `export gguf --help` and ONNX validation; the demo's notes; Ollama
Modelfiles for file names with spaces."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import sys
from pathlib import Path

import pytest

from mamba_deploy.errors import BackendUnavailableError
from mamba_deploy.ops import cpu_kernels


@pytest.fixture
def fresh_kernels(monkeypatch):
    """cpu_kernels._lib rebuilt under the test's environment, and forgotten after it."""
    monkeypatch.delenv("MAMBA_DEPLOY_NO_CPU_KERNELS", raising=False)
    cpu_kernels._lib.cache_clear()
    yield cpu_kernels
    cpu_kernels._lib.cache_clear()


def test_an_unusable_kernel_cache_falls_back_with_a_warning(fresh_kernels, monkeypatch, tmp_path):
    """A cache folder that cannot be made (an unwritable or read-only HOME, MAMBA_DEPLOY_CACHE
    naming a file) crashed every CPU float32 command with a traceback (FileExistsError,
    PermissionError); it now warns, names the fix and uses the references."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MAMBA_DEPLOY_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="could not build or load the CPU kernels.*set MAMBA_DEPLOY_CACHE"):
        assert fresh_kernels._lib() is None
    assert fresh_kernels.simd_level() == -1


def test_no_compiler_is_said(fresh_kernels, monkeypatch, tmp_path):
    """Without cc / gcc the references were used silently (decode about 2.4x slower)."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("MAMBA_DEPLOY_CACHE", str(tmp_path))
    monkeypatch.setattr(fresh_kernels.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no C compiler"):
        assert fresh_kernels._lib() is None


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler")
def test_cc_with_arguments_builds_a_library_other_users_can_load(fresh_kernels, monkeypatch, tmp_path):
    """$CC carrying arguments ("ccache gcc", "gcc -std=gnu11") was run as one program name; and the
    built library was mode 0711 (mkstemp's 0600 plus the linker's x bits), so another user of a
    shared MAMBA_DEPLOY_CACHE could not load it."""
    cc = shutil.which("gcc") or shutil.which("cc")
    monkeypatch.setenv("CC", f"{shlex.quote(cc)} -std=gnu11")
    monkeypatch.setenv("MAMBA_DEPLOY_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        assert fresh_kernels.simd_level() >= 0
    finally:
        os.umask(old)
    (so,) = tmp_path.glob("cpu_scan-*.so")
    mode = stat.S_IMODE(so.stat().st_mode)
    assert mode == 0o755, oct(mode)
    assert [p.name for p in tmp_path.iterdir()] == [so.name]  # no temporaries or objects left


def test_a_cc_that_cannot_run_is_said(fresh_kernels, monkeypatch, tmp_path):
    """An unbalanced quote in $CC raised ValueError from every CPU forward; a $CC naming a
    compiler that is not installed was reported as an unwritable cache folder."""
    monkeypatch.setenv("MAMBA_DEPLOY_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", 'gcc -DX="a b')
    with pytest.warns(UserWarning, match="cannot be split into a command"):
        assert fresh_kernels._lib() is None
    fresh_kernels._lib.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler-99 -O2")
    with pytest.warns(UserWarning, match="'no-such-compiler-99' \\(from \\$CC\\) is not found"):
        assert fresh_kernels._lib() is None


def test_kernel_cache_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MAMBA_DEPLOY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_kernels._cache_dir() == tmp_path / "mamba_deploy"
    monkeypatch.setenv("MAMBA_DEPLOY_CACHE", str(tmp_path / "own"))
    assert cpu_kernels._cache_dir() == tmp_path / "own"


@pytest.fixture
def without_gguf(monkeypatch):
    """`import gguf` fails, and our modules that import it are imported again."""
    monkeypatch.setitem(sys.modules, "gguf", None)
    for name in [m for m in sys.modules if m.startswith("mamba_deploy.export.gguf")]:
        monkeypatch.delitem(sys.modules, name)


def test_gguf_readers_without_the_gguf_package_say_what_to_install(without_gguf, tmp_path):
    """load_model of a .gguf and the llama.cpp runner raised a bare ModuleNotFoundError where
    the other backends raise BackendUnavailableError with the install command."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.runners import open_runner

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(BackendUnavailableError, match=r"reading a GGUF file needs the package 'gguf': pip install"):
        load_model(path)
    pytest.importorskip("llama_cpp")
    with pytest.raises(BackendUnavailableError, match=r"the llama.cpp backend needs the package 'gguf'"):
        open_runner(path, "llama.cpp")


def test_pyproject_llama_extra_brings_gguf():
    import tomllib

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("gguf") for d in extras["llama"]), extras["llama"]


@pytest.mark.parametrize("argv", [["export", "gguf", "--help"], ["export", "gguf", "-h"],
                                  ["export", "gguf", "--outtype", "q8_0", "m", "o.gguf"]])
def test_an_unavailable_verb_names_its_package_whatever_comes_first(without_gguf, argv, capsys):
    """With gguf missing, `export gguf --help` (or an option before the positionals) gave the
    top-level usage and "unrecognized arguments", not the missing package."""
    from mamba_deploy.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs the package 'gguf'" in err and "unrecognized arguments" not in err, err


def test_demo_note_for_a_missing_package_names_its_extra(tmp_path):
    from mamba_deploy.demo import run_format

    def builder(*a, **kw):
        raise ModuleNotFoundError("No module named 'onnx'", name="onnx")

    row = run_format("onnx fp32", "onnxruntime", builder, "fp32", None, tmp_path, tmp_path, None, None, None)
    assert row.status == "not available"
    assert row.notes == ["needs 'onnx': pip install 'mamba-deploy[onnx]' (or pip install onnx)"], row.notes


def test_onnx_validation_without_onnxruntime_is_refused_before_exporting(hf_checkpoint, monkeypatch, tmp_path):
    """With onnx but not onnxruntime (the openvino extra) the export failed in its validation, after
    the whole export, naming only the [onnx] extra; it is refused first and names --no-validate."""
    pytest.importorskip("onnx")
    from mamba_deploy.export.onnx import export_onnx

    folder, _ = hf_checkpoint("mamba2")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "out"
    with pytest.raises(BackendUnavailableError, match=r"ONNX Runtime, which is not installed.*--no-validate"):
        export_onnx(folder, out)
    assert not out.exists()


def test_ollama_modelfile_for_a_file_name_with_spaces(ckpt, tmp_path):
    """A GGUF named "m1 q8.gguf" got `FROM ./m1 q8.gguf` unquoted and `ollama create m1 q8`, two
    arguments, where Ollama names allow lower-case letters, digits, '.', '-' and '_'."""
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import MODELFILE_NAME, export_gguf

    src, _ = ckpt("mamba")
    out = export_gguf(src, tmp_path / "Démo M1 q8.gguf", outtype="q8_0", ollama=True)
    text = (out.parent / MODELFILE_NAME).read_text()
    assert 'FROM "./Démo M1 q8.gguf"\n' in text, text
    assert "#   ollama create d-mo-m1-q8 -f Modelfile\n" in text, text
    plain = export_gguf(src, tmp_path / "plain" / "m1.gguf", outtype="q8_0", ollama=True)
    assert "FROM ./m1.gguf\n" in (plain.parent / MODELFILE_NAME).read_text()
    long = export_gguf(src, tmp_path / "long" / ("x" * 90 + ".gguf"), outtype="q8_0", ollama=True)
    assert f"#   ollama create {'x' * 80} -f" in (long.parent / MODELFILE_NAME).read_text()  # Ollama's limit
