"""Tolerance gaps found by the twenty-ninth session's review (README "Tolerances"): paths whose
stated limit no test checked, or checked only at one short length. Every check is against an
independent reference (transformers fp32, float64 math) on odd lengths (1, 7, chunk_size + 1, long)
at batch > 1:
- torch in fp16 / bf16 on the CPU (no test at all; bf16's limit is verify's 3e-2: transformers'
  own bf16 Mamba2 is 1.3-2.0e-2 off its fp32 on the same inputs);
- torch fp32 at lengths 1..600, and Mamba2 chunk sizes the CPU SSD caps (256 -> 128) or splits
  unevenly (200): every test config had chunk_size 16, so the cap never ran;
- the C GEMV and RMSNorm against float64 (only whole-model parity covered them);
- llama.cpp F32 / F16 at lengths up to 1000 with decode steps (one length, 29, before);
- left-padded batches with prompts of 1..300 tokens on every CPU backend (<= 20 before).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import KINDS, build_hf_model, needs_llama, rel_err
from mamba_deploy import load_model
from mamba_deploy.generation import left_pad
from mamba_deploy.ops import cpu_kernels
from mamba_deploy.runners import open_runner


# ---------------------------------------------------------------------- torch_16bit_cpu

LENGTHS_16BIT = [1, 7, 17, 300]
STEPS_16BIT = 4


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_16bit_model_vs_transformers_fp32(hf_checkpoint, kind, dtype, tol):
    folder, hf = hf_checkpoint(kind)
    model = load_model(folder, dtype=dtype)
    hf16 = copy.deepcopy(hf).to(dtype)
    rows = []
    for length in LENGTHS_16BIT:
        ids = torch.randint(0, 128, (3, length + STEPS_16BIT), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            want = hf(ids).logits
            theirs = rel_err(hf16(ids).logits.float(), want)
        with torch.inference_mode():
            st = model.new_state(3)
            got = [model(ids[:, :length], state=st).logits.float()]
            got += [model.step(ids[:, t], st).float()[:, None] for t in range(length, length + STEPS_16BIT)]
        ours = rel_err(torch.cat(got, 1)[..., :128], want)
        rows.append((length, ours, theirs))
    print(kind, dtype, [(n, f"ours {a:.1e}", f"transformers-{str(dtype)[6:]} {b:.1e}") for n, a, b in rows])
    assert max(r[1] for r in rows) <= tol, rows


# ---------------------------------------------------------------------- torch_lengths_chunk

FP32_TOL = 1e-4


@pytest.mark.parametrize("kind,chunk", [("mamba", None), ("falcon_mamba", None), ("mamba2", 16), ("mamba2_g2", 16),
                                        ("mamba2", 256), ("mamba2_g2", 200)])
def test_lengths_vs_transformers(kind, chunk, tmp_path):
    over = {} if chunk is None else {"chunk_size": chunk}
    hf = build_hf_model(kind, **over)
    folder = tmp_path / "m"
    hf.save_pretrained(folder)
    model = load_model(folder)
    c = chunk or 16
    lengths = sorted({1, 7, c + 1, 129, 2 * c + 1, 600})
    report = []
    for length in lengths:
        ids = torch.randint(0, 128, (3, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            ref = hf(ids, use_cache=True)
            out = model(ids)
        e = rel_err(out.logits[..., :128], ref.logits)
        report.append((length, e))
    print(kind, chunk, [(n, f"{e:.1e}") for n, e in report])
    assert max(e for _, e in report) <= FP32_TOL, report


# ---------------------------------------------------------------------- c_gemv_rmsnorm

needs_c = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler")


@needs_c
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k", [7, 37, 256, 1001])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_gemv_vs_float64(rows, k, bias, threads):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    n = 67
    x, W = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = cpu_kernels.linear_cpu(x, W, b)
    finally:
        torch.set_num_threads(prev)
    want = x.double() @ W.double().T + (b.double() if bias else 0)
    assert got.shape == (rows, n)
    assert rel_err(got, want) <= 1e-5


@needs_c
@pytest.mark.parametrize("rows", [1, 3, 9, 40])
@pytest.mark.parametrize("d", [7, 32, 1001])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_c_rmsnorm_vs_float64(rows, d, eps):
    g = torch.Generator().manual_seed(rows * 100 + d)
    x, w = torch.randn(rows, d, generator=g) * 3, torch.randn(d, generator=g)
    with torch.inference_mode():
        got = cpu_kernels.rmsnorm_cpu(x, w, eps)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    assert rel_err(got, want) <= 1e-5


# ---------------------------------------------------------------------- llamacpp_lengths

LLAMA_LENGTHS = [1, 7, 17, 257, 1000]
LLAMA_STEPS = 8
LLAMA_TOL = {"f32": 1e-5, "f16": 1e-2}
_ggufs = {}


def _gguf(ckpt, tmp_path_factory, kind, outtype):
    if (kind, outtype) not in _ggufs:
        from mamba_deploy.export.gguf import export_gguf

        folder, _ = ckpt(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ggufs[kind, outtype] = export_gguf(folder, tmp_path_factory.mktemp("g") / f"{kind}-{outtype}.gguf",
                                                outtype=outtype)
    return _ggufs[kind, outtype]


@needs_llama
@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("kind", ["mamba", "mamba2", "mamba2_g2"])
def test_llamacpp_lengths_vs_transformers(ckpt, tmp_path_factory, kind, outtype):
    folder, hf = ckpt(kind)
    path = _gguf(ckpt, tmp_path_factory, kind, outtype)
    model = load_model(folder)
    report = []
    with open_runner(path, "llama.cpp", n_threads=1) as lr:
        for length in LLAMA_LENGTHS:
            ids = torch.randint(0, 100, (3, length + LLAMA_STEPS), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                want = hf(ids).logits.float()
                ref_state = model(ids).state
            got, st = lr.prefill(ids[:, :length], lr.new_state(3))
            errs = [rel_err(got, want[:, :length])]
            for t in range(length, length + LLAMA_STEPS):
                step, st = lr.step(ids[:, t], st)
                errs.append(rel_err(step, want[:, t]))
            s = lr.to_torch_state(st)
            report.append((length, max(errs), rel_err(s.ssm, ref_state.ssm), rel_err(s.conv, ref_state.conv)))
    print(kind, outtype, [(n, f"logits {a:.1e}", f"ssm {b:.1e}", f"conv {c:.1e}") for n, a, b, c in report])
    bad = [r for r in report if max(r[1:]) > LLAMA_TOL[outtype]]
    assert not bad, (kind, outtype, bad)


# ---------------------------------------------------------------------- left_padded_long

PADDED_LENGTHS = (1, 7, 17, 300)
PADDED_STEPS = 4
NEEDS = {"onnx": "onnxruntime", "openvino": "openvino", "llama.cpp": "llama_cpp"}
_padded_ggufs = {}


def _artifact(backend, kind, hf_checkpoint, onnx_export, ckpt, tmp_path_factory):
    if backend in NEEDS:
        pytest.importorskip(NEEDS[backend])
    if backend == "torch":
        return hf_checkpoint(kind)[0]
    if backend in ("onnx", "openvino"):
        return onnx_export(kind)[0]
    if kind not in _padded_ggufs:
        from mamba_deploy.export.gguf import export_gguf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _padded_ggufs[kind] = export_gguf(ckpt(kind)[0], tmp_path_factory.mktemp("lp") / "m.gguf", outtype="f32")
    return _padded_ggufs[kind]


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "mamba2_g2", "mamba2_dtlimit"])
@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino", "llama.cpp"])
def test_long_left_padded_batch_vs_each_prompt_alone(backend, kind, hf_checkpoint, onnx_export, ckpt,
                                                     tmp_path_factory):
    if backend == "llama.cpp" and kind == "mamba2_dtlimit":
        pytest.skip("llama.cpp ignores time_step_limit (documented)")
    folder, hf = hf_checkpoint(kind)
    model = load_model(folder)
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(1, 100, (n,), generator=g).tolist() for n in PADDED_LENGTHS]
    nxt = torch.randint(1, 100, (len(prompts), PADDED_STEPS), generator=g)
    path = _artifact(backend, kind, hf_checkpoint, onnx_export, ckpt, tmp_path_factory)
    ids, mask = left_pad(prompts)
    L = ids.shape[1]
    errs = []
    with open_runner(path, backend) as r:
        got, st = r.prefill(ids, r.new_state(len(prompts)), attention_mask=mask)
        steps = []
        for t in range(PADDED_STEPS):
            s, st = r.step(nxt[:, t], st)
            steps.append(s)
        state = r.to_torch_state(st)
    for i, p in enumerate(prompts):
        full = torch.tensor([p + nxt[i].tolist()])
        with torch.no_grad():
            want = hf(full).logits.float()[0]
            alone = model(full).state
        n = len(p)
        e_pre = rel_err(got[i, L - n:, :want.shape[-1]], want[:n])
        e_step = max(rel_err(steps[t][i, :want.shape[-1]], want[n + t]) for t in range(PADDED_STEPS))
        e_ssm = rel_err(state.ssm[:, i], alone.ssm[:, 0])
        e_conv = rel_err(state.conv[:, i], alone.conv[:, 0])
        errs.append((n, e_pre, e_step, e_ssm, e_conv))
    print(backend, kind, [(e[0], *(f"{x:.1e}" for x in e[1:])) for e in errs], "(len, prefill, steps, ssm, conv)")
    bad = [e for e in errs if max(e[1:]) > FP32_TOL]
    assert not bad, (backend, kind, bad)
