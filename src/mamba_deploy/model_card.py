"""The model card (README.md) of a folder `mamba-deploy train` wrote, from its train_log.json
metrics: how the shipped demo models' cards were made."""

from __future__ import annotations

import sys
from pathlib import Path

from .atomic import write_text
from .errors import ConfigError

TIMED_STEPS = 12  # the steps `train --max-minutes` times before fitting --steps (train._loop)


CARD = """# {name}

A small {arch} language model ({params:.2f} M parameters) trained from scratch by
`mamba-deploy train` on Python source code. It ships with mamba-deploy as the model that
`mamba-deploy demo` loads, exports and verifies offline; it is a test fixture, not a useful
code model.

| | |
| --- | --- |
| architecture | {arch_line} |
| tokenizer | byte-level BPE, {vocab} tokens, trained on the train split (`mamba-deploy train-tokenizer`) |
| weights | fp16 safetensors, HF layout (`transformers` loads it with `AutoModelForCausalLM`) |
| steps | {steps} (batch {batch} x {seq_len} tokens, AdamW lr {lr} cosine, warmup {warmup}, clip {clip}, {amp} autocast, {device}) |
| training time | {train_s:.0f} s |
| tokens seen | {tokens_seen:,} ({epochs:.1f} passes over {train_tokens:,} train tokens) |
| validation perplexity | **{ppl:.2f}** on the first {val_tokens:,} validation tokens (state carried across 512-token windows) |
| unigram baseline | {unigram:.1f} (add-one smoothed train-split counts, same tokens) |

## Corpus and split
The `.py` files of the Python standard library (`sysconfig.get_paths()["stdlib"]`), skipping the
folders {excluded}. A file goes to validation when the first 8 bytes of sha256 of its path
relative to the stdlib root ('/'-separated), as a big-endian integer, fall below {val_pct}% of
2^64; the rule depends on the path alone, so it is the same on every Python version (the file
sets differ a little between versions). Files are joined in path order, each followed by
`<|endoftext|>`. Token streams were made with Python {python} and carried to the training
machine.

## Training commands
```
mamba-deploy train-tokenizer models/{name} --vocab-size {vocab}
{command}
```
{repro}
{notes}Measure it again: `mamba-deploy eval models/{name} --corpus stdlib-val --max-tokens {val_tokens}`.
"""


def write_model_card(folder, metrics: dict, data_meta: dict | None = None, notes: str = "") -> Path:
    """README.md for a trained folder, from its train_log.json metrics."""
    cfg = metrics["config"]
    v = metrics.get("validation")
    if not isinstance(v, dict):
        raise ConfigError(f"{folder}: its train_log.json has no final validation, which the model card reports; "
                          "train with --eval-tokens N (or --resume the run with it) first")
    arch = "Mamba2" if cfg["model_type"] == "mamba2" else "Mamba"
    arch_line = f"{arch}: d_model {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, d_state {cfg['state_size']}"
    if cfg["model_type"] == "mamba2":
        arch_line += f", {cfg['num_heads']} heads x {cfg['head_dim']}, ngroups {cfg['n_groups']}, chunk_size {cfg['chunk_size']}"
    from . import data

    meta = data_meta or {}
    cmd = metrics["command"]
    repro = ""
    # lr_at of step s <= warmup does not depend on the total: the timed steps 0..11 need warmup >= 11
    if "--max-minutes" in cmd and metrics["warmup"] >= TIMED_STEPS - 1:
        repro = (f"`--max-minutes` resolved to {metrics['steps']} steps after timing the first {TIMED_STEPS} (all "
                 f"inside the warmup, so the schedule is the same): pass `--steps {metrics['steps']}` instead to "
                 "repeat it.\n")
    elif "--max-minutes" in cmd:  # steps past the warmup followed the unfitted --steps' cosine
        repro = (f"`--max-minutes` resolved to {metrics['steps']} steps after timing the first {TIMED_STEPS}; "
                 f"those past the warmup ({metrics['warmup']} steps) followed the schedule of the --steps given, so "
                 f"`--steps {metrics['steps']}` trains a slightly different model.\n")
    text = CARD.format(
        name=Path(folder).name, arch=arch, params=metrics["parameters"] / 1e6, arch_line=arch_line,
        vocab=cfg["vocab_size"], steps=metrics["steps"], batch=metrics["batch"], seq_len=metrics["seq_len"],
        lr=metrics["lr"], warmup=metrics["warmup"], clip=metrics["clip"],
        amp=metrics["amp"].removeprefix("torch."), device=metrics["device"],
        train_s=metrics.get("train_seconds", float("nan")), tokens_seen=metrics["tokens_seen"], epochs=metrics["tokens_seen"] / metrics["train_tokens_available"],
        train_tokens=metrics["train_tokens_available"], ppl=v["ppl"], val_tokens=v["tokens"] + 1,
        unigram=v["unigram_ppl"], excluded=", ".join(f"`{d}`" for d in sorted(data.EXCLUDED_DIRS)),
        val_pct=data.VAL_PERCENT, python=meta.get("python", sys.version.split()[0]), command=cmd, repro=repro,
        notes=notes + "\n" if notes else "")
    return write_text(Path(folder) / "README.md", text)  # a temporary name, then renamed
