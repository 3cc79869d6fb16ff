"""Gaps a mutation-testing review found (forty-fourth review): plausible bugs no test caught.

Each test compares against a reference independent of the code under test: float64 GPTQ written
here, transformers, gguf-py's own key and tensor-name tables, the operating system's own
file-creation mode, mamba_ssm's documented config defaults, or README's documented verify table.
The eighth gap (ONNX of Mamba2 with two groups and the gated norm) is covered by
tests/test_parity_mamba2_variants_f64.py's ONNX test, which now takes every variant.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import torch

from conftest import post_json, start_server

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. GPTQ damping

def _reference_gptq_f64(W, H, group_size: int, damp: float, scale_dtype):
    """GPTQ (Frantar et al. 2022, Algorithm 1) in float64, one column at a time: symmetric int4
    codes in [-7, 7]; each group's scale = amax / 7 of the error-updated weights at the group's
    first column (rounded to the stored scale dtype, floored at float16's smallest subnormal), the
    Hessian damped by damp * mean(diag H) * I, and the upper Cholesky factor of its inverse."""
    W = W.double().clone()
    H = H.double()
    out_f, in_f = W.shape
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(in_f, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    Q = torch.zeros(out_f, in_f, dtype=torch.int64)
    scales = torch.zeros(out_f, in_f // group_size, dtype=torch.float64)
    for i in range(in_f):
        if i % group_size == 0:
            amax = W[:, i:i + group_size].abs().amax(1)
            s = (amax / 7).clamp_min(2.0**-24).to(scale_dtype).double()
            scales[:, i // group_size] = s
        s = scales[:, i // group_size]
        q = torch.round(W[:, i] / s).clamp(-7, 7)
        err = (W[:, i] - q * s) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        Q[:, i] = q.long()
    return Q, scales


def test_gptq_damps_the_hessian_on_its_first_try_like_float64_gptq():
    """Guards GPTQ's damping (algos._hessian_inverse_factor): with the damping term left out of the
    first Cholesky attempt, a rank-deficient Hessian (48 samples of 64 inputs) is inverted undamped
    (float32 garbage) or only after a 10x larger damping, and the codes move. Reference: GPTQ
    written here in float64 from the paper (H + damp * mean(diag H) * I, upper Cholesky of its
    inverse, per-group grids at each group's first column). Only the grid's definition (qrange
    [-7, 7], scale = amax / 7 rounded to formats.SCALE_DTYPE) is taken from the format, which
    defines it. >= 99% of the codes must agree (float32 vs float64 rounding may flip a few at
    a rounding boundary) and the reconstruction objective ||X (Wq - W)^T||^2 within 1%."""
    from mamba_deploy.quant import algos, formats

    g = torch.Generator().manual_seed(44)
    X = torch.randn(48, 64, generator=g, dtype=torch.float64)
    w = (torch.randn(16, 64, generator=g) * 0.1).float()
    H = 2 * X.T @ X / X.shape[0]
    assert int(torch.linalg.matrix_rank(H)) == 48  # singular: the damping is what makes it invertible
    assert formats.qrange(4, True) == (-7, 7)
    want_q, want_s = _reference_gptq_f64(w, H, 32, 0.01, formats.SCALE_DTYPE)
    got = algos.gptq(w, H.float(), 32, True, damp=0.01)
    got_q = formats.unpack_int4(got["qweight"], True).long()
    agree = float((got_q == want_q).double().mean())
    assert agree >= 0.99, f"only {agree:.1%} of GPTQ's codes equal float64 GPTQ's"

    def objective(wq):
        return float(((X @ (wq.double() - w.double()).T) ** 2).sum())

    got_obj = objective(formats.decode(got, "int4", 32, True))
    want_obj = objective(want_q.double().reshape(16, 2, 32).mul(want_s[..., None]).reshape(16, 64))
    assert abs(got_obj / want_obj - 1) <= 0.01, (got_obj, want_obj)


# ----------------------------------------------------------------------------- 2. README's verify table

def _readme_verify_table() -> list[tuple[str, dict]]:
    """README's verify tolerance table (header `| row | logits_rel <= | state_rel <= | top1 >= |
    ppl_rel <= |`), every row in order: (row name, its four limits). A row's first cell is its
    name, optionally followed by aliases in parentheses (`int8 (Q8_0, W8A8)`)."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    header = [i for i, line in enumerate(lines)
              if re.match(r"\|\s*row\s*\|\s*logits_rel\s*<=\s*\|\s*state_rel\s*<=\s*\|\s*top1\s*>=\s*\|"
                          r"\s*ppl_rel\s*<=\s*\|\s*$", line)]
    assert len(header) == 1, f"README has {len(header)} verify tolerance tables"
    i = header[0] + 1
    assert re.match(r"\|[\s|:-]+\|\s*$", lines[i]), lines[i]  # the separator row
    rows = []
    for line in lines[i + 1:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 5, line
        name = cells[0].split()[0]
        rows.append((name, dict(zip(("logits_rel", "state_rel", "top1", "ppl_rel"), map(float, cells[1:])))))
    return rows


def test_readme_verify_table_equals_the_tolerances_verify_applies():
    """Guards TOLERANCES against drifting from what README promises users (e.g. int8's row loosened
    to q6's values: still monotone, so no ordering test sees it). Reference: README's table, read
    by a parser written here (tests/test_review_docs.py's regex skips the fp8 row): every README row
    equals TOLERANCES[row] exactly, and README lists every row of TOLERANCES, in its order."""
    from mamba_deploy.tolerances import TOLERANCES

    rows = _readme_verify_table()
    names = [n for n, _ in rows]
    assert len(set(names)) == len(names), names
    assert names == list(TOLERANCES), (names, list(TOLERANCES))
    for name, limits in rows:
        assert limits == {k: float(v) for k, v in TOLERANCES[name].items()}, (name, limits, TOLERANCES[name])


# ----------------------------------------------------------------------------- 3. mamba_ssm defaults

# mamba_ssm 2.x's documented defaults: mamba_ssm/models/config_mamba.py (MambaConfig dataclass),
# mixer_seq_simple.py (MixerModel norm_epsilon), modules/mamba_simple.py (Mamba),
# modules/mamba2.py (Mamba2)
MAMBA_SSM_MODEL_DEFAULTS = dict(pad_vocab_size_multiple=8, tie_embeddings=True, residual_in_fp32=True,
                                rms_norm_eps=1e-5)
MAMBA_SSM_MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, conv_bias=True, bias=False)
MAMBA_SSM_MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                                 rmsnorm=True, norm_before_gate=False, conv_bias=True, bias=False)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_minimal_mamba_ssm_configs_take_mamba_ssms_defaults(layer):
    """Guards the mamba_ssm dialect's defaults (config.py _from_mamba_ssm): a config.json as
    mamba_ssm's save_pretrained writes it may leave out any field at its default, so a wrong
    default (pad_vocab_size_multiple 1 instead of 8, tie_embeddings / residual_in_fp32 False)
    builds a different model (an embedding of 125 rows where mamba_ssm has 128, an untied head).
    Reference: mamba_ssm 2.x's documented defaults, stated above as constants (mamba_ssm is not
    installed here); rms_norm true is mamba_ssm's default and the only norm supported. Mamba1's
    dt_rank "auto" is ceil(d_model / 16) (mamba_simple.py), so d_model 40 gives 3, not 2."""
    from mamba_deploy.config import MambaConfig

    d_model = 40 if layer == "Mamba1" else 64  # Mamba2: d_inner 128 = 2 heads of 64
    ssm_cfg = {} if layer == "Mamba1" else {"layer": "Mamba2"}
    cfg = MambaConfig.from_dict({"d_model": d_model, "n_layer": 2, "vocab_size": 125, "ssm_cfg": ssm_cfg})
    assert cfg.arch == ("mamba1" if layer == "Mamba1" else "mamba2")
    modules = MAMBA_SSM_MAMBA1_DEFAULTS if layer == "Mamba1" else MAMBA_SSM_MAMBA2_DEFAULTS
    for name, want in {**MAMBA_SSM_MODEL_DEFAULTS, **modules}.items():
        assert getattr(cfg, name) == want, (layer, name, getattr(cfg, name), want)
    assert cfg.vocab_size == 125 and cfg.padded_vocab_size == 128  # 125 rounded up to a multiple of 8
    assert cfg.d_inner == 2 * d_model
    if layer == "Mamba1":
        assert cfg.resolved_dt_rank == math.ceil(40 / 16) == 3
    else:
        assert cfg.nheads == 2
        assert tuple(cfg.dt_limit) == (0.0, math.inf)  # Mamba2's dt_limit=(0.0, float("inf"))


# ----------------------------------------------------------------------------- 4. streamed finish_reason

def _hf_greedy(hf, prompt, n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: a full forward per token, no cache."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def test_streamed_finish_reason_is_each_prompts_own(hf_checkpoint, request):
    """Guards the stream's final chunks (serve.py _stream): each prompt's last chunk must carry its
    own finish_reason; a stream that sent row 0's for every row told a client a prompt cut off at
    max_tokens had stopped. Reference: transformers' greedy decoding of the same checkpoint picks
    a stop token t that is prompt A's first greedy token and none of prompt B's first 4, so A must
    end "stop" (no tokens) and B "length" (its 4 transformers tokens)."""
    from mamba_deploy.runners import open_runner

    folder, hf = hf_checkpoint("mamba")
    g = torch.Generator().manual_seed(4404)
    pick = None
    for _ in range(20):
        a = torch.randint(0, 128, (5,), generator=g).tolist()
        b = torch.randint(0, 128, (3,), generator=g).tolist()
        t = _hf_greedy(hf, a, 1)[0]
        b_tokens = _hf_greedy(hf, b, 4)
        if t not in b_tokens:
            pick = a, b, t, b_tokens
            break
    assert pick is not None, "no prompt pair found"
    a, b, t, b_tokens = pick
    server = start_server(open_runner(folder, "torch"), request)
    status, headers, data = post_json(server, {"prompt": [a, b], "max_tokens": 4, "temperature": 0, "stream": True,
                                               "stop_token_ids": [t], "ignore_eos": True})
    assert status == 200, data
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    chunks = [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e and e != "data: [DONE]"]
    per = {0: [], 1: []}
    for c in chunks:
        for choice in c["choices"]:
            per[choice["index"]].append(choice)
    assert per[0][-1]["finish_reason"] == "stop", per[0]
    assert per[1][-1]["finish_reason"] == "length", per[1]
    assert [x for c in per[0] for x in c["token_ids"]] == []
    assert [x for c in per[1] for x in c["token_ids"]] == b_tokens
    assert all(c["finish_reason"] is None for i in (0, 1) for c in per[i][:-1])


# ----------------------------------------------------------------------------- 5. output file mode

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_new_output_files_get_the_umasks_mode_not_mkstemps_0600(tmp_path, mask, mode):
    """Guards atomic_file's chmod after mkstemp: without it every new output (configs, reports,
    exported files) stays 0600, unreadable by the group / others a umask would let read it.
    Reference: the operating system's own mode for a file created with open(O_CREAT, 0666) under
    the same umask (the shell's `>`, `cp`), and the arithmetic 0666 & ~umask."""
    from mamba_deploy import atomic

    old = os.umask(mask)
    try:
        atomic.write_text(tmp_path / "new.txt", "x")
        fd = os.open(tmp_path / "by_the_os.txt", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    want = stat.S_IMODE(os.stat(tmp_path / "by_the_os.txt").st_mode)
    assert want == mode == 0o666 & ~mask
    got = stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode)
    assert got == want, (oct(got), oct(want))
    assert (tmp_path / "new.txt").read_text() == "x"


# ----------------------------------------------------------------------------- 6. GGUF keys vs gguf-py

def _gguf_py_keys(arch: str) -> set[str]:
    """Every metadata key gguf-py's gguf.Keys tables define, formatted for `arch`."""
    import gguf

    keys = set()
    for group in vars(gguf.Keys).values():
        if isinstance(group, type):
            for value in vars(group).values():
                if isinstance(value, str) and not value.startswith("__"):
                    with_arch = value.replace("{arch}", arch)
                    if "{" not in with_arch:  # per-index keys ({id}, {bid}) are not Mamba's
                        keys.add(with_arch)
    return keys


def _gguf_py_tensor_names(arch_enum, n_layer: int) -> set[str]:
    """Every tensor name gguf-py lists for the architecture (MODEL_TENSORS, TENSOR_NAMES), with
    the .weight / .bias suffixes (ssm_a and ssm_d have none)."""
    import gguf

    names = set()
    for t in gguf.MODEL_TENSORS[arch_enum]:
        base = gguf.TENSOR_NAMES[t]
        for bid in range(n_layer):
            for suffix in ("", ".weight", ".bias"):
                names.add(base.format(bid=bid) + suffix)
    return names


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_gguf_metadata_and_tensor_names_are_in_gguf_pys_tables(ckpt, tmp_path, kind):
    """Guards the GGUF key and tensor names (export/gguf_tables.py): a renamed key (e.g.
    `{arch}.attention.layer_norm_rms_epsilon`) is silently ignored by llama.cpp, which then uses its
    own default or refuses the file. Reference: gguf-py's own tables (gguf.Keys, gguf.MODEL_TENSORS,
    gguf.TENSOR_NAMES; llama.cpp's converter writes through them), read back with gguf.GGUFReader,
    no llama.cpp needed. Keys under this project's own namespace `mamba_deploy.` (which llama.cpp
    ignores by design) are exempt; the keys llama.cpp requires for the architecture must be there."""
    import gguf

    from mamba_deploy.export.gguf import export_gguf

    folder, hf = ckpt(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(folder, tmp_path / f"{kind}.gguf", outtype="f32")
    arch = "mamba" if kind == "mamba" else "mamba2"
    arch_enum = gguf.MODEL_ARCH.MAMBA if kind == "mamba" else gguf.MODEL_ARCH.MAMBA2
    assert gguf.MODEL_ARCH_NAMES[arch_enum] == arch
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == arch
    known = _gguf_py_keys(arch)
    stored = [k for k in r.fields if not k.startswith("GGUF.")]  # GGUF.*: the reader's header fields
    unknown = [k for k in stored if k not in known and not k.startswith("mamba_deploy.")]
    assert not unknown, f"metadata keys gguf-py does not define: {unknown}"
    required = ["context_length", "embedding_length", "block_count", "ssm.conv_kernel", "ssm.inner_size",
                "ssm.state_size", "ssm.time_step_rank", "attention.layer_norm_rms_epsilon"]
    if kind == "mamba2":
        required.append("ssm.group_count")
    missing = [f"{arch}.{k}" for k in required if f"{arch}.{k}" not in r.fields]
    assert not missing, f"keys llama.cpp requires for {arch} are missing: {missing}"
    eps = float(r.fields[f"{arch}.attention.layer_norm_rms_epsilon"].contents())
    assert eps == pytest.approx(hf.config.layer_norm_epsilon, rel=1e-6)
    names = _gguf_py_tensor_names(arch_enum, hf.config.num_hidden_layers)
    odd = [t.name for t in r.tensors if t.name not in names]
    assert not odd, f"tensor names gguf-py does not list for {arch}: {odd}"


# ----------------------------------------------------------------------------- 7. verify's state_rel

def test_verify_state_rel_includes_the_conv_state(hf_checkpoint):
    """Guards verify's state comparison (_state_error): state_rel must cover the conv state too, or
    an artifact whose conv state is wrong (its logits still right for the tokens compared) passes.
    Reference: by construction, an artifact runner identical to the reference except that its
    to_torch_state reports the conv state x1.2 (logits and ssm state exact), so state_rel must be
    max |1.2 c - c| / max |c| = 0.2 (to float32 rounding, 1e-5 relative) and fail the fp32 row."""
    from mamba_deploy import load_model
    from mamba_deploy.runners.torch_runner import TorchRunner
    from mamba_deploy.state import State
    from mamba_deploy.verify import verify

    class ConvScaled(TorchRunner):
        def to_torch_state(self, state):
            s = super().to_torch_state(state)
            return State(s.conv * 1.2, s.ssm)

    folder, _ = hf_checkpoint("mamba")
    ref, art = TorchRunner(load_model(folder)), ConvScaled(load_model(folder))
    report = verify(ref, art, lengths=(1, 7), batches=(1, 2), decode_steps=2, label="fp32", progress=False)
    checks = {c.name: c for c in report.checks}
    # the left-padded case runs the reference one row at a time and the artifact batched: float32
    # rounding apart (2e-7 logits, 5e-7 ssm state seen); every other case is bit-identical
    assert checks["logits_rel"].value <= 1e-5 and checks["logits_rel"].passed
    assert checks["state_rel"].value == pytest.approx(0.2, rel=1e-5), checks["state_rel"]
    assert not checks["state_rel"].passed and not report.passed
    assert [c.name for c in report.checks if not c.passed] == ["state_rel"]
    for case in report.cases:
        for phase in ("state_after_prefill", "state_after_decode"):
            assert case[phase]["ssm"] <= (1e-5 if case.get("left_padded") else 0), (case, phase)
            assert case[phase]["conv"] == pytest.approx(0.2, rel=1e-5), (case, phase)
