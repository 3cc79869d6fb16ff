"""Typed errors for everything a user can get wrong.

Each message names the offending value and says what to do about it; tests match on these
messages, so keep them specific. `assert` stays reserved for internal invariants.
"""


class MambaDeployError(Exception):
    """Base class: catch this to handle every user-facing failure of the toolkit."""


class ModelNotFoundError(MambaDeployError, FileNotFoundError):
    """A path does not exist, or a hub id cannot be resolved."""


class UnsupportedArchitectureError(MambaDeployError, ValueError):
    """config.json / GGUF names an architecture this toolkit does not implement."""


class ConfigError(MambaDeployError, ValueError):
    """A config is inconsistent or has values we cannot interpret."""


class CheckpointError(MambaDeployError, ValueError):
    """Weights are corrupt, missing, unexpected, or have the wrong shape."""


class ShapeError(MambaDeployError, ValueError):
    """Runtime inputs (ids, state, mask) have the wrong shape or dtype."""


class ContextLengthError(ShapeError):
    """A prompt plus its max_tokens would run past a runner's max_positions (llama.cpp's n_ctx)."""


class ExportError(MambaDeployError, RuntimeError):
    """An export failed or its validation against PyTorch exceeded tolerance."""


class BackendUnavailableError(MambaDeployError, ImportError):
    """An optional dependency for a backend or feature is not installed."""


class QuantizationError(MambaDeployError, ValueError):
    """A quantization method, config or tensor is not supported."""


class OutputPathError(MambaDeployError, OSError):
    """An output path cannot be written: its parent is a file or read-only, or a file target is a
    folder (or a folder target a non-empty folder)."""


class RunnerClosedError(MambaDeployError, RuntimeError):
    """A runner (or its tokenizer) is used after `close()`."""


class VerificationError(MambaDeployError, AssertionError):
    """An artifact disagrees with its reference beyond tolerance."""


class TrainingDivergedError(MambaDeployError, FloatingPointError):
    """A training step's loss or gradient norm is NaN or infinite: the step is not taken and
    nothing is saved over the last good state."""


class BeyondToleranceError(VerificationError):
    """verify ran every check and some were beyond tolerance. The CLI exits with `exit_code` 1
    here and 2 on every other error, as diff and cmp do, so a script can tell "the artifact
    differs" from "the check could not run" (a bad path, a flag, a missing package)."""
    exit_code = 1


class IncompleteRunError(MambaDeployError, RuntimeError):
    """A run over several targets (bench) wrote the results it measured but some targets failed.
    The CLI exits with `exit_code` 1, so a script does not take a table with gaps for a full one;
    2 stays "nothing could be done"."""
    exit_code = 1
