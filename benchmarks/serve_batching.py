"""`serve` under concurrent clients: continuous batching (--max-num-seqs N) against one request
at a time (--max-num-seqs 1), side by side in one run. C clients each send one completion
request at once (a `prompt`-token id prompt, greedy, `max_tokens` new tokens, no stop token, so
every request makes all its tokens) over HTTP from a client process; per setting: wall time
until the last answer, completion tokens per second over that time, and the mean and worst
request latency. Settings alternate within each round, so a drifting host moves both alike;
the ratio is batched / one-at-a-time throughput, per round, median over rounds. Each (model,
backend) runs in a process of its own, where one server serves every round (its scheduler's
row limit set between rounds): torch's and llama.cpp's OpenMP pools belong to the calling
thread (one libgomp for both), and llama.cpp decoded 40-75 % slower on 2 cores in a process
where another thread had run torch work (the export, a server per round). The parent process
builds the checkpoints and exports; the serving processes only open them, and run the model
in their main thread (serve_forever's, as `mamba-deploy serve` does).

CPU: 130m-shaped random models (cpu_backends.py's shapes) through the torch, ONNX Runtime and
llama.cpp (F32 GGUF) runners. GPU: `--device cuda --dtype bf16 --shape mamba2-2.7b` (benchmarks/gpu.py's shapes)
through the torch runner (CUDA-graph decode).

`--prompt-lengths 8,512`: mixed prompt lengths, cycled over the clients (client i gets the i-th
modulo their number), instead of `--prompt` for all; the clients then stream, and each round
also reports the median time to first token per prompt length (a short prompt's wait behind a
long one's prefill is what the scheduler's prefill rules change), and runs the batched setting
again with those rules undone (VARIANTS: one prefill group at a time, as before
`batching.MAX_PREFILLS`; and also every prompt padded to its group's longest, as before
`batching.MAX_PAD_WASTE`), side by side.

    python benchmarks/serve_batching.py [--backends torch,onnx,llama.cpp] [--archs mamba1,mamba2] [--clients 8]
        [--max-tokens 64] [--prompt 32 | --prompt-lengths 8,512] [--rounds 3] [--threads 2] --out FILE
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mamba_deploy.atomic import write_json  # noqa: E402
from mamba_deploy.cli import DTYPES  # noqa: E402
from mamba_deploy.serve import make_server  # noqa: E402


def one_round(server, seqs: int, prompts, max_tokens: int, stream: bool = False) -> dict:
    """All clients at once (from a process of their own, so that they take no GIL from the
    server), the server's scheduler admitting at most `seqs` rows together."""
    server.scheduler.max_rows = seqs  # read at each admission; the same model thread throughout (see main)
    server.scheduler.batch_sizes.clear()
    server.scheduler.seconds.clear()
    host, port = server.server_address[:2]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(dict(host=host, port=port, prompts=prompts, max_tokens=max_tokens, stream=stream), f)
    try:
        done = subprocess.run([sys.executable, __file__, "--clients-from", f.name], stdout=subprocess.PIPE,
                              text=True, check=True)
    finally:
        os.unlink(f.name)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return dict(res, step_batches=dict(sorted(server.scheduler.batch_sizes.items())),
                scheduler_seconds=dict(server.scheduler.seconds))


def _read_stream(resp, t: float) -> tuple[int, float | None]:
    """A completion's server-sent events -> (tokens, seconds from t to the first token)."""
    tokens, first = 0, None
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        ids = json.loads(line[6:])["choices"][0]["token_ids"]
        if ids and first is None:
            first = time.perf_counter() - t
        tokens += len(ids)
    return tokens, first


