"""tools/fetch_llama_converter.py: keeps only what llama.cpp's converter needs from the source
package, never writes outside its destination, and leaves no half-written destination."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("fetch_llama_converter", ROOT / "tools" / "fetch_llama_converter.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sdist(path: Path, names) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_keeps_the_converter_only(tmp_path):
    base = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    sdist = _sdist(tmp_path / "s.tar.gz", [
        base + "convert_hf_to_gguf.py", base + "conversion/mamba.py", base + "gguf-py/gguf/__init__.py",
        base + "models/ggml-vocab-gpt-neox.gguf", base + "models/ggml-vocab-llama-bpe.gguf",
        base + "ggml/src/ggml.c", base + "convert_lora_to_gguf.py", "llama_cpp_python-9.9.9/setup.py",
        base + "conversion/../../escaped.py"])
    dest = tmp_path / "dest"
    dest.mkdir()
    _tool()._extract(sdist, dest)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["conversion/mamba.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py",
                   "models/ggml-vocab-gpt-neox.gguf"]
    assert not list(tmp_path.rglob("escaped.py"))  # dest/conversion/../.. is tmp_path
    assert (dest / "convert_hf_to_gguf.py").read_text() == base + "convert_hf_to_gguf.py"


def test_without_llama_cpp_python_it_skips_cleanly(tmp_path, monkeypatch, capsys):
    tool = _tool()
    monkeypatch.setattr(tool, "_installed_version", lambda: None)
    assert tool.main(["--dest", str(tmp_path / "d")]) == 0
    assert "not installed" in capsys.readouterr().out and not (tmp_path / "d").exists()


def test_failed_download_leaves_no_destination(tmp_path, monkeypatch, capsys):
    tool = _tool()
    monkeypatch.setattr(tool, "_installed_version", lambda: "0.0.0-does-not-exist")

    class Failed:
        returncode = 1

    monkeypatch.setattr(tool.subprocess, "run", lambda *a, **k: Failed())
    assert tool.main(["--dest", str(tmp_path / "d")]) == 0
    assert "could not download" in capsys.readouterr().out and not (tmp_path / "d").exists()


@pytest.mark.parametrize("has_converter", [True, False])
def test_complete_or_absent(tmp_path, monkeypatch, has_converter):
    """A source package without the converter leaves an existing destination as it was; one with it
    replaces the destination whole and stamps the version."""
    tool = _tool()
    monkeypatch.setattr(tool, "_installed_version", lambda: "9.9.9")
    base = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    names = [base + "gguf-py/gguf/__init__.py"] + ([base + "convert_hf_to_gguf.py"] if has_converter else [])

    def fake_download(cmd, **kw):
        _sdist(Path(cmd[cmd.index("-d") + 1]) / "llama_cpp_python-9.9.9.tar.gz", names)

        class Ok:
            returncode = 0
        return Ok()

    monkeypatch.setattr(tool.subprocess, "run", fake_download)
    dest = tmp_path / "share" / "llama.cpp"
    dest.mkdir(parents=True)
    (dest / "old.txt").write_text("old")
    assert tool.main(["--dest", str(dest)]) == 0
    if has_converter:
        assert not (dest / "old.txt").exists() and (dest / tool.STAMP).read_text().strip() == "9.9.9"
        assert (dest / "convert_hf_to_gguf.py").exists()
    else:
        assert (dest / "old.txt").read_text() == "old" and not (dest / "convert_hf_to_gguf.py").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["llama.cpp"]  # no staging folder left


def test_corrupt_download_leaves_no_destination(tmp_path, monkeypatch, capsys):
    tool = _tool()
    monkeypatch.setattr(tool, "_installed_version", lambda: "9.9.9")

    def truncated(cmd, **kw):
        (Path(cmd[cmd.index("-d") + 1]) / "llama_cpp_python-9.9.9.tar.gz").write_bytes(b"\x1f\x8b\x08not a tarball")

        class Ok:
            returncode = 0
        return Ok()

    monkeypatch.setattr(tool.subprocess, "run", truncated)
    dest = tmp_path / "share" / "llama.cpp"
    assert tool.main(["--dest", str(dest)]) == 0
    assert "could not unpack" in capsys.readouterr().out
    assert list((tmp_path / "share").iterdir()) == []  # neither dest nor a staging folder
