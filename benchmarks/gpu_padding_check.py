"""What the fresh-state check of a left-padded prefill costs on the GPU (`Runner.check_padding_on_fresh_state`).

A padded prefill must start from a zero state (padding would decay a state that holds tokens), so
the torch runner checks the padded rows of the live state before running. This times, in one run
and interleaved, on a random bf16 mamba2-2.7b-shaped model (`benchmarks/gpu.py`'s):
  - `prefill`: TorchRunner.prefill of a left-padded batch (every other row one token shorter),
    which runs the check;
  - `prefill, check skipped`: the same call with the check replaced by a no-op;
  - `check alone`: the check on its own;
  - `check by host copy`: the first version of the check, which read `to_torch_state`.

    python3 benchmarks/gpu_padding_check.py --out $OUT/padding_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, repeats: int) -> float:
    """Median ms of `repeats` calls, each synchronised."""
    import torch

    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


def main() -> None:
    import torch

    from gpu import our_model
    from mamba_deploy.runners.torch_runner import TorchRunner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mamba2-2.7b")
    p.add_argument("--batches", default="8,32")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    runner = TorchRunner(our_model(args.model))
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        ids = torch.randint(0, 50000, (b, args.length))
        mask = torch.ones(b, args.length, dtype=torch.long)
        mask[::2, 0] = 0  # every other row one token shorter: left padding
        state = runner.new_state(b)

        def prefill():
            runner.prefill(ids, runner.new_state(b), attention_mask=mask, last_only=True)

        def prefill_unchecked():
            runner.check_padding_on_fresh_state = lambda m, s: None
            try:
                prefill()
            finally:
                del runner.check_padding_on_fresh_state

        def host_copy():
            st = runner.to_torch_state(state)
            rows_ = (mask == 0).any(-1).nonzero()[:, 0].tolist()
            bool(st.conv[:, rows_].any()) or bool(st.ssm[:, rows_].any())

        prefill()  # warm-up (kernels compiled, allocator primed)
        res = {"batch": b, "length": args.length, "state_gib": round(
            sum(t.numel() * t.element_size() for t in (state.conv, state.ssm)) / 2**30, 2)}
        for _ in range(2):  # two interleaved rounds
            for name, fn in (("prefill", prefill), ("prefill, check skipped", prefill_unchecked),
                             ("check alone", lambda: runner.check_padding_on_fresh_state(mask, state)),
                             ("check by host copy", host_copy)):
                res.setdefault(name, []).append(round(timed(fn, args.repeats), 2))
        rows.append(res)
        print(json.dumps(res), flush=True)

    names = ["prefill", "prefill, check skipped", "check alone", "check by host copy"]
    print(f"\n{args.model}, left-padded prefill of {args.length} tokens, ms (median of {args.repeats}, two rounds)\n")
    print("| batch | state GiB | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for r in rows:
        print(f"| {r['batch']} | {r['state_gib']} | " + " | ".join(" / ".join(map(str, r[n])) for n in names) + " |")
    if args.out:
        from mamba_deploy.atomic import write_json  # a temporary name, then renamed

        write_json(args.out, {"model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
