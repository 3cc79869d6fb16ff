"""Backends behind one interface. `open_runner(artifact, backend)` picks one by name."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BackendUnavailableError, CheckpointError, ConfigError, ModelNotFoundError
from ..export.onnx_meta import ENGINE_FILE, GRAPH_FILE, MANIFEST_FILE
from ..extras import install_hint, top_level
from ..pathnames import is_gguf
from .base import Runner

# backend name -> (module, factory) ; factories take (path, **options)
BACKENDS = {
    "torch": ("mamba_deploy.runners.torch_runner", "open_torch"),
    "onnx": ("mamba_deploy.runners.onnx_runner", "open_onnx"),
    "llama.cpp": ("mamba_deploy.runners.llamacpp_runner", "open_llamacpp"),
    "openvino": ("mamba_deploy.runners.openvino_runner", "open_openvino"),
    "tensorrt": ("mamba_deploy.runners.tensorrt_runner", "open_tensorrt"),
}

# each factory's own options; an option only another backend takes is ignored (callers pass one
# set to several backends), one that no backend takes is a typo and refused
OPTIONS = {
    "torch": ("device", "dtype", "state_dtype", "threads", "tensor_parallel"),
    "onnx": ("providers", "threads", "check_hash", "prepack"),
    "llama.cpp": ("threads", "n_threads", "n_ctx", "n_batch", "n_seq_max", "verbose", "extra_buffers"),
    "openvino": ("device", "precision", "threads", "check_hash", "properties"),
    "tensorrt": ("device", "threads"),
}

# other spellings users type: the package names (llama_cpp, onnxruntime) and common short forms
ALIASES = {"llamacpp": "llama.cpp", "llama_cpp": "llama.cpp", "llama-cpp": "llama.cpp", "onnxruntime": "onnx",
           "ort": "onnx", "ov": "openvino", "trt": "tensorrt", "pytorch": "torch"}


def fold_backend(name: str) -> str:
    """Case and aliases folded (llamacpp -> llama.cpp); not checked."""
    key = str(name).strip().lower()
    return ALIASES.get(key, key)


def backend_name(name: str) -> str:
    """A backend name as BACKENDS spells it (case and aliases folded); BackendUnavailableError
    naming the valid ones when it is none of them."""
    key = fold_backend(name)
    if key not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return key


def guess_backend(path) -> str:
    p = Path(os.path.expanduser(str(path)))  # as open_runner opens it
    if is_gguf(p):
        return "llama.cpp"
    if p.suffix == ".onnx" or (p / GRAPH_FILE).exists() or (p / MANIFEST_FILE).exists():
        return "onnx"  # a manifest without its model.onnx: the ONNX runner names the missing file
    if p.suffix in (".engine", ".plan") or (p / ENGINE_FILE).exists():
        return "tensorrt"
    return "torch"


def open_runner(path, backend: str | None = None, **options) -> Runner:
    if not isinstance(path, (str, os.PathLike)):  # every backend's error, not a TypeError from Path(None)
        raise ModelNotFoundError(f"open_runner takes a path or hub id (str or Path), got {type(path).__name__} "
                                 f"{path!r:.60}; for a loaded model use TorchRunner(model)")
    path = os.path.expanduser(path)  # "~/m.gguf" as load_model takes it (a hub id has no ~)
    named = backend_name(backend) if backend else None
    backend = named or guess_backend(path)
    unknown = sorted(set(options) - {o for opts in OPTIONS.values() for o in opts})
    if unknown:
        raise ConfigError(f"open_runner got unknown option(s) {unknown}; the {backend} backend takes "
                          f"{', '.join(OPTIONS[backend])}")
    try:
        return _open(path, backend, options)
    except (BackendUnavailableError, ModelNotFoundError, CheckpointError) as e:
        hinted = _wrong_backend(e, path, named)  # is this backend the one for the path at all?
        if hinted is e:
            raise
        raise hinted from e


def _open(path, backend: str, options: dict) -> Runner:
    import importlib

    from .preflight import check_installed

    mod_name, fn = BACKENDS[backend]
    check_installed(backend, path)  # every missing package at once, before any import
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise BackendUnavailableError(f"backend {backend!r} is not built into this version of mamba-deploy") from e
        raise BackendUnavailableError(f"backend {backend!r} needs the package {top_level(e.name)!r}: "
                                      f"{install_hint(e.name)}") from e
    return getattr(mod, fn)(path, **options)


# backends that open each other's kind of artifact: no hint to switch between them
_SAME_KIND = ({"onnx", "openvino"},)


def _wrong_backend(e, path, named):
    """`e` from a backend the caller named for an existing path of a kind that backend does not
    run (an ONNX folder with --backend torch): the same error, saying which backend the path
    opens with; else `e` itself (a missing or broken file is not a wrong backend)."""
    if named is None or not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        return e
    guessed = guess_backend(path)
    if guessed == named or (named == "torch" and is_gguf(path)) or \
            any({named, guessed} <= kind for kind in _SAME_KIND):
        return e
    return type(e)(f"{e} (the {named} backend was asked for; this path opens with the {guessed} backend when "
                   f"none is named: leave --backend out, or give --backend {guessed})")
