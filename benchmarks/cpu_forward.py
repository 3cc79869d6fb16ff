"""This project's PyTorch model vs transformers' pure-PyTorch path, side by side in one run.

130m-shaped random Mamba1 (d_model 768, 24 layers, d_state 16) and Mamba2 (d_model 768,
24 layers, d_state 128, headdim 64), float32, 2 threads: prefill of 512 tokens and greedy decode
ms/token. Prefill is timed twice: returning the last position's logits (what generation needs;
transformers' `logits_to_keep=1`) and returning logits for all 512 positions. Prints a table,
writes JSON.

    python benchmarks/cpu_forward.py [--threads 2] [--prompt-len 512] [--decode 32] [--out benchmarks/results/cpu_forward.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "mamba1-130m": ("MambaConfig", "MambaForCausalLM",
                    dict(hidden_size=768, num_hidden_layers=24, state_size=16, vocab_size=50280, expand=2)),
    "mamba2-130m": ("Mamba2Config", "Mamba2ForCausalLM",
                    dict(hidden_size=768, num_hidden_layers=24, state_size=128, vocab_size=50280, expand=2,
                         head_dim=64, num_heads=24, n_groups=1, chunk_size=256)),
}


def _time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_transformers(hf, ids, n_decode, repeats):
    prefill = _time(lambda: hf(ids, logits_to_keep=1), repeats)
    prefill_all = _time(lambda: hf(ids), repeats)
    out = hf(ids[:, :8], use_cache=True)
    cache, nxt = out.cache_params, out.logits[:, -1:].argmax(-1)

    def decode():
        nonlocal cache, nxt
        for i in range(n_decode):
            o = hf(nxt, cache_params=cache, use_cache=True, cache_position=torch.tensor([8 + i]))
            cache, nxt = o.cache_params, o.logits[:, -1:].argmax(-1)
    return prefill, prefill_all, _time(decode, 1) / n_decode * 1000


def bench_ours(model, ids, n_decode, repeats):
    prefill = _time(lambda: model(ids, num_logits_to_keep=1), repeats)
    prefill_all = _time(lambda: model(ids), repeats)
    state = model.new_state(1)
    nxt = model(ids[:, :8], state=state).logits[:, -1].argmax(-1)

    def decode():
        nonlocal nxt
        for _ in range(n_decode):
            nxt = model.step(nxt, state).argmax(-1)
    return prefill, prefill_all, _time(decode, 1) / n_decode * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layers", type=int, default=None,
                    help="layers of the random models (default 24, the 130m shapes; fewer for a quick smoke run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "cpu_forward.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    from mamba_deploy import load_model

    rows = []
    for name in args.shapes.split(","):
        cfg_cls, model_cls, kw = SHAPES[name]
        kw = {**kw, **({"num_hidden_layers": args.layers} if args.layers is not None else {})}
        torch.manual_seed(0)
        hf = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = load_model(d)
        ids = torch.randint(0, 50280, (1, args.prompt_len))
        with torch.inference_mode():
            t_pre, t_all, t_dec = bench_transformers(hf, ids, args.decode, args.repeats)
            o_pre, o_all, o_dec = bench_ours(ours, ids, args.decode, args.repeats)
        rows.append(dict(model=name if args.layers is None else f"{name} ({args.layers} layers)", prompt_len=args.prompt_len, threads=args.threads,
                         transformers_prefill_s=t_pre, ours_prefill_s=o_pre, prefill_speedup=t_pre / o_pre,
                         transformers_prefill_all_logits_s=t_all, ours_prefill_all_logits_s=o_all,
                         prefill_all_logits_speedup=t_all / o_all,
                         transformers_decode_ms=t_dec, ours_decode_ms=o_dec, decode_speedup=t_dec / o_dec))
        del hf, ours
    n = args.prompt_len
    print(f"\n| model | prefill-{n} transformers (s) | ours (s) | x | prefill-{n}, all logits: transformers (s) "
          f"| ours (s) | x | decode transformers (ms/token) | ours | x |")
    print("| --- " * 10 + "|")
    for r in rows:
        print(f"| {r['model']} | {r['transformers_prefill_s']:.3f} | {r['ours_prefill_s']:.3f} | "
              f"{r['prefill_speedup']:.2f} | {r['transformers_prefill_all_logits_s']:.3f} | "
              f"{r['ours_prefill_all_logits_s']:.3f} | {r['prefill_all_logits_speedup']:.2f} | "
              f"{r['transformers_decode_ms']:.1f} | {r['ours_decode_ms']:.1f} | {r['decode_speedup']:.2f} |")
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0],
                machine=platform.machine(), cpu_count=os.cpu_count(), load_avg=os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    tmp.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
