"""GPU benchmark: this project vs mamba_ssm vs transformers, random bf16 weights, one run.

    python benchmarks/gpu.py --out results.json [--quick] [--systems ours,mamba_ssm,transformers]

Each (system, model) runs in its own subprocess (`--worker`), so memory is freed between them and
transformers never sees mamba_ssm (it would switch to mamba_ssm's kernels if it could import
them). mamba_ssm is found through MAMBA_SSM_PATH (default: the unpacked sdist under .gpu/); its
Mamba1 scan needs a CUDA build that is absent, so Mamba1 is compared with transformers and the
bandwidth floor only. Timings: CUDA events around many repetitions after warm-up, median.
Decode = one replay of each system's CUDA graph (ours: CudaGraphRunner; mamba_ssm: its
`update_graph_cache` graphs); transformers decode = (generate(N2) - generate(N1)) / (N2 - N1).
The SSD kernel case is timed twice: eagerly (host launch time before the first kernel included)
and as a replayed CUDA graph (`ssd_kernel_graph`: GPU time only). Our decode is also timed with a
bfloat16 SSM state (`decode_bN_bf16_state`, MambaLM.set_state_dtype), the state dtype mamba_ssm
keeps by default; our default state is float32.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

# name -> shapes (mamba_ssm / paper sizes; vocab 50277 padded to a multiple of 16, tied head,
# ngroups 1 unless said); Mamba-Codestral-7B: its params.json (8 groups, vocab 32768, untied)
MODELS = {
    "mamba2-2.7b": dict(arch="mamba2", d_model=2560, n_layer=64, d_state=128),
    "mamba2-1.3b": dict(arch="mamba2", d_model=2048, n_layer=48, d_state=128),
    "mamba2-130m": dict(arch="mamba2", d_model=768, n_layer=24, d_state=128),
    "mamba-2.8b": dict(arch="mamba1", d_model=2560, n_layer=64, d_state=16),
    "codestral-7b": dict(arch="mamba2", d_model=4096, n_layer=64, d_state=128, ngroups=8, vocab=32768, tie=False),
}
VOCAB = 50277
SSD_SHAPE = dict(b=4, l=8192, h=80, p=64, n=128, g=1, Q=256)

# (system, model) -> cases; quick mode keeps the first of each list
PLAN = {
    ("ours", "mamba2-2.7b"): ["ssd_kernel", "prefill_1x2048", "prefill_8x4096", "decode_b1", "decode_b32"],
    ("mamba_ssm", "mamba2-2.7b"): ["ssd_kernel", "prefill_1x2048", "prefill_8x4096", "decode_b1", "decode_b32"],
    ("transformers", "mamba2-2.7b"): ["prefill_1x2048", "decode_b1"],
    ("ours", "mamba2-1.3b"): ["decode_b1"],
    ("mamba_ssm", "mamba2-1.3b"): ["decode_b1"],
    ("ours", "mamba2-130m"): ["decode_b1"],
    ("mamba_ssm", "mamba2-130m"): ["decode_b1"],
    ("ours", "mamba-2.8b"): ["prefill_1x512", "prefill_1x2048", "decode_b1", "decode_b32"],
    ("ours", "codestral-7b"): ["prefill_1x2048", "decode_b1", "decode_b32"],
    ("mamba_ssm", "codestral-7b"): ["prefill_1x2048", "decode_b1", "decode_b32"],
    ("transformers", "mamba-2.8b"): ["prefill_1x512", "decode_b1"],
}


# ----------------------------------------------------------------------------- timing helpers

def cuda_time(fn, reps=20, warmup=3):
    """Median milliseconds of fn() over reps, CUDA events around each call."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def graph_time(fn, reps=20):
    """Median ms of fn() replayed from a CUDA graph (one warm-up call, then capture): GPU time
    without the host's launch path."""
    import torch

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return cuda_time(g.replay, reps=reps, warmup=3)


