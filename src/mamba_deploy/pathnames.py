"""File names handed to native libraries.

On Linux a file name is bytes. Python gives a name that is not valid UTF-8 (b'mod\\xe9l.gguf',
from a Latin-1 system, an archive, or a C/POSIX locale) as a str holding surrogate escapes
(os.fsdecode), which `str(path).encode()` and every binding that takes UTF-8 text refuse with a
UnicodeEncodeError. A ctypes char* takes the name's own bytes (os.fsencode); for the C++
bindings that only take text (pybind11's std::string: ONNX Runtime, onnx.checker) `text_path`
reaches the same file through a name that is text.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def is_text(name: str) -> bool:
    """Can `name` be passed as UTF-8 text (it holds no surrogate-escaped bytes)?"""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def text_path(path) -> Iterator[str]:
    """`path` as UTF-8 text for a library that takes nothing else, valid while the block runs. A
    name with bytes that are not UTF-8 goes through its folder opened as /proc/self/fd/N (Linux,
    where such names occur): the files a graph names beside it (model.onnx.data) are still found
    there. A file name of such bytes itself is named by its own descriptor."""
    name = os.fsdecode(os.fspath(path))
    if is_text(name) or not os.path.isdir("/proc/self/fd"):
        yield name  # elsewhere (macOS, Windows) every file name is text already
        return
    p = Path(name)
    opened = p if not is_text(p.name) else p.parent  # the descriptor stands for the part that is not text
    fd = os.open(opened, getattr(os, "O_PATH", os.O_RDONLY))
    try:
        yield f"/proc/self/fd/{fd}" + ("" if opened == p else f"/{p.name}")
    finally:
        os.close(fd)
