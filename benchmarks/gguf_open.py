"""What opening a GGUF costs, by vocabulary size: gguf-py's GGUFReader against this project's
export/gguf_reader.GGUFFile, each in a fresh process, on synthetic files holding a vocabulary as
llama.cpp writes it (tokens, scores, token types) and one small tensor. Times the open plus the
read of the token list (best of --repeat), and the resident memory the open reader holds.
Prints a table and writes JSON.

    python benchmarks/gguf_open.py [--vocab 50280,131072,262144] [--repeat 3] [--out FILE]

Every command that takes a .gguf opens it one to four times (verify: the preflight check, the
weight label, the runner's own open, its tokenizer), so the per-open cost is paid that often.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys, time
sys.path.insert(0, {src!r})
import gguf, numpy
from mamba_deploy.export.gguf_reader import GGUFFile

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

best, held = None, 0.0
for _ in range({repeat}):
    before = rss_mb()
    t = time.perf_counter()
    r = gguf.GGUFReader({path!r}) if {reader!r} == "gguf-py" else GGUFFile({path!r})
    n = len(r.get_field("tokenizer.ggml.tokens").contents())
    dt = time.perf_counter() - t
    best, held = (dt, rss_mb() - before) if best is None or dt < best else (best, held)
    del r
print(best, n, held)
"""


def write_vocab_file(path: Path, n: int) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "mamba2")
    # byte-level BPE pieces of realistic length (4-9 characters)
    w.add_token_list([f"\u0120tok{i}" for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([1] * n)
    w.add_tensor("token_embd.weight", np.zeros((8, 16), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def measure(reader: str, path: Path, repeat: int) -> dict:
    code = CHILD.format(src=str(ROOT / "src"), repeat=repeat, reader=reader, path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"seconds": float(out[0]), "tokens": int(out[1]), "rss_held_mb": float(out[2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="50280,131072,262144", help="vocabulary sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="opens per process; the best is kept")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.vocab.split(",")):
            path = Path(tmp) / f"vocab{n}.gguf"
            write_vocab_file(path, n)
            ref, ours = measure("gguf-py", path, args.repeat), measure("ours", path, args.repeat)
            rows.append({"vocab": n, "file_mb": path.stat().st_size / 2**20, "gguf_py": ref, "ours": ours,
                         "speedup": ref["seconds"] / ours["seconds"]})
            path.unlink()
    print("| vocab | file (MB) | gguf-py open (s) | ours (s) | ratio | gguf-py RSS held (MB) | ours (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['vocab']} | {r['file_mb']:.1f} | {r['gguf_py']['seconds']:.3f} | {r['ours']['seconds']:.4f} | "
              f"{r['speedup']:.0f}x | {r['gguf_py']['rss_held_mb']:.0f} | {r['ours']['rss_held_mb']:.0f} |")
    if args.out:
        from mamba_deploy.atomic import write_json  # a temporary name, then renamed

        write_json(args.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
