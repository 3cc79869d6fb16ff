"""What can be known of an artifact before its runner opens it, from its files' headers alone: is
the backend installed, does it take this kind of file, and which model config does the file
hold. `mamba-deploy verify` asks this before its reference pass, which takes minutes: an
artifact its backend cannot open, or one of another model, was reported only after it.

Each check raises the typed error the runner itself would (the runner still checks everything
when it opens the artifact; a check left out here only comes later, never is lost).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ..config import MambaConfig
from ..errors import BackendUnavailableError, ExportError, ModelNotFoundError
from ..extras import install_hints
from ..pathnames import is_gguf

# backend -> the packages its runner imports (find_spec looks for them without importing them)
BACKEND_PACKAGES = {"torch": (), "onnx": ("onnxruntime",), "llama.cpp": ("llama_cpp", "gguf"),
                    "openvino": ("openvino", "onnx"), "tensorrt": ("tensorrt",)}


# what else runs an artifact of a backend whose packages are missing
OTHER_WAY = {"llama.cpp": "; or run the .gguf with --backend torch (PyTorch, which needs only the gguf package)"}


def _found(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules without a __spec__ (a stand-in module): importable
        return True
    except ImportError:  # a finder that failed (a Ctrl-C while it ran): the import itself says what happened
        return True


def check_installed(backend: str, path=None) -> None:
    """BackendUnavailableError naming every package `backend` needs that is missing, and one
    command that installs them all (and another backend for a .gguf `path`, or None: unknown)."""
    missing = [p for p in BACKEND_PACKAGES.get(backend, ()) if not _found(p)]
    if missing:
        what = "package" if len(missing) == 1 else "packages"
        gguf = path is None or is_gguf(path)
        other = OTHER_WAY.get(backend, "") if gguf and "gguf" not in missing else ""  # torch reads a .gguf with gguf
        raise BackendUnavailableError(f"the {backend} backend needs the {what} {' and '.join(map(repr, missing))}: "
                                      f"{install_hints(missing)}{other}")
    if backend == "tensorrt":
        from .tensorrt_runner import require_cuda

        require_cuda()


def artifact_config(path, backend: str) -> MambaConfig | None:
    """The config `backend`'s runner will run `path` with, read without loading any weights; the
    runner's own typed error when that backend cannot open `path`. None for a hub id (its files
    are fetched when the runner opens it)."""
    from ..hub import local_path

    check_installed(backend)
    p = local_path(path)  # ModelNotFoundError for a local path that does not exist
    if p is None:
        return None
    return _READERS[backend](p)


def _checkpoint_config(p: Path) -> MambaConfig:
    """load_model's reading of a checkpoint folder, its config.json, or a .gguf file."""
    from ..checkpoint import CONFIG_FILES, read_config

    if p.is_file() and is_gguf(p):
        return _gguf_config(p)
    if p.is_file() and p.name not in CONFIG_FILES:
        raise ModelNotFoundError(f"{p} is a file; pass the checkpoint folder or a .gguf file")
    return read_config(p.parent if p.is_file() else p)


def _gguf_config(p: Path) -> MambaConfig:
    from ..export.gguf_import import open_gguf

    return open_gguf(p)[3]  # metadata and tensor headers: the weights are not read


def _llamacpp_config(p: Path) -> MambaConfig:
    from .llamacpp_runner import check_gguf_path

    return _gguf_config(check_gguf_path(p))


def _onnx_config(p: Path) -> MambaConfig:
    from ..export.onnx import open_export_folder

    return MambaConfig.from_own_dict(open_export_folder(p)[1]["config"])  # as OnnxRunner reads it


def _tensorrt_config(p: Path) -> MambaConfig | None:
    """The sidecar's config, after the two checks that otherwise fail only when the engine loads:
    the engine file is the size its sidecar records, and this TensorRT is the one that built it
    (an engine loads only in the version that built it), read from package metadata, without
    importing TensorRT."""
    from .tensorrt_runner import check_engine_pair, engine_and_sidecar

    engine, sidecar = engine_and_sidecar(p)
    check_engine_pair(sidecar, engine.stat().st_size, engine)
    built = sidecar.get("build", {}).get("tensorrt") if isinstance(sidecar.get("build"), dict) else None
    here = next(filter(None, map(_installed_version, TENSORRT_PACKAGES)), None)
    if isinstance(built, str) and here is not None and _release(built) != _release(here):
        raise ExportError(f"{engine} was built by TensorRT {built}, and this is TensorRT {here}: an engine loads only "
                          "in the version that built it; rebuild the engine here (mamba-deploy export tensorrt)")
    manifest = sidecar.get("manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        return None  # a broken sidecar: the runner says what is wrong with it
    return MambaConfig.from_own_dict(manifest["config"])  # as TensorRTRunner reads it


# the pip distributions that install the `tensorrt` module (the meta-package pulls a CUDA one)
TENSORRT_PACKAGES = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11")


def _release(version: str) -> tuple[int, ...] | str:
    """A version's release numbers without trailing zeros, so that what pip records and what
    `tensorrt.__version__` says (the sidecar's) compare equal however each spells them
    ("10.13.0.35" / "10.13.0.35.post1"; "10.1" / "10.1.0"); the string itself when it has none."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if m is None:
        return version.strip()
    parts = [int(x) for x in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # installed another way (a wheel of another name, a system package)
        return None


_READERS = {"torch": _checkpoint_config, "llama.cpp": _llamacpp_config, "onnx": _onnx_config,
            "openvino": _onnx_config, "tensorrt": _tensorrt_config}
