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


def is_gguf(path) -> bool:
    """Is `path` named as a GGUF file? The suffix in any case: llama.cpp and Ollama read
    `MODEL.GGUF` as well as `model.gguf`."""
    return Path(str(path)).suffix.lower() == ".gguf"


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


def check_model_file(path, folder=None, inside: bool = False) -> None:
    """CheckpointError unless `path` (a file of the model folder `folder`, default its parent) is
    a regular file once links are followed, and with `inside`, one inside that folder. A folder
    handed over by someone else (an upload to a conversion service) could link
    tokenizer_config.json to /dev/zero (an endless read or copy) or to a pipe (a read that never
    returns), or merges.txt to a file of this machine, which `convert` then copied into the new
    checkpoint (`inside`: for what is copied into an output; a model read through links to
    files elsewhere, a way to assemble a folder without copying, still loads). A hub cache's
    snapshot links into its repo's blobs: inside that repo's cache folder is inside."""
    import stat

    from .errors import CheckpointError

    p = Path(path)
    home = Path(folder) if folder is not None else p.parent
    try:
        target, mode = p.resolve(), os.stat(p).st_mode
    except (OSError, RuntimeError):  # absent or a link to nothing: the reader says so
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # a folder: each reader says so in its own terms
        raise CheckpointError(f"{p} is a pipe or device, not a file; a model folder holds regular files (replace it "
                              "with the file itself)")
    if not inside:
        return
    root = home.resolve()
    roots = [root] + ([root.parent.parent] if root.parent.name == "snapshots" else [])  # hub cache: repo/blobs
    if not any(target == r or r in target.parents for r in roots):
        raise CheckpointError(f"{p} links to {target}, outside the model folder {home}; copy the file into the "
                              "folder instead of linking it")
