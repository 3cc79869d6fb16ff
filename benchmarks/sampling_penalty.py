"""Per-token cost of the sampling loop (generation.Rows: what generate and serve run) against the
context's length, with and without a repetition penalty. No model: fixed random logits.

    python benchmarks/sampling_penalty.py [--prompts 1000,16000,64000,200000] [--tokens 200] [--out FILE]

The penalty reads a (b, V) mask of the tokens seen, so its cost should not grow with the prompt
(before the thirty-sixth session it rebuilt a (b, prompt + output) id tensor every step).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mamba_deploy.generation import Rows, SamplingConfig  # noqa: E402


def ms_per_token(prompt: int, tokens: int, penalty: float, batch: int, vocab: int = 32000) -> float:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(batch)]
    rows = Rows(ids, None, torch.tensor([], dtype=torch.long), [])
    cfg = SamplingConfig(0.8, 0, 1.0, 0.0, penalty)
    logits = torch.randn(batch, vocab, generator=g)
    t = time.perf_counter()
    for _ in range(tokens):
        rows.push(rows.sample(logits, cfg, None, vocab))
    return (time.perf_counter() - t) / tokens * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="1000,16000,64000,200000")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for p in (int(x) for x in args.prompts.split(",")):
        off, on = (ms_per_token(p, args.tokens, pen, args.batch) for pen in (1.0, 1.1))
        rows.append({"prompt_tokens": p, "ms_per_token_no_penalty": round(off, 3),
                     "ms_per_token_penalty_1.1": round(on, 3), "ratio": round(on / off, 2)})
    print("| prompt tokens | ms/token, penalty 1.0 | ms/token, penalty 1.1 | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['prompt_tokens']} | {r['ms_per_token_no_penalty']} | {r['ms_per_token_penalty_1.1']} | "
              f"{r['ratio']} |")
    if args.out:
        from mamba_deploy.atomic import write_json  # a temporary name, then renamed

        write_json(args.out, {"batch": args.batch, "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
