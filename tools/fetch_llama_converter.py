"""Fetch llama.cpp's own HF -> GGUF converter, at the llama.cpp commit the installed
llama-cpp-python was built from, into <venv>/share/llama.cpp. tests/test_gguf.py compares our GGUF
export with that converter's file (names, shapes, types, bytes, metadata): an independent
reference. The converter is not on PyPI by itself; llama-cpp-python's source package carries it
under vendor/llama.cpp, so this downloads that package from the package index (the only network
use, at install time) and keeps the ~5 MB the converter needs.

    python tools/fetch_llama_converter.py [--dest DIR]

Without llama-cpp-python, or when the download fails, it says so and exits 0: the comparison test
then skips with its reason (install stays usable offline).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# what convert_hf_to_gguf.py imports or reads, relative to vendor/llama.cpp/
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-gpt-neox.gguf")
STAMP = ".llama-cpp-python-version"


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def _extract(sdist: Path, dest: Path) -> None:
    """Members under */vendor/llama.cpp/ that KEEP names, into dest (no path escapes)."""
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/vendor/llama.cpp/", 1)
            if len(parts) != 2 or not (m.isfile() or m.isdir()):
                continue
            rel = parts[1]
            if not any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in KEEP):
                continue
            if rel.startswith("/") or ".." in Path(rel).parts:
                continue
            out = dest / rel
            if m.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(sys.prefix) / "share" / "llama.cpp")
    args = ap.parse_args(argv)
    ver = _installed_version()
    if ver is None:
        print("fetch_llama_converter: llama-cpp-python is not installed; skipping (its test will skip)")
        return 0
    stamp = args.dest / STAMP
    if stamp.exists() and stamp.read_text().strip() == ver and (args.dest / KEEP[0]).exists():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={ver}", "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            print(f"fetch_llama_converter: could not download llama-cpp-python {ver}'s source package; "
                  "the llama.cpp converter comparison test will skip")
            return 0
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        args.dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=args.dest.parent))  # beside dest: the rename stays on one filesystem
        try:
            try:
                _extract(sdist, staging)
            except (tarfile.TarError, OSError, EOFError) as e:  # a corrupt or truncated download
                print(f"fetch_llama_converter: could not unpack {sdist.name} ({e}); the llama.cpp converter "
                      "comparison test will skip (run `make install` again to retry)")
                return 0
            if not (staging / KEEP[0]).exists():
                print(f"fetch_llama_converter: {sdist.name} has no vendor/llama.cpp/{KEEP[0]}; skipping")
                return 0
            (staging / STAMP).write_text(ver + "\n")
            shutil.rmtree(args.dest, ignore_errors=True)
            staging.rename(args.dest)  # complete or absent, never half-written
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"fetch_llama_converter: llama.cpp's converter (llama-cpp-python {ver}) in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
