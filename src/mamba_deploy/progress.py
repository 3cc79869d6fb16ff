"""Progress bars of the long writes (convert, GGUF export): one rule for when a model is large
enough to show one, and the bar itself (stderr, gone once done, so stdout stays the result)."""

from __future__ import annotations

import sys

# parameters above which writing takes long enough to be worth a bar (a few seconds on a laptop)
LARGE_MODEL_PARAMS = 50_000_000


def progress_wanted(model) -> bool:
    """Whether writing `model` shows a progress bar."""
    return model.num_parameters() > LARGE_MODEL_PARAMS


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "B"):
    """A tqdm bar on stderr that clears itself when closed; a no-op one when not `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, disable=not enabled,
                file=sys.stderr)
