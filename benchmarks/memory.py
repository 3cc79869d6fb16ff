"""Peak resident memory of CLI verbs against the checkpoint's size: each verb in a fresh process
under `/usr/bin/time -v`, on a random transformers Mamba / Mamba2 checkpoint built here (with the
demo model's tokenizer, so every verb runs). Prints a table and writes JSON.

    python benchmarks/memory.py --arch mamba2 --hidden 768 --layers 16 [--src OTHER_CHECKOUT/src] --out FILE

x = (peak - baseline) / checkpoint bytes, where the baseline is `mamba-deploy --help` (Python,
torch and every stage's modules). Peak RSS includes the memory-mapped weight file while a model
loads (about 1x), which the kernel can drop under pressure. tests/test_memory.py bounds the
same ratios in CI for loading and ONNX export.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "models" / "demo-mamba2"
VERBS = {  # name -> arguments, with {m} the checkpoint and {w} a scratch folder
    "baseline (--help)": ["--help"],
    "generate 4 tokens": ["generate", "{m}", "--prompt", "def f(x):", "--max-new-tokens", "4"],
    "generate --dtype bf16": ["generate", "{m}", "--prompt", "def f(x):", "--max-new-tokens", "4", "--dtype", "bf16"],
    "export gguf f32": ["export", "gguf", "{m}", "{w}/m.gguf"],
    "export gguf q8_0": ["export", "gguf", "{m}", "{w}/q8.gguf", "--outtype", "q8_0"],
    "quantize int8": ["quantize", "{m}", "{w}/int8", "--method", "int8"],
    "export onnx (validated)": ["export", "onnx", "{m}", "{w}/onnx"],
    "verify vs its ONNX": ["verify", "{m}", "{w}/onnx", "--lengths", "7", "--batch", "1", "--decode-steps", "2"],
    "verify vs itself (default cases)": ["verify", "{m}", "{m}", "--quiet"],
    "verify vs itself (--lengths 2000 --batch 8)": ["verify", "{m}", "{m}", "--lengths", "2000", "--batch", "8",
                                                    "--quiet"],
    # the artifacts the verbs above wrote, opened by their runners
    "export gguf f16": ["export", "gguf", "{m}", "{w}/f16.gguf", "--outtype", "f16"],
    "generate its GGUF on torch": ["generate", "{w}/m.gguf", "--backend", "torch", "--prompt", "def f(x):",
                                   "--max-new-tokens", "4"],
    "generate its int8 checkpoint": ["generate", "{w}/int8", "--prompt", "def f(x):", "--max-new-tokens", "4"],
    "generate its ONNX (onnxruntime)": ["generate", "{w}/onnx", "--backend", "onnx", "--prompt", "def f(x):",
                                        "--max-new-tokens", "4"],
    "generate its ONNX (openvino)": ["generate", "{w}/onnx", "--backend", "openvino", "--prompt", "def f(x):",
                                     "--max-new-tokens", "4"],
}


def build(arch: str, hidden: int, layers: int, folder: Path) -> int:
    """A random checkpoint with the demo tokenizer -> its weight bytes."""
    import torch
    import transformers

    vocab = json.loads((TOKENIZER / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    if arch == "mamba2":
        cfg = transformers.Mamba2Config(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab, state_size=128,
                                        head_dim=64, num_heads=2 * hidden // 64, n_groups=1, tie_word_embeddings=False)
        model = transformers.Mamba2ForCausalLM(cfg)
    else:
        cfg = transformers.MambaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab)
        model = transformers.MambaForCausalLM(cfg)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, folder / name)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def peak_rss(args: list[str], src: Path) -> int:
    """Maximum resident set size in bytes of `python -m mamba_deploy ARGS`, the package from `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "mamba_deploy", *args], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["mamba", "mamba2"], default="mamba2")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--only", default=None, help="comma-separated verb names (default: all)")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the package's source tree (another checkout's "
                    "src/ measures older code with the same verbs)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mamba-memory-") as tmp:
        model, work = Path(tmp) / "model", Path(tmp) / "work"
        work.mkdir()
        size = build(a.arch, a.hidden, a.layers, model)
        rows, base = [], None
        for name, args in VERBS.items():
            if a.only and name not in a.only.split(",") and base is not None:
                continue
            peak = peak_rss([x.format(m=model, w=work) for x in args], Path(a.src))
            base = peak if base is None else base
            rows.append({"verb": name, "peak_rss_mib": peak / 2**20, "x_checkpoint": (peak - base) / size})
    print(f"{a.arch}, hidden {a.hidden}, {a.layers} layers: checkpoint {size / 2**20:.0f} MiB, "
          f"baseline {base / 2**20:.0f} MiB\n\n| verb | peak RSS MiB | x checkpoint |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['verb']} | {r['peak_rss_mib']:.0f} | {r['x_checkpoint']:.2f} |")
    if a.out:
        from mamba_deploy.atomic import write_json  # a temporary name, then renamed

        write_json(a.out, {"arch": a.arch, "hidden": a.hidden, "layers": a.layers,
                           "checkpoint_bytes": size, "src": a.src, "rows": rows})


if __name__ == "__main__":
    main()