def eager_and_graph_time(fn):
    """(eager ms, CUDA-graph ms) of one SSD call; the graph time is None where fn cannot be captured."""
    eager = cuda_time(fn, reps=20, warmup=3)
    try:
        return eager, graph_time(fn)
    except Exception as e:  # noqa: BLE001 (a library op that cannot be captured)
        print(f"  graph capture failed: {type(e).__name__}: {e}", flush=True)
        return eager, None


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second (the decode floor's ceiling)."""
    import torch

    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = cuda_time(lambda: b.copy_(a), reps=10)
    return 2 * a.numel() / (ms * 1e-3)


def parse_case(case):
    kind, arg = case.split("_", 1)
    if kind == "prefill":
        b, l = (int(v) for v in arg.split("x"))
        return kind, b, l
    if kind == "decode":
        return kind, int(arg[1:]), None
    return kind, None, None


# ----------------------------------------------------------------------------- ours

def our_model(name):
    import torch

    from mamba_deploy.config import MambaConfig
    from mamba_deploy.model import MambaLM

    s = MODELS[name]
    cfg = MambaConfig(arch=s["arch"], d_model=s["d_model"], n_layer=s["n_layer"], vocab_size=s.get("vocab", VOCAB),
                      pad_vocab_size_multiple=16, d_state=s["d_state"], ngroups=s.get("ngroups", 1),
                      tie_embeddings=s.get("tie", True))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MambaLM(cfg).to(torch.bfloat16)
    randomize(model)
    return model.eval()


def randomize(model):
    """Random weights with realistic magnitudes (A in [-16, -1], dt ~ 0.001..0.1)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p, dtype=torch.float32).uniform_(1, 16)))
            elif "dt_bias" in name or name.endswith("dt_proj.bias"):
                dt = torch.exp(torch.empty_like(p, dtype=torch.float32).uniform_(math.log(1e-3), math.log(0.1)))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "norm" in name or name.endswith(".D"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.02)


def run_ours(name, cases):
    import torch

    from mamba_deploy.cuda_graph import CudaGraphRunner

    out = {}
    V = MODELS[name].get("vocab", VOCAB)
    model = our_model(name)
    out["params"] = model.num_parameters()
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    runner = CudaGraphRunner(model)
    for case in cases:
        kind, b, l = parse_case(case)
        if kind == "ssd":
            out[case], out[case + "_graph"] = ssd_kernel_ours()
        elif kind == "prefill":
            ids = torch.randint(0, V, (b, l), device="cuda")
            state = model.new_state(b)

            def f():
                state.zero_()
                with torch.inference_mode():
                    model(ids, state, num_logits_to_keep=1)
            out[case] = cuda_time(f, reps=5 if b * l > 10000 else 10, warmup=2)
        else:
            state = runner.new_state(b)
            runner.step(torch.randint(0, V, (b,)), state)  # captures
            out[case] = cuda_time(lambda: runner.replay(b), reps=200, warmup=10)
            out[case + "_state_bytes"] = state.conv.numel() * 2 + state.ssm.numel() * 4
            # the same step with a bfloat16 SSM state (what mamba_ssm keeps by default)
            model.set_state_dtype(torch.bfloat16)
            half = CudaGraphRunner(model)
            half.step(torch.randint(0, V, (b,)), half.new_state(b))
            out[case + "_bf16_state"] = cuda_time(lambda: half.replay(b), reps=200, warmup=10)
            out[case + "_bf16_state_bytes"] = state.conv.numel() * 2 + state.ssm.numel() * 2
            model.set_state_dtype(None)
            del half
            if runner._plan.fusion(b).gated_mixer:  # the same graph without the one-launch mixer
                plain = CudaGraphRunner(model)
                os.environ["MAMBA_DEPLOY_FUSED_DECODE"] = "0"  # read by ops.decode_fusion at capture
                try:
                    plain.step(torch.randint(0, V, (b,)), plain.new_state(b))
                finally:
                    del os.environ["MAMBA_DEPLOY_FUSED_DECODE"]
                out[case + "_unfused"] = cuda_time(lambda: plain.replay(b), reps=200, warmup=10)
                del plain
        print(f"  ours {name} {case}: {out[case]:.3f} ms", flush=True)
    return out


def ssd_inputs(dtype):
    import torch

    s = SSD_SHAPE
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(s["b"], s["l"], s["h"], s["p"], device="cuda", generator=g).to(dtype)
    dt = (torch.randn(s["b"], s["l"], s["h"], device="cuda", generator=g) * 0.5 - 2).to(dtype)
    A = -torch.exp(torch.rand(s["h"], device="cuda", generator=g) * 2)
    B = torch.randn(s["b"], s["l"], s["g"], s["n"], device="cuda", generator=g).to(dtype)
    C = torch.randn(s["b"], s["l"], s["g"], s["n"], device="cuda", generator=g).to(dtype)
    D = torch.randn(s["h"], device="cuda", generator=g)
    dtb = torch.randn(s["h"], device="cuda", generator=g) * 0.5
    h0 = torch.randn(s["b"], s["h"], s["p"], s["n"], device="cuda", generator=g)
    return x, dt, A, B, C, D, dtb, h0


def ssd_kernel_ours():
    import torch

    from mamba_deploy.ops.triton_ssd import ssd

    x, dt, A, B, C, D, dtb, h0 = ssd_inputs(torch.bfloat16)
    f = lambda: ssd(x, dt, A, B, C, D, dtb, h0, SSD_SHAPE["Q"])  # noqa: E731
    return eager_and_graph_time(f)


# ----------------------------------------------------------------------------- mamba_ssm

def import_mamba_ssm():
    path = os.environ.get("MAMBA_SSM_PATH") or next(iter(sorted(glob.glob(os.path.join(ROOT, ".gpu", "mamba_ssm-*")))), None)
    if path:
        sys.path.insert(0, path)
    # its package __init__ imports the Mamba1 CUDA extension, which is not built here; the
    # Mamba2 path never calls it
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    import mamba_ssm  # noqa: F401

    return path


def run_mamba_ssm(name, cases):
    import torch

    import_mamba_ssm()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.generation import update_graph_cache

    s = MODELS[name]
    V = s.get("vocab", VOCAB)
    cfg = MambaConfig(d_model=s["d_model"], n_layer=s["n_layer"], d_intermediate=0, vocab_size=V,
                      ssm_cfg={"layer": "Mamba2", "d_state": s["d_state"], "ngroups": s.get("ngroups", 1),
                               "use_mem_eff_path": False},
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16,
                      tie_embeddings=s.get("tie", True))
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    randomize(model)
    out = {"params": sum(p.numel() for p in model.parameters())}
    for case in cases:
        kind, b, l = parse_case(case)
        if kind == "ssd":
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            x, dt, A, B, C, D, dtb, h0 = ssd_inputs(torch.bfloat16)
            f = lambda: mamba_chunk_scan_combined(  # noqa: E731
                x, dt, A, B, C, SSD_SHAPE["Q"], D=D, dt_bias=dtb, dt_softplus=True, initial_states=h0,
                return_final_states=True)
            out[case], out[case + "_graph"] = eager_and_graph_time(f)
        elif kind == "prefill":
            ids = torch.randint(0, V, (b, l), device="cuda")

            def f():
                with torch.inference_mode():
                    model(ids, num_last_tokens=1)
            out[case] = cuda_time(f, reps=5 if b * l > 10000 else 10, warmup=2)
        else:
            with torch.inference_mode():
                cache = update_graph_cache(model, None, b, 16, 64)
                ids = torch.randint(0, V, (b, 1), device="cuda")
                pos = torch.zeros((b, 1), dtype=torch.long, device="cuda")
                out[case] = cuda_time(lambda: cache.run(ids, pos, 16), reps=200, warmup=10)
            del cache
        print(f"  mamba_ssm {name} {case}: {out[case]:.3f} ms", flush=True)
    return out


# ----------------------------------------------------------------------------- transformers

def run_transformers(name, cases):
    import torch
    import transformers

    s = MODELS[name]
    common = dict(hidden_size=s["d_model"], num_hidden_layers=s["n_layer"], vocab_size=VOCAB + 11,
                  state_size=s["d_state"], expand=2, conv_kernel=4, residual_in_fp32=True)
    if s["arch"] == "mamba2":
        cfg = transformers.Mamba2Config(**common, head_dim=64, num_heads=2 * s["d_model"] // 64, n_groups=1,
                                        chunk_size=256)
        cls = transformers.Mamba2ForCausalLM
    else:
        cfg = transformers.MambaConfig(**common)
        cls = transformers.MambaForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = cls(cfg).eval()
    torch.set_default_dtype(torch.float32)
    randomize(model)
    out = {"params": sum(p.numel() for p in model.parameters()), "version": transformers.__version__}
    for case in cases:
        kind, b, l = parse_case(case)
        if kind == "prefill":
            ids = torch.randint(0, VOCAB, (b, l), device="cuda")

            def f():
                with torch.inference_mode():
                    model(ids, use_cache=False)
            out[case] = cuda_time(f, reps=2, warmup=1)
        else:
            ids = torch.randint(0, VOCAB, (b, 8), device="cuda")

            def gen(n):
                with torch.inference_mode():
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            n1, n2 = 2, 18
            out[case] = (cuda_time(lambda: gen(n2), reps=2, warmup=1) - cuda_time(lambda: gen(n1), reps=2, warmup=1)) / (n2 - n1)
        print(f"  transformers {name} {case}: {out[case]:.3f} ms", flush=True)
    return out


WORKERS = {"ours": run_ours, "mamba_ssm": run_mamba_ssm, "transformers": run_transformers}


def worker(system, name, cases):
    import torch

    res = WORKERS[system](name, cases)
    res["device"] = torch.cuda.get_device_name()
    res["torch"] = torch.__version__
    if system == "ours":
        res["copy_bw"] = copy_bandwidth()
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- driver + table

def run_worker(system, name, cases, timeout):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, "--model", name, "--cases", ",".join(cases)]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timeout after {timeout}s", "log": (e.stdout or "")[-2000:] if isinstance(e.stdout, str) else ""}
    sys.stdout.write(p.stdout.replace("RESULT ", "  result ")[-3000:])
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = round(time.time() - t0, 1)
            return res
    return {"error": f"exit {p.returncode}", "log": p.stderr[-3000:]}


def table(results):
    rows = []
    bw = next((r.get("copy_bw") for r in results.values() if r.get("copy_bw")), 4.3e12)
    for (system, name), res in results.items():
        for case, v in res.items():
            if not isinstance(v, float) or case in ("copy_bw", "wall_s") or case.endswith("_bytes"):
                continue
            base = case.replace("_unfused", "").replace("_bf16_state", "")
            kind, b, l = parse_case(base)
            extra = ""
            if kind == "prefill":
                extra = f"{b * l / (v * 1e-3):,.0f} tok/s"
            elif kind == "decode":
                ours = results.get(("ours", name), {})
                wb = ours.get("weight_bytes")
                sb = ours.get(base + ("_bf16_state_bytes" if case.endswith("_bf16_state") else "_state_bytes"), 0)
                if wb:
                    extra = f"floor {(wb + 2 * sb) / bw * 1e3:.3f} ms"
            rows.append((name, case, system, v, extra))
    rows.sort()
    lines = [f"{'model':<13} {'case':<22} {'system':<13} {'ms':>10}  note", "-" * 78]
    for name, case, system, v, extra in rows:
        lines.append(f"{name:<13} {case:<22} {system:<13} {v:>10.3f}  {extra}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--model")
    ap.add_argument("--cases")
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--quick", action="store_true", help="first case of each (system, model) only")
    ap.add_argument("--systems", default="ours,mamba_ssm,transformers")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--timeout", type=int, default=240)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.model, a.cases.split(","))
    systems, models = a.systems.split(","), a.models.split(",")
    results = {}
    for (system, name), cases in PLAN.items():
        if system in systems and name in models:
            print(f"== {system} {name}: {cases[:1] if a.quick else cases}", flush=True)
            results[(system, name)] = run_worker(system, name, cases[:1] if a.quick else cases, a.timeout)
            save(results, a.out)  # after each worker, so a run cut short keeps what it measured
    save(results, a.out)
    print(table(results))
    print(f"wrote {a.out}")


def save(results, path):
    from mamba_deploy.atomic import write_json

    write_json(path, {f"{s}/{m}": r for (s, m), r in results.items()}, indent=1)


if __name__ == "__main__":
    main()
