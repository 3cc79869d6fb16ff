"""Resident memory across repeated load_tokenizer + encode (what each load_model / open_runner
does): the `tokenizers` library does not free a dropped BPE tokenizer's cache, so a new
tokenizer object per load grew the process by a few hundred KB to ~2 MB per load; the toolkit
shares one object per tokenizer.json content. Prints a line and writes JSON.

    .venv/bin/python benchmarks/tokenizer_reload_memory.py --loads 60 --out benchmarks/results/tokenizer_reload_memory.json
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from mamba_deploy.atomic import write_json
from mamba_deploy.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", type=int, default=60)
    p.add_argument("--tokenizer", default=str(ROOT / "models" / "demo-mamba2"))
    p.add_argument("--out", default="benchmarks/results/tokenizer_reload_memory.json")
    args = p.parse_args()
    text = (ROOT / "src" / "mamba_deploy" / "model.py").read_text()
    for i in range(5):  # warm-up: allocator and library caches
        load_tokenizer(args.tokenizer).encode(text + str(-i))
    gc.collect()
    before = rss_mb()
    for i in range(args.loads):
        load_tokenizer(args.tokenizer).encode(text + str(i))  # distinct texts: the cache fills
    gc.collect()
    after = rss_mb()
    row = {"loads": args.loads, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
           "mb_per_load": round((after - before) / args.loads, 4)}
    print(f"{args.loads} loads: RSS {before:.1f} -> {after:.1f} MB, {row['mb_per_load']:.3f} MB per load")
    write_json(args.out, row)


if __name__ == "__main__":
    main()
