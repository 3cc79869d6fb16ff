"""The tokenizer files that travel with a model: which names they have, where a model's come
from (its folder, or a GGUF whose vocabulary is its tokenizer), and how they are copied beside a
saved checkpoint or export."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from .errors import CheckpointError, ConfigError, ExportError
from .pathnames import is_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "tokenizer.model", "tokenizer.model.v3",
                   "chat_template.jinja")


def tokenizer_source(model):
    """Where a model's tokenizer comes from: its GGUF (whose vocabulary is the tokenizer), unless
    load_gguf found this GGUF's own tokenizer files beside it, or its folder."""
    if getattr(model, "gguf_path", None) is not None and getattr(model, "gguf_neighbour", None) is None:
        return model.gguf_path
    return getattr(model, "source_path", None)


def write_tokenizer_files(src, dst: Path, shown=None) -> None:
    """The tokenizer files beside a saved checkpoint or export (`src`: `tokenizer_source(model)`):
    copied from a folder, or a GGUF's vocabulary written as tokenizer.json. Where a GGUF's has no
    equivalent (or none at all) it warns, naming `shown` (the final output, not the temporary
    `dst`): the weights or graph still run on token ids."""
    if src is None:
        return
    src = Path(src)
    if not is_gguf(src):
        copy_tokenizer_files(src, dst)
        return
    from .export.gguf_vocab import write_gguf_tokenizer

    try:
        write_gguf_tokenizer(src, dst)
    except (ExportError, ConfigError) as e:  # ConfigError: the GGUF lacks tokenizer metadata
        warnings.warn(f"{shown or dst} gets no tokenizer: {e}. Copy the original model's tokenizer.json and "
                      "tokenizer_config.json into it to use text prompts", stacklevel=3)


def copy_tokenizer_files(src, dst) -> list[str]:
    src = Path(src)
    if src.is_file():
        src = src.parent
    from .checkpoint import GENERATION_CONFIG, generation_end_ids
    from .pathnames import check_model_file

    copied = []
    for name in TOKENIZER_FILES:
        if os.path.lexists(src / name):  # a dangling or looping link too: refused below, not dropped
            check_model_file(src / name, src, inside=True)  # nothing from outside the folder goes into the output
            if not (src / name).is_file():
                raise CheckpointError(f"{src / name} is a folder, not a tokenizer file; remove it or put the file "
                                      "there")
            shutil.copy2(src / name, Path(dst) / name)
            copied.append(name)
    ends = generation_end_ids(src) if GENERATION_CONFIG not in copied else []
    if len(ends) > 1:  # config.json's eos_token_id list, which a saved config.json keeps one id of
        (Path(dst) / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": ends}, indent=2))
        copied.append(GENERATION_CONFIG)
    return copied
