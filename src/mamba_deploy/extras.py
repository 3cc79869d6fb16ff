"""Where each optional package comes from: the pip package behind an import name and the extra of
mamba-deploy (pyproject.toml [project.optional-dependencies]) that installs it.

Every "this needs package X" error takes its install hint from `install_hint`, so the messages
cannot drift from pyproject.toml one site at a time; tests/test_extras.py checks this table
against pyproject.toml.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple


class Package(NamedTuple):
    pip: str  # the name to `pip install`
    extra: str | None  # the mamba-deploy extra that installs it; None where no extra does
    note: str = ""  # what else it needs, said after the command


# import name -> Package. Only packages that mamba-deploy imports where a command needs them; the
# CLI prints the hint (instead of a traceback) for a ModuleNotFoundError naming one of these.
PACKAGES: dict[str, Package] = {
    "onnx": Package("onnx", "onnx"),
    "onnxruntime": Package("onnxruntime", "onnx"),
    "gguf": Package("gguf", "gguf"),
    "llama_cpp": Package("llama-cpp-python", "llama"),
    "matplotlib": Package("matplotlib", "bench"),
    "openvino": Package("openvino", "openvino"),
    # a fallback for tokenizers without tokenizer.json; too heavy to pull in through an extra
    "transformers": Package("transformers", None),
    # SentencePiece tokenizers (Mamba-Codestral's tokenizer.model.v3): encoding, and their pieces
    # and scores for GGUF, read through sentencepiece's protobuf module (import name google.protobuf)
    "sentencepiece": Package("sentencepiece", "sentencepiece"),
    "google": Package("protobuf", "sentencepiece"),
    # no extra: its wheels work only with a matching NVIDIA driver and CUDA, which pip cannot check
    "tensorrt": Package("tensorrt", None, "needs an NVIDIA GPU with a matching CUDA driver"),
    "triton": Package("triton", None, "CUDA GPUs only"),
}


def top_level(module: str | None) -> str:
    """'onnxruntime.capi' -> 'onnxruntime': ModuleNotFoundError.name may name a submodule."""
    return (module or "").split(".")[0]


def install_hint(module: str) -> str:
    """How to install the package behind import name `module`, e.g.
    "pip install 'mamba-deploy[onnx]' (or pip install onnxruntime)". A name not in PACKAGES (a
    core dependency that went missing) gets a plain `pip install`."""
    name = top_level(module)
    package = PACKAGES.get(name, Package(name, None))
    hint = f"pip install {package.pip}"
    if package.extra:
        hint = f"pip install 'mamba-deploy[{package.extra}]' (or {hint})"
    return f"{hint} ({package.note})" if package.note else hint


def install_hints(modules) -> str:
    """install_hint for several import names at once, one command: "pip install
    'mamba-deploy[gguf,llama]' (or pip install gguf llama-cpp-python)" (a user who installed
    only the first named was told of the second on the next run)."""
    packages = list(dict.fromkeys(PACKAGES.get(top_level(m), Package(top_level(m), None)) for m in modules))
    if len(packages) == 1:
        return install_hint(modules[0])
    hint = "pip install " + " ".join(p.pip for p in packages)
    extras = list(dict.fromkeys(p.extra for p in packages if p.extra))
    if extras and all(p.extra for p in packages):
        hint = f"pip install 'mamba-deploy[{','.join(extras)}]' (or {hint})"
    notes = "; ".join(f"{p.pip} {p.note}" for p in packages if p.note)
    return f"{hint} ({notes})" if notes else hint


@contextlib.contextmanager
def needs_packages(what: str):
    """A missing optional package (one of PACKAGES) imported inside becomes a BackendUnavailableError
    saying what needs it and how to install it; any other missing module is a bug and stays as it is."""
    try:
        yield
    except ModuleNotFoundError as e:
        if top_level(e.name) not in PACKAGES:
            raise
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"{what} needs the package {top_level(e.name)!r}: {install_hint(e.name)}") from e
