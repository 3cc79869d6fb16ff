"""What cutting special pieces out of the text costs our SentencePiece tokenizer, against
sentencepiece's own encode of the same text, at Mamba-Codestral's scale of specials (~770
"[control_N]" control pieces) on bracket-heavy code, where every "[" could start one.

    python benchmarks/tokenizer_specials.py [--repeats 5] [--out benchmarks/results/tokenizer_specials.json]

Prints a table (median ms of --repeats, both in one process) and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CONTROLS = 770
LINE = "for i in range(n): x[i] = a[i][j] + b[k] # [note]"


def _model() -> bytes:
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["def", "main", "return", "print", "x[i]", "a[0]", "[1,2]", "hello", "world"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)),
        model_writer=buf, vocab_size=1100, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2, control_symbols=[f"[control_{i}]" for i in range(CONTROLS)])
    return buf.getvalue()


def _ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    from mamba_deploy.tokenizer import sentencepiece_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/tokenizer_specials.json")
    args = ap.parse_args(argv)
    tok = sentencepiece_tokenizer(_model())
    sp = tok._tok.sp
    rows = []
    for case, extra in (("no specials in the text", ""), ("one [control_5] per line", " [control_5]")):
        text = "\n".join(LINE + extra for _ in range(3000))
        tok.encode(text)  # warm
        ours, theirs = _ms(lambda: tok.encode(text), args.repeats), _ms(lambda: sp.encode(text), args.repeats)
        rows.append({"case": case, "chars": len(text), "ours_ms": round(ours, 2), "sentencepiece_ms": round(theirs, 2),
                     "ratio": round(ours / theirs, 2)})
    print(f"{CONTROLS} control pieces, median of {args.repeats}")
    print("| text | chars | ours ms | sentencepiece ms | ratio |\n| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['chars']} | {r['ours_ms']} | {r['sentencepiece_ms']} | {r['ratio']} |")
    from mamba_deploy.atomic import write_json  # a temporary name, then renamed

    write_json(args.out, {"controls": CONTROLS, "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
