"""`export onnx --scan-chunk Q` (export_onnx(scan_chunk=Q)): Mamba1's prefill Scan over chunks of
Q tokens in the SSD dual form (onnx_graph._m1_chunk_scan / _chunk_body), checked against
transformers: lengths around the chunk (Q - 1, Q, Q + 1, 2Q + 3, padded to a multiple of Q with
dt = 0) from a zero and from a non-zero state, then a decode step; a left-padded batch; decays that
underflow within a step over 1500 tokens. Also: the op allow-list, onnx.checker and TensorRT's
parser table; the refusals (Mamba2, out-of-range Q) with nothing written; the manifest key (and
manifests without it); the post-export validation and the quantized (MatMulNBits) export on the
chunked graph; and the default export, which must stay the per-token Scan it was."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import build_hf_model, rel_err
from mamba_deploy.cli import main
from mamba_deploy.errors import ConfigError, ExportError
from mamba_deploy.export import onnx_graph
from mamba_deploy.export.onnx import ALLOWED_OPS, MAX_SCAN_CHUNK, export_onnx, graph_op_types
from mamba_deploy.generation import left_pad
from mamba_deploy.runners.onnx_runner import open_onnx

pytest.importorskip("onnxruntime")

FP32_TOL = 1e-4
QS = [4, 5]  # 5: not a power of two


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def chunked(hf_checkpoint, tmp_path_factory):
    """chunked(q) -> (ONNX folder exported with scan_chunk=q and validated, transformers model)
    for the tiny Mamba1; cached."""
    cache = {}

    def make(q):
        if q not in cache:
            folder, hf = hf_checkpoint("mamba")
            cache[q] = (export_onnx(folder, tmp_path_factory.mktemp(f"m1_chunk_{q}") / "out", scan_chunk=q), hf)
        return cache[q]

    return make


def seq_branch(model):
    (branch_if,) = [n for n in model.graph.node if n.op_type == "If"]
    return next(a.g for a in branch_if.attribute if a.name == "else_branch")


def scan_bodies(model):
    scans = [n for n in seq_branch(model).node if n.op_type == "Scan"]
    return [next(a.g for a in n.attribute if a.name == "body") for n in scans]


@pytest.mark.parametrize("q", QS)
def test_lengths_around_the_chunk_match_transformers(chunked, q):
    """Batch 2: a prefill of each length from a zero state, then the same length again from the
    state it left, then one decode step; all against transformers on the whole sequence."""
    out, hf = chunked(q)
    runner = open_onnx(out, threads=2)
    gen = torch.Generator().manual_seed(q)
    for length in (q - 1, q, q + 1, 2 * q + 3):
        ids = torch.randint(0, 128, (2, 2 * length + 1), generator=gen)
        want = hf_logits(hf, ids)
        st = runner.new_state(2)
        first, st = runner.prefill(ids[:, :length], st)
        second, st = runner.prefill(ids[:, length:2 * length], st)
        step, _ = runner.step(ids[:, -1], st)
        got = torch.cat([first, second, step[:, None]], 1)
        assert rel_err(got, want) < FP32_TOL, (q, length)


def test_left_padded_batch_matches_unpadded(chunked):
    """attention_mask: rows with 0, 3 and 11 padded positions (across chunk boundaries) end with the
    logits of their own unpadded prompts."""
    out, hf = chunked(4)
    runner = open_onnx(out)
    prompts = [[5, 9, 17, 33, 2, 8, 1, 4, 70, 3, 11, 6, 40, 2], [7, 3, 99, 1, 4, 4, 60, 2, 9, 12, 30], [1, 8, 3]]
    ids, mask = left_pad(prompts)  # (3, L) each, padding on the left
    got, _ = runner.prefill(ids, runner.new_state(3), attention_mask=mask, last_only=True)
    for i, p in enumerate(prompts):
        assert rel_err(got[i, -1], hf_logits(hf, torch.tensor([p]))[0, -1]) < FP32_TOL, i


def test_long_sequence_large_dt_negative_A_is_stable(tmp_path):
    """dt ~ softplus(6..9), A ~ -(20..200): decays underflow to 0 within a step. exp(cumsum) divided
    out later would give inf/NaN over 1500 tokens; the dual form must stay finite and match."""
    hf = build_hf_model("mamba", seed=3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(np.log(20), np.log(200)))
            if name.endswith("dt_proj.bias"):
                p.copy_(torch.empty_like(p).uniform_(6, 9))
    hf.save_pretrained(tmp_path / "hf")
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx", scan_chunk=8)
    ids = torch.randint(0, 128, (2, 1500), generator=torch.Generator().manual_seed(4))
    runner = open_onnx(out)
    got, _ = runner.prefill(ids, runner.new_state(2))
    assert torch.isfinite(got).all()
    assert rel_err(got, hf_logits(hf, ids)) < FP32_TOL


def test_dt_varying_per_token_keeps_fp32_precision(tmp_path):
    """One large-dt step makes every later in-chunk cumsum of dt A large and negative; decays formed
    as exp(s_t - s_j) from two such cumsums lost most of float32's digits (5.2e-4 at Q = 64 against
    float64, so the export's own validation refused it; the per-token Scan 1.7e-6). Summed as a
    masked cumsum they stay within fp32 tolerance."""
    hf = build_hf_model("mamba", seed=5)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("A_log"):
                p.fill_(np.log(64))
            if name.endswith("dt_proj.weight"):
                p.mul_(100)  # dt swings from ~0 to large from one token to the next
    hf.save_pretrained(tmp_path / "hf")
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx", scan_chunk=64)
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(6))
    runner = open_onnx(out)
    got, _ = runner.prefill(ids, runner.new_state(2))
    with torch.no_grad():
        ref = hf.double()(ids, use_cache=False).logits
    assert rel_err(got, ref) < FP32_TOL


def test_standard_ops_and_one_chunk_scan_per_layer(chunked):
    from mamba_deploy.export.tensorrt import engine_graph, trt_parser_issues

    out, _ = chunked(4)
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert graph_op_types(model) <= ALLOWED_OPS
    assert trt_parser_issues(engine_graph(out)[0]) == []
    bodies = scan_bodies(model)
    assert len(bodies) == 2  # tiny model: 2 layers, one Scan each
    for body in bodies:
        ops = {n.op_type for n in body.node}
        assert "CumSum" in ops and not {"Scan", "Loop", "Div"} & ops  # nothing is divided out
        (mask,) = [t for t in body.initializer if tuple(t.dims) == (4, 4, 1, 1)
                   and np.isinf(onnx.numpy_helper.to_array(t)).any()]  # the causal mask, [t, j]
        assert np.array_equal(np.isinf(onnx.numpy_helper.to_array(mask)[..., 0, 0]), ~np.tri(4, dtype=bool))


# Op counts of the tiny Mamba1's default graph (2 layers, subgraphs included), as exported before
# scan_chunk existed (commit 3fd731f), then without the one-token branch's two mask Muls per
# layer (that branch now runs only for an all-ones mask: And + ReduceMin + Equal in the If's
# condition), then with the prefill softplus's log1p correction (two Subs and an Add per layer,
# forty-second session). A deliberate change to the default graph updates this.
DEFAULT_OPS = {"Add": 42, "And": 1, "Cast": 1, "Concat": 4, "Div": 6, "Equal": 2, "Exp": 6, "Gather": 2,
               "Greater": 1, "If": 1, "Log": 2, "MatMul": 28, "Max": 3, "Min": 2, "Mul": 50, "Pow": 6,
               "ReduceMean": 6, "ReduceMin": 1,
               "Reshape": 7, "Scan": 2, "Shape": 1, "Sigmoid": 8, "Slice": 14, "Softplus": 2, "Split": 8, "Sqrt": 6,
               "Sub": 7, "Transpose": 20, "Unsqueeze": 20, "Where": 1}


def test_default_export_is_the_per_token_scan(onnx_export, chunked):
    """Without scan_chunk (or with 1) the graph is the per-token Scan, node for node; the manifest
    says scan_chunk 1."""
    out, folder, _ = onnx_export("mamba")
    counts = collections.Counter()

    def walk(g):
        for n in g.node:
            counts[n.op_type] += 1
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)

    model = onnx.load(str(out / "model.onnx"))
    walk(model.graph)
    assert dict(counts) == DEFAULT_OPS
    for body in scan_bodies(model):  # h = h exp(dt A) + (dt x) B ; y = C h, one token
        assert [n.op_type for n in body.node] == ["Mul", "Exp", "Mul", "Mul", "Add", "MatMul"]
    assert json.loads((out / "manifest.json").read_text())["scan_chunk"] == 1
    one = chunked(1)[0]  # scan_chunk=1 given explicitly: the same bytes
    assert (one / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_cli_scan_chunk_and_manifest(chunked, hf_checkpoint, tmp_path, capsys):
    """--scan-chunk 4 writes the graph export_onnx(scan_chunk=4) writes and records it in
    manifest.json; a manifest without the key (exports from before it) still opens, a bad
    value does not."""
    folder, _ = hf_checkpoint("mamba")
    assert main(["export", "onnx", str(folder), str(tmp_path / "o"), "--scan-chunk", "4", "--no-validate"]) == 0
    api = chunked(4)[0]
    assert (tmp_path / "o" / "model.onnx").read_bytes() == (api / "model.onnx").read_bytes()
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["scan_chunk"] == 4
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "o", old)
    for value in (None, "4"):
        if value is None:
            del manifest["scan_chunk"]
        else:
            manifest["scan_chunk"] = value
        (old / "manifest.json").write_text(json.dumps(manifest))
        if value is None:
            with open_onnx(old) as r:
                assert r.prefill(torch.tensor([[1, 2, 3, 4, 5]]), r.new_state(1))[0].shape == (1, 5, 128)
        else:
            with pytest.raises(ExportError, match="scan_chunk must be an integer"):
                open_onnx(old)


@pytest.mark.parametrize("value", ["0", str(MAX_SCAN_CHUNK + 1), "2.5"])
def test_cli_refuses_bad_scan_chunk_before_loading(value, hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint("mamba")
    with pytest.raises(SystemExit) as e:
        main(["export", "onnx", str(folder), str(tmp_path / "o"), "--scan-chunk", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --scan-chunk" in err and not (tmp_path / "o").exists()
    if value == str(MAX_SCAN_CHUNK + 1):
        assert "(memory)" in err and "Q*Q*d_state*d_inner" in err


@pytest.mark.parametrize("value,match", [(0, "must be >= 1"), (MAX_SCAN_CHUNK + 1, r"above \d+ \(memory\)"),
                                         (2.0, "must be an integer"), (True, "must be an integer")])
def test_api_refuses_bad_scan_chunk(value, match, hf_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=match):
        export_onnx(hf_checkpoint("mamba")[0], tmp_path / "o", scan_chunk=value)
    assert not (tmp_path / "o").exists()


def test_mamba2_refuses_scan_chunk(hf_checkpoint, tmp_path, capsys):
    """Mamba2's prefill is the loop-free chunked SSD already: scan_chunk != 1 is an error naming
    the value and the model's chunk_size, before anything is written (API and CLI)."""
    folder, _ = hf_checkpoint("mamba2")
    with pytest.raises(ExportError, match=r"--scan-chunk 4 applies to Mamba1 only.*already chunked.*chunk_size, 16"):
        export_onnx(folder, tmp_path / "o", scan_chunk=4)
    assert not (tmp_path / "o").exists()
    assert main(["export", "onnx", str(folder), str(tmp_path / "o"), "--scan-chunk", "3"]) == 2
    assert "--scan-chunk 3 applies to Mamba1 only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_validation_checks_the_chunked_graph(hf_checkpoint, tmp_path, monkeypatch, capsys):
    """The post-export validation runs on the chunked graph: its first prefill spans two chunks
    and ends inside a third (2Q + 3 tokens for Q > 16), and a chunk body without its causal
    mask (future tokens leak into the past) is an ExportError with nothing written."""
    folder, _ = hf_checkpoint("mamba")
    export_onnx(folder, tmp_path / "ok", scan_chunk=20)
    assert "logits[0] len=43 " in capsys.readouterr().out
    real = onnx_graph.MambaGraph._chunk_body

    def unmasked(self, A):
        body = real(self, A)
        for t in body.initializer:
            if tuple(t.dims) == (self.scan_chunk, self.scan_chunk, 1, 1):
                t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(t.dims), np.float32), t.name))
        return body

    monkeypatch.setattr(onnx_graph.MambaGraph, "_chunk_body", unmasked)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_onnx(folder, tmp_path / "bad", scan_chunk=4)
    assert not (tmp_path / "bad").exists()


def test_quantized_export_takes_scan_chunk(hf_checkpoint, tmp_path):
    """A quantized Mamba1 checkpoint: MatMulNBits in both branches and the chunked Scan, validated
    at export (accuracy level 0) and matching the quantized PyTorch model across chunks."""
    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize, save_quantized

    folder, _ = hf_checkpoint("mamba")
    qmodel = quantize(load_model(folder), "int8", progress=False)
    q = save_quantized(qmodel, tmp_path / "q")
    out = export_onnx(q, tmp_path / "onnx", scan_chunk=4, accuracy_level=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scan_chunk"] == 4 and manifest["quantization"]["validation"]["accuracy_level_0"] < 1e-4
    model = onnx.load(str(out / "model.onnx"))
    assert "com.microsoft::MatMulNBits" in graph_op_types(model)
    assert all("CumSum" in {n.op_type for n in body.node} for body in scan_bodies(model))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    runner = open_onnx(out)
    got, _ = runner.prefill(ids, runner.new_state(2))
    with torch.no_grad():
        want = qmodel(ids).logits
    assert rel_err(got, want) < 1e-5
