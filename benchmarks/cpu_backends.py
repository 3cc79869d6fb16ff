"""CPU backends on 130m-shaped random Mamba1 / Mamba2 models (built from transformers configs, no
download): ONNX Runtime vs this project's PyTorch path vs transformers (and llama.cpp through the
same Runner interface when the GGUF exporter and llama-cpp-python are importable).

Measures, with a fixed thread count and one timed run each: prefill of --prefill tokens (batch 1,
logits of the last position) and greedy decode in ms/token. Prints a table and writes JSON, with
the memory read bandwidth measured before and after the runs: fp32 decode streams every weight
once per token, so weight bytes / bandwidth is the floor any backend's decode can reach.

    .venv/bin/python benchmarks/cpu_backends.py --threads 2 --out benchmarks/results/cpu_backends.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# arch -> transformers config (130m shapes; random weights, so only speed is meaningful)
SHAPES = {
    "mamba1": ("MambaConfig", "MambaForCausalLM",
               dict(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, expand=2,
                    conv_kernel=4, time_step_rank=48)),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM",
               dict(vocab_size=50280, hidden_size=768, state_size=128, num_hidden_layers=24, expand=2,
                    conv_kernel=4, head_dim=64, num_heads=24, n_groups=1, chunk_size=256,
                    tie_word_embeddings=True)),
}
GGUF_TYPES = ("f32", "q8_0", "q4_k_m")
# this project's weight-only quantized checkpoints through the torch Runner (C GEMVs over the
# codes at decode), embeddings / head included like llama.cpp's Q8_0: variant -> quantize() args
TORCH_QUANT = {"int8": ("int8", dict(include=("embeddings", "lm_head"))),
               "int4-g128": ("int4", dict(group_size=128, include=("embeddings", "lm_head")))}
BACKENDS = ("onnxruntime", "torch", "transformers", "llama.cpp")
DEMO = Path(__file__).resolve().parents[1] / "models"
TARGETS = {"decode_ms_per_token": 15.0, "prefill_s": 1.0}  # 2 cores, fp32, 130m shapes


def build_checkpoint(arch: str, folder: Path):
    import transformers

    cfg_name, cls_name, kw = SHAPES[arch]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw)).eval()
    model.save_pretrained(folder)
    return model


class HFRunner:
    """transformers' own model (reference speed), timed through the same two calls."""

    name = "transformers"

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def prefill_time(self, ids) -> float:
        t = time.perf_counter()
        self.model(ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode_ms(self, ids, n: int) -> float:
        """generate(n + 1) - generate(1) over n tokens, so the prefill cancels out."""
        kw = dict(do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        self.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        self.model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)
        t2 = time.perf_counter()
        return ((t2 - t1) - (t1 - t0)) / n * 1000


class Clock:
    """Wall time and this process's CPU time (all threads): on a shared machine the wall time
    includes waiting for cores, the CPU time does not (but includes spin-waiting threads)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def read_bandwidth_gbs(threads: int, mb: int = 512) -> float:
    """Memory read bandwidth: best of 5 sums of a `mb` MB float32 tensor on `threads` threads.
    Decode streams every fp32 weight once per token, so weight bytes / this = the decode floor."""
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def time_runner(runner, ids, n_decode: int) -> dict:
    """Prefill seconds and decode ms/token (wall and CPU) after one short warm-up."""
    st = runner.new_state(1)
    runner.prefill(ids[:, :8], st, last_only=True)  # warm-up (allocations, graph caches)
    st = runner.new_state(1)
    with Clock() as pre:
        logits, st = runner.prefill(ids, st, last_only=True)
    tok = logits[:, -1].argmax(-1)
    for _ in range(2):  # warm decode
        logits, st = runner.step(tok, st)
        tok = logits.argmax(-1)
    with Clock() as dec:
        for _ in range(n_decode):
            logits, st = runner.step(tok, st)
            tok = logits.argmax(-1)
    return dict(prefill_s=pre.wall, decode_ms=dec.wall / n_decode * 1000, prefill_cpu_s=pre.cpu,
                decode_cpu_ms=dec.cpu / n_decode * 1000)


def rows_for(arch: str, work: Path, args) -> list[dict]:
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner

    hf_dir = work / f"{arch}-hf"
    hf_model = build_checkpoint(arch, hf_dir)
    weights_mb = sum(p.numel() * p.element_size() for p in hf_model.parameters()) / 1e6  # tied: once
    ids = torch.randint(0, 50000, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    rows = []

    def add(backend, variant, t: dict):
        rows.append(dict(arch=arch, backend=backend, variant=variant, prefill_tokens=args.prefill, fp32_weights_mb=round(weights_mb, 1),
                         prefill_s=round(t["prefill_s"], 4), decode_ms_per_token=round(t["decode_ms"], 3),
                         prefill_cpu_s=_round(t.get("prefill_cpu_s"), 4),
                         decode_cpu_ms_per_token=_round(t.get("decode_cpu_ms"), 3)))
        print(f"  {arch:<7} {backend:<13} {variant:<7} prefill {t['prefill_s']:7.3f} s  "
              f"decode {t['decode_ms']:7.2f} ms/token", flush=True)

    if "onnxruntime" in args.backends:
        onnx_dir = work / f"{arch}-onnx"
        export_onnx(hf_dir, onnx_dir, validate=False)
        with open_runner(onnx_dir, "onnx", threads=args.threads) as r:
            add("onnxruntime", "fp32", time_runner(r, ids, args.decode))
    if "torch" in args.backends:
        with open_runner(hf_dir, "torch") as r:
            add("torch", "fp32", time_runner(r, ids, args.decode))
        torch_quant_rows(hf_dir, ids, args, add)
    if "transformers" in args.backends and not args.skip_transformers:
        hf = HFRunner(hf_model)
        add("transformers", "fp32", dict(prefill_s=hf.prefill_time(ids), decode_ms=hf.decode_ms(ids[:, :8], args.decode)))
    if "llama.cpp" in args.backends:
        llamacpp_rows(arch, hf_dir, work, ids, args, add)
    return rows


def torch_quant_rows(hf_dir, ids, args, add) -> None:
    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize
    from mamba_deploy.runners.torch_runner import TorchRunner

    for variant, (method, opts) in TORCH_QUANT.items():
        model = load_model(hf_dir)
        quantize(model, method, progress=False, **opts)
        add("torch", variant, time_runner(TorchRunner(model), ids, args.decode))


def llamacpp_rows(arch, hf_dir, work, ids, args, add) -> None:
    """F32 / Q8_0 / Q4_K_M GGUF rows through the llama.cpp Runner, when both pieces import."""
    from mamba_deploy.runners import open_runner

    try:
        from mamba_deploy.export.gguf import export_gguf
        import llama_cpp  # noqa: F401
    except ImportError as e:
        print(f"  {arch:<7} llama.cpp     skipped: {e}")
        return
    # GGUF files carry a tokenizer and the random checkpoints ship none: borrow the demo model's
    tokenizer = next((str(p) for p in sorted(DEMO.glob("demo-*")) if (p / "tokenizer.json").exists()), None)
    for outtype in GGUF_TYPES:
        try:
            with warnings.catch_warnings():  # per-tensor fallback notes of the quantizer
                warnings.simplefilter("ignore")
                path = export_gguf(hf_dir, work / f"{arch}-{outtype}.gguf", outtype=outtype, tokenizer=tokenizer)
            with open_runner(path, "llama.cpp", threads=args.threads) as r:
                add("llama.cpp", outtype.upper(), time_runner(r, ids, args.decode))
        except Exception as e:  # noqa: BLE001  (report and keep benchmarking the rest)
            print(f"  {arch:<7} llama.cpp     {outtype.upper():<7} skipped: {type(e).__name__}: {e}")


def _round(v, n):
    return None if v is None else round(v, n)


def print_table(rows):
    n = rows[0]["prefill_tokens"]
    print(f"\n| arch | backend | variant | prefill-{n} s | decode ms/token | prefill-{n} CPU s | decode CPU ms/token |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        cpu = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("prefill_cpu_s", "decode_cpu_ms_per_token")]
        print(f"| {r['arch']} | {r['backend']} | {r['variant']} | {r['prefill_s']:.3f} | "
              f"{r['decode_ms_per_token']:.2f} | {cpu[0]} | {cpu[1]} |")


def _backends(text: str) -> list[str]:
    """--backends: names of BACKENDS (`onnx`, as the bench verb spells it, for onnxruntime); a name
    that is not one was skipped without a word."""
    names = [{"onnx": "onnxruntime"}.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad or [text]}; choose from {', '.join(BACKENDS)}")
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32, help="decode steps timed")
    p.add_argument("--arch", choices=sorted(SHAPES), action="append")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--backends", type=_backends, default=list(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)} (onnx: onnxruntime)")
    p.add_argument("--layers", type=int, default=None,
                   help="layers of the random models (default 24, the 130m shapes; fewer for a quick smoke run)")
    p.add_argument("--out", default="benchmarks/results/cpu_backends.json")
    args = p.parse_args(argv)
    if args.layers is not None:  # every other width stays the 130m one
        for _, _, kw in SHAPES.values():
            kw["num_hidden_layers"] = args.layers
    torch.set_num_threads(args.threads)
    bandwidth = [round(read_bandwidth_gbs(args.threads), 1)]  # before and after: it drifts on a shared host
    rows = []
    print(f"load average before: {os.getloadavg()}; memory read bandwidth {bandwidth[0]} GB/s on {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or sorted(SHAPES):
            rows += rows_for(arch, Path(tmp), args)
    bandwidth.append(round(read_bandwidth_gbs(args.threads), 1))
    if not rows:
        raise SystemExit("nothing was measured (every backend asked for is missing or skipped); nothing written")
    print_table(rows)
    for arch in sorted({r["arch"] for r in rows}):
        mb = next(r["fp32_weights_mb"] for r in rows if r["arch"] == arch)
        print(f"{arch}: {mb:.0f} MB of fp32 weights -> decode floor {mb / max(bandwidth):.1f}-{mb / min(bandwidth):.1f} "
              f"ms/token at the measured {min(bandwidth)}-{max(bandwidth)} GB/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    meta = dict(threads=args.threads, layers=SHAPES["mamba1"][2]["num_hidden_layers"], python=sys.version.split()[0], torch=torch.__version__,
                onnxruntime=onnxruntime.__version__, cpus=os.cpu_count(), machine=platform.machine(),
                targets=TARGETS, loadavg_at_end=[round(x, 2) for x in os.getloadavg()],
                read_bandwidth_gbs_before_after=bandwidth,
                note="one timed run per row; other processes on the machine inflate times (see loadavg)")
    from mamba_deploy.atomic import write_json  # a temporary name, then renamed

    write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