def run_clients(spec_file: str) -> dict:
    """--clients-from: one thread per prompt, all released at once; -> wall time, tokens, latencies
    (and with streaming, the median time to first token per prompt length)."""
    spec = json.loads(Path(spec_file).read_text())
    latency, made, errors, ttft = [], [], [], {}
    go = threading.Barrier(len(spec["prompts"]) + 1)

    def client(p):
        conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=600)
        body = json.dumps({"prompt": p, "max_tokens": spec["max_tokens"], "temperature": 0, "stream": spec["stream"]})
        go.wait()
        t = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            errors.append(json.loads(resp.read()))
        elif spec["stream"]:
            n, first = _read_stream(resp, t)
            made.append(n)
            ttft.setdefault(len(p), []).append(first)
        else:
            made.append(len(json.loads(resp.read())["choices"][0]["token_ids"]))
        latency.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(p,)) for p in spec["prompts"]]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"requests failed: {errors[:2]}")
    res = dict(wall_s=wall, tokens=sum(made), tokens_per_s=sum(made) / wall, mean_latency_s=statistics.fmean(latency),
               max_latency_s=max(latency))
    if ttft:
        res["median_ttft_s"] = {n: statistics.median(v) for n, v in sorted(ttft.items())}
    return res


def prepare(arch: str, work: Path, backends) -> dict:
    """The artifacts each backend opens: backend -> path (made in the parent process, so that no
    serving process has run torch work of its own before its model; see the docstring)."""
    from cpu_backends import DEMO, build_checkpoint

    hf = work / "hf"
    build_checkpoint(arch, hf)
    paths = {b: str(hf) for b in backends}
    if "onnx" in backends:
        from mamba_deploy.export.onnx import export_onnx
        paths["onnx"] = str(export_onnx(hf, work / "onnx", validate=False))
    if "llama.cpp" in backends:  # a GGUF carries a tokenizer, the random checkpoints none: the demo model's
        from mamba_deploy.export.gguf import export_gguf
        tok = next(str(p) for p in sorted(DEMO.glob("demo-*")) if (p / "tokenizer.json").exists())
        paths["llama.cpp"] = str(export_gguf(hf, work / "m.gguf", outtype="f32", tokenizer=tok))
    return paths


def open_runners(arch: str, path: str | None, args) -> dict:
    from mamba_deploy.runners import open_runner

    if args.shape:  # benchmarks/gpu.py's random bf16 model on CUDA, CUDA-graph decode
        from gpu import our_model

        from mamba_deploy.cuda_graph import make_runner
        return {"torch": make_runner(our_model(args.shape))}
    b = args.backends
    kw = dict(device=args.device, dtype=DTYPES[args.dtype]) if b == "torch" else {}
    return {b: open_runner(path, b, threads=args.threads, **kw)}


# batched settings with the scheduler's prefill rules undone: name -> batching constants
VARIANTS = {
    "batched, one prefill group at a time": {"MAX_PREFILLS": 1},  # before MAX_PREFILLS
    "batched, groups unbounded, one at a time": {"MAX_PREFILLS": 1, "MAX_PAD_WASTE": float("inf")},  # before both
}


@contextlib.contextmanager
def _variant(setting):
    """The batching module's constants as VARIANTS[setting] says while a round runs (the model
    loop reads them at each admission)."""
    from mamba_deploy import batching

    changes = VARIANTS.get(setting, {})
    kept = {k: getattr(batching, k) for k in changes}
    for k, v in changes.items():
        setattr(batching, k, v)
    try:
        yield
    finally:
        for k, v in kept.items():
            setattr(batching, k, v)


