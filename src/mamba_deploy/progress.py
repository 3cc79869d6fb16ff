"""Progress bars of the long writes (convert, GGUF export): one rule for when a model is large
enough to show one, and the bar itself (stderr, gone once done, so stdout stays the result)."""

from __future__ import annotations

import sys

# parameters above which writing takes long enough to be worth a bar (a few seconds on a laptop)
LARGE_MODEL_PARAMS = 50_000_000


def human_bytes(n: float) -> str:
    """Bytes in binary units, named as such, one spelling for every size the CLI prints."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def progress_wanted(model) -> bool:
    """Whether writing `model` shows a progress bar."""
    return model.num_parameters() > LARGE_MODEL_PARAMS


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "B"):
    """A tqdm bar on stderr that clears itself when closed; a no-op one when not `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, disable=not enabled,
                file=sys.stderr)


class Stages:
    """A bar over a long job's named stages (export onnx: reference outputs, graph, save, check):
    `stages("saving")` marks the previous stage done and shows the one now running. One whose
    steps have no count of their own still shows that it moves, and where."""

    def __init__(self, desc: str, names, enabled: bool):
        self.names = list(names)
        self.bar = progress_bar(len(self.names), desc, enabled, unit="stage")
        self.current: str | None = None

    def __call__(self, name: str) -> None:
        assert name in self.names, name  # a stage the total does not count would overshoot the bar
        if self.current is not None:
            self.bar.update(1)
        self.current = name
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
