"""mamba-deploy: run, export, quantize and verify Mamba / Mamba2 language models.

The public names load on first use (PEP 562): `import mamba_deploy` does not import torch, so the
console script (entry.py) can report a Ctrl-C during torch's import in one line."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_PUBLIC = {"load_model": ".checkpoint", "save_checkpoint": ".checkpoint", "MambaConfig": ".config",
           "MambaLM": ".model", "ModelOutput": ".model", "State": ".state", "MambaDeployError": ".errors"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