def rows_for(arch: str, path: str | None, args) -> list:
    runners = open_runners(arch, path, args)
    g = torch.Generator().manual_seed(0)
    vocab = min(r.vocab_size for r in runners.values())
    lengths = [int(n) for n in args.prompt_lengths.split(",")] if args.prompt_lengths else [args.prompt]
    prompts = [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(args.clients)]
    stream = bool(args.prompt_lengths)
    rows = []
    for b, runner in runners.items():
        server = make_server(runner, "127.0.0.1", 0, quiet=True, max_num_seqs=args.clients, max_batch=1)
        # settings: rows admitted together, and (mixed lengths) the batched setting again with the
        # scheduler's prefill rules undone one by one (VARIANTS)
        res = {1: [], args.clients: []} | ({v: [] for v in VARIANTS} if stream else {})

        def clients():  # every round from here; the model runs in serve_forever's thread, as in the CLI
            try:
                one_round(server, args.clients, prompts[:2], 4)  # warm-up: graphs captured, sessions touched
                for _ in range(args.rounds):
                    for setting in res:
                        with _variant(setting):
                            seqs = args.clients if setting in VARIANTS else setting
                            res[setting].append(one_round(server, seqs, prompts, args.max_tokens, stream))
            finally:
                server.shutdown()

        driver = threading.Thread(target=clients)
        driver.start()
        server.serve_forever()
        driver.join()
        server.server_close()
        ratios = [b_["tokens_per_s"] / a["tokens_per_s"] for a, b_ in zip(res[1], res[args.clients])]
        rows.append(dict(arch=args.shape or arch, backend=runner.name, clients=args.clients, rounds=res,
                         median_tokens_per_s={s: statistics.median(r["tokens_per_s"] for r in v) for s, v in res.items()},
                         median_mean_latency_s={s: statistics.median(r["mean_latency_s"] for r in v)
                                                for s, v in res.items()},
                         median_ratio=statistics.median(ratios)))
        if stream:  # per setting and prompt length (JSON's keys: strings), the median over rounds
            rows[-1]["median_ttft_s"] = {s: {n: statistics.median(r["median_ttft_s"][n] for r in v)
                                             for n in v[0]["median_ttft_s"]} for s, v in res.items()}
        runner.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="mamba1,mamba2")
    ap.add_argument("--backends", default="torch,onnx,llama.cpp")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    ap.add_argument("--prompt-lengths", default=None,
                    help="mixed prompt lengths cycled over the clients (8,512); the clients stream, and the median "
                         "time to first token per length is reported")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--shape", default=None, help="a benchmarks/gpu.py shape (mamba2-2.7b, ...) instead of --archs")
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=3, metavar=("ARCH", "BACKEND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--clients-from", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.clients_from:
        print(json.dumps(run_clients(args.clients_from)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.out and not args.child:
        ap.error("--out FILE is required")
    if args.child:  # one (arch, backend, artifact) in this process: its rows as JSON on the last line
        arch, args.backends, path = args.child
        print(json.dumps(rows_for(arch, path, args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ([args.shape] if args.shape else args.archs.split(",")):
            backends = ["torch"] if args.shape else args.backends.split(",")
            paths = {"torch": ""} if args.shape else prepare(arch, Path(tmp) / arch, backends)
            for b in backends:  # a fresh process each: no thread pool of another backend around
                cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                       "--child", arch, b, paths[b]]
                done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
                rows += json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{args.clients} concurrent clients, {args.prompt_lengths or args.prompt}-token prompts, "
          f"{args.max_tokens} tokens each, "
          f"{args.rounds} rounds (medians); device {args.device}, {args.threads} threads")
    print(f"| model | backend | one at a time: tokens/s | batched (--max-num-seqs {args.clients}): tokens/s | "
          "ratio | mean latency one at a time -> batched |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        t, lat, n = r["median_tokens_per_s"], r["median_mean_latency_s"], str(args.clients)  # JSON's keys
        print(f"| {r['arch']} | {r['backend']} | {t['1']:.1f} | {t[n]:.1f} | {r['median_ratio']:.2f} | "
              f"{lat['1']:.2f} s -> {lat[n]:.2f} s |")
    for r in rows:
        for setting, by_len in r.get("median_ttft_s", {}).items():
            t = r["median_tokens_per_s"][setting]
            print(f"{r['arch']} {r['backend']} {setting if setting in VARIANTS else '--max-num-seqs ' + setting}: "
                  f"{t:.1f} tokens/s, median time to first token "
                  + ", ".join(f"{n}-token prompts {s:.2f} s" for n, s in by_len.items()))
    write_json(args.out, dict(args=vars(args), load_avg=os.getloadavg(), torch=torch.__version__, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
