"""verify: passes faithful copies, fails a single corrupted weight, and its numbers agree with
transformers (the independent reference) computing the same quantities."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import finish_gguf

from mamba_deploy import verify as V
from mamba_deploy.checkpoint import load_model, save_checkpoint
from mamba_deploy.cli import main
from mamba_deploy.errors import ConfigError, MambaDeployError
from mamba_deploy.runners.torch_runner import TorchRunner

LENGTHS, BATCHES, STEPS = (1, 5, 33), (1, 2), 3  # 33 crosses Mamba2's chunk of 16 twice
CORRUPT = "backbone.layers.0.mixer.out_proj.weight"  # same name in transformers and here


def _cli_args(ref, art, *extra):
    return ["verify", str(ref), str(art), "--lengths", "1,9", "--batch", "2", "--decode-steps", "2", "--quiet", *extra]


@pytest.fixture(autouse=True)
def short_continuation(monkeypatch):
    monkeypatch.setattr(V, "PPL_CONTINUATION", 24)  # sampled token by token: keep the suite quick


@pytest.fixture(scope="module")
def copies(hf_checkpoint, tmp_path_factory):
    """kind -> (reference folder, faithful mamba_ssm-layout copy, corrupted copy, hf model, corrupted hf model)."""
    cache = {}

    def make(kind):
        if kind not in cache:
            folder, hf = hf_checkpoint(kind)
            root = tmp_path_factory.mktemp(f"verify_{kind}")
            good = save_checkpoint(load_model(folder), root / "good", fmt="mamba_ssm")  # = convert --format mamba_ssm
            bad_hf = copy.deepcopy(hf)
            with torch.no_grad():
                dict(bad_hf.named_parameters())[CORRUPT][3, 5] += 0.5  # one element of one weight
            bad_hf.save_pretrained(root / "bad")
            cache[kind] = (folder, good, root / "bad", hf, bad_hf)
        return cache[kind]

    return make


class Recording(TorchRunner):
    """A torch runner that remembers the prefill inputs, so a test can replay them elsewhere."""

    def __init__(self, model):
        super().__init__(model)
        self.seen = []

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        self.seen.append(ids.clone())
        return super().prefill(ids, state, attention_mask, last_only)


class Hidden(TorchRunner):
    """A backend that keeps its state to itself."""

    def to_torch_state(self, state):
        raise NotImplementedError("opaque")


class Broken(TorchRunner):
    """A backend whose decode step returns NaN."""

    def step(self, ids, state):
        logits, state = super().step(ids, state)
        return torch.full_like(logits, float("nan")), state


def _run(ref_path, art_runner, **kw):
    kw = {"lengths": LENGTHS, "batches": BATCHES, "decode_steps": STEPS, "progress": False, **kw}
    return V.verify(TorchRunner(load_model(ref_path)), art_runner, **kw)


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_faithful_copy_passes_and_corrupted_weight_fails(copies, kind):
    ref, good, bad, *_ = copies(kind)
    ok = _run(ref, TorchRunner(load_model(good)))
    assert ok.passed, ok.table()
    assert {c.name for c in ok.checks} == {"logits_rel", "top1", "state_rel", "ppl_rel"}
    assert all(c["state_after_prefill"] is not None and c["state_after_decode"] is not None for c in ok.cases)

    ko = _run(ref, TorchRunner(load_model(bad)))
    assert not ko.passed
    failed = {c.name for c in ko.checks if not c.passed}
    assert "logits_rel" in failed and "state_rel" in failed
    assert any(f.startswith("logits_rel") for f in ko.failures)
    assert ko.to_dict()["passed"] is False and ko.to_dict()["failures"] == ko.failures
    assert "FAILED" in ko.table()


def test_reported_errors_match_transformers(copies, monkeypatch):
    """max/mean abs error and top-1 of every prefill case, recomputed from transformers' logits."""
    monkeypatch.setattr(V, "DIFF_ROWS", 7)  # compared in several blocks, as long inputs are
    ref, _, bad, hf, bad_hf = copies("mamba")
    art = Recording(load_model(bad))
    report = _run(ref, art, decode_steps=0)
    # the left-padded case runs last, after the scored sequence; its rows recomputed alone, unpadded
    assert report.cases[-1]["left_padded"]
    case_inputs = art.seen[:len(report.cases) - 1] + art.seen[-1:]
    for case, ids in zip(report.cases, case_inputs):
        assert tuple(ids.shape) == (case["batch"], case["length"])
        rows = [ids[i:i + 1, case["length"] - n:] for i, n in enumerate(case.get("left_padded", []))] or [ids]
        with torch.no_grad():
            want = torch.cat([hf(r).logits.double().flatten(0, 1) for r in rows])
            got = torch.cat([bad_hf(r).logits.double().flatten(0, 1) for r in rows])
        err = (got - want).abs()
        assert case["prefill"]["max_abs"] == pytest.approx(float(err.max()), rel=1e-3, abs=1e-6)
        assert case["prefill"]["mean_abs"] == pytest.approx(float(err.mean()), rel=1e-3, abs=1e-7)
        assert case["prefill"]["rel"] == pytest.approx(float(err.max() / want.abs().max()), rel=1e-3, abs=1e-7)
        agree = float((got.argmax(-1) == want.argmax(-1)).double().mean())
        assert case["prefill"]["top1"] == pytest.approx(agree)


def test_top1_and_ppl_checks_fail_on_their_own(copies):
    """With logits_rel and state_rel loosened out of the way, the corrupted copy still fails top1
    (limit 1.0: some argmax flips) and ppl_rel (limit 0: its perplexity moved); the faithful copy
    passes fp32's top1 0.99 and ppl_rel 1e-3. Limits are inclusive (top1 >=, ppl_rel <=)."""
    ref, good, bad, *_ = copies("mamba2_g2")  # Mamba1's corrupted copy keeps every argmax
    ko = _run(ref, TorchRunner(load_model(bad)), tolerance="logits_rel=10,state_rel=10,top1=1.0,ppl_rel=0")
    checks = {c.name: c for c in ko.checks}
    assert checks["top1"].value < 1.0 and ko.sequence["ppl_artifact"] != ko.sequence["ppl_reference"]
    assert {c.name for c in ko.checks if not c.passed} == {"top1", "ppl_rel"}, ko.table()
    assert not ko.passed and "FAILED: 2 check(s)" in ko.table()
    at_limit = V.make_tolerance(dict(logits_rel=10, state_rel=10, top1=checks["top1"].value,
                                     ppl_rel=checks["ppl_rel"].value))
    assert all(c.passed for c in V._build_checks(ko.cases, ko.sequence, at_limit))

    ok = _run(ref, TorchRunner(load_model(good)), tolerance="top1=0.99,ppl_rel=1e-3")
    assert ok.passed, ok.table()
    assert {c.name for c in ok.checks} >= {"top1", "ppl_rel"}


def test_text_perplexity_matches_transformers(copies, monkeypatch):
    monkeypatch.setattr(V, "SEQ_CHUNK", 16)  # several chunks: the state must be carried between them
    ref, _, bad, hf, bad_hf = copies("mamba2")
    text = torch.randint(0, 128, (61,), generator=torch.Generator().manual_seed(3)).tolist()
    report = _run(ref, TorchRunner(load_model(bad)), lengths=(4,), batches=(1,), text_ids=text)
    ids = torch.tensor([text])
    with torch.no_grad():
        ppl = {name: math.exp(float(torch.nn.functional.cross_entropy(m(ids).logits[0, :-1].double(), ids[0, 1:])))
               for name, m in (("reference", hf), ("artifact", bad_hf))}
    seq = report.sequence
    assert seq["source"] == "text" and seq["scored_tokens"] == 60
    assert seq["ppl_reference"] == pytest.approx(ppl["reference"], rel=1e-5)
    assert seq["ppl_artifact"] == pytest.approx(ppl["artifact"], rel=1e-5)
    assert seq["ppl_rel"] == pytest.approx(abs(ppl["artifact"] / ppl["reference"] - 1), rel=1e-3, abs=1e-9)


def test_cli_exit_codes_json_and_named_failure(copies, tmp_path, capsys):
    ref, good, bad, *_ = copies("mamba")
    out = tmp_path / "ok.json"
    assert main(_cli_args(ref, good, "--json", str(out))) == 0
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["tolerance"]["label"] == "fp32"
    assert [(c["length"], c["batch"], c.get("left_padded")) for c in data["cases"]] == \
        [(1, 2, None), (9, 2, None), (9, 2, [9, 6])]
    assert "PASSED" in capsys.readouterr().out

    out = tmp_path / "bad.json"
    assert main(_cli_args(ref, bad, "--json", str(out), "--reference-dtype", "float64")) != 0
    err = capsys.readouterr().err
    assert "logits_rel" in err and "beyond tolerance" in err
    assert json.loads(out.read_text())["passed"] is False  # the report is still written
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary leftovers


def test_overrides_loosen_and_unknown_names_are_errors(copies):
    ref, _, bad, *_ = copies("mamba")
    loose = _run(ref, TorchRunner(load_model(bad)), tolerance="logits_rel=10,state_rel=10,top1=0,ppl_rel=10")
    assert loose.passed, loose.table()
    assert loose.tolerance.logits_rel == 10
    with pytest.raises(ConfigError, match="logit_rel"):
        V.make_tolerance({"logit_rel": 1.0})
    with pytest.raises(ConfigError, match="q9_z"):
        V.make_tolerance("q9_z")
    with pytest.raises(ConfigError, match="NAME=NUMBER"):
        V.parse_overrides("logits_rel=abc")


def test_float64_reference_and_hidden_state(copies):
    ref, good, *_ = copies("mamba")
    r64 = TorchRunner(load_model(ref, dtype=torch.float64))
    report = V.verify(r64, Hidden(load_model(good)), lengths=(6,), batches=(2,), decode_steps=2, progress=False)
    assert report.passed, report.table()
    assert report.cases[0]["state_after_prefill"] is None and report.cases[0]["state_after_decode"] is None
    assert "state_rel" not in {c.name for c in report.checks}
    assert "unavailable" in report.table()
    # float32 vs float64 differ by rounding only: nonzero, far below the fp32 limit
    assert 0 < report.cases[0]["prefill"]["rel"] < 1e-5


def test_nan_artifact_fails(copies):
    ref, good, *_ = copies("mamba")
    report = _run(ref, Broken(load_model(good)), lengths=(3,), batches=(1,))
    assert not report.passed
    assert any(f.startswith("logits_rel") and "decode" in f for f in report.failures)


def test_vocab_mismatch_is_a_user_error(copies, hf_checkpoint):
    ref, *_ = copies("mamba")
    other = TorchRunner(load_model(ref))
    other.config = other.config.replace(vocab_size=64)
    with pytest.raises(MambaDeployError, match="vocabulary 64"):
        _run(ref, other)


def _gguf_with_file_type(path, ftype, qtype=None):
    """A GGUF whose general.file_type is ftype, holding one (4, 32) matrix stored as qtype (F32
    when None)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_file_type(int(ftype))
    data = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    if qtype is None:
        w.add_tensor("token_embd.weight", data)
    else:
        w.add_tensor("token_embd.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    finish_gguf(w)
    return path


def test_infer_artifact_dtype(tmp_path, copies):
    import gguf

    ref, *_ = copies("mamba")
    assert V.infer_artifact_dtype(ref) == "fp32"
    assert V.infer_artifact_dtype(tmp_path / "nothing-here") == "fp32"
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "manifest.json").write_text(json.dumps({"format": "mamba-deploy-onnx", "dtype": "fp16"}))
    assert V.infer_artifact_dtype(onnx) == "fp16"
    assert V.infer_artifact_dtype(onnx / "model.onnx") == "fp16"
    (onnx / "manifest.json").write_text(json.dumps({"dtype": "fp32", "quantization": {"method": "int4"}}))
    assert V.tolerance_row(V.infer_artifact_dtype(onnx)) == "int4"
    quant = tmp_path / "quant"
    quant.mkdir()
    (quant / "config.json").write_text(json.dumps({"quantization_config": {"method": "smoothquant", "bits": 8}}))
    assert V.tolerance_row(V.infer_artifact_dtype(quant)) == "int8"
    (quant / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert V.infer_artifact_dtype(quant) == "bf16"
    q8 = _gguf_with_file_type(tmp_path / "m.gguf", gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)
    assert V.infer_artifact_dtype(q8) == "q8_0" and V.tolerance_row("q8_0") == "int8"
    q4 = _gguf_with_file_type(tmp_path / "m4.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M, gguf.GGMLQuantizationType.Q4_0)
    assert V.infer_artifact_dtype(q4) == "q4_k_m" and V.tolerance_row("q4_k_m") == "int4"
    # a file_type looser than every type stored: the stored types decide (llama.cpp's fallbacks)
    said = _gguf_with_file_type(tmp_path / "f.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)
    assert V.infer_artifact_dtype(said) == "f32"


def test_half_precision_checkpoint_gets_half_tolerances(copies, tmp_path):
    """A checkpoint saved in fp16 is verified against fp16 limits: it passes them, and fails fp32's."""
    ref, *_ = copies("mamba")
    half = save_checkpoint(load_model(ref), tmp_path / "half", dtype=torch.float16)
    art = TorchRunner(load_model(half))
    art.artifact_path = half
    report = _run(ref, art)
    assert report.tolerance.label == "fp16"
    assert report.passed, report.table()
    strict = _run(ref, art, tolerance="fp32")
    assert not strict.passed


def test_onnx_artifacts(copies, tmp_path):
    """Another backend through the same harness: fp32 and fp16 ONNX exports pass under the
    tolerances read from their manifests; fp16 fails fp32's limits; a corrupted export fails."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner

    ref, _, bad, *_ = copies("mamba2")
    kw = dict(lengths=(1, 9, 33), batches=(1, 2))
    fp32 = open_runner(export_onnx(ref, tmp_path / "fp32"), "onnx")
    report = _run(ref, fp32, **kw)
    assert report.passed and report.tolerance.label == "fp32", report.table()
    assert report.cases[-1]["state_after_decode"] is not None

    r, art, label = V.open_pair(ref, export_onnx(ref, tmp_path / "fp16", dtype="fp16"))
    assert label == "fp16"
    half = V.verify(r, art, label=label, progress=False, decode_steps=STEPS, **kw)
    assert half.passed, half.table()
    assert half.cases[0]["prefill"]["rel"] > 1e-5  # really half precision, not a silent fp32 graph
    assert not V.verify(r, art, tolerance="fp32", progress=False, decode_steps=STEPS, **kw).passed

    corrupted = open_runner(export_onnx(bad, tmp_path / "bad"), "onnx")
    assert not _run(ref, corrupted, **kw).passed


def test_cli_text_file_is_scored(copies, tmp_path, capsys):
    """--text: the file is tokenized with the reference's tokenizer and scored, every token after
    the first counted once."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    ref, good, *_ = copies("mamba")
    ref_copy = tmp_path / "ref"
    shutil.copytree(ref, ref_copy)
    words = [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ref_copy / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[(7 * i) % 100] for i in range(45)))
    out = tmp_path / "r.json"
    assert main(_cli_args(ref_copy, good, "--text", str(text), "--json", str(out))) == 0
    seq = json.loads(out.read_text())["sequence"]
    assert seq["source"] == "text" and seq["length"] == 45 and seq["scored_tokens"] == 44
    assert "perplexity over 44 tokens" in capsys.readouterr().out
    text.write_text("w1")
    assert main(_cli_args(ref_copy, good, "--text", str(text))) != 0
    assert "at least 2" in capsys.readouterr().err


DEMO = Path(__file__).resolve().parents[1] / "models" / "demo-mamba1"


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="models/demo-mamba1 has not been built")
@pytest.mark.parametrize("method", ["int4"])
def test_quantized_demo_model_meets_its_row(method, tmp_path):
    """On a trained model, a quantized checkpoint is judged by the row its config.json names: it
    passes that row, and is far outside fp32's."""
    from mamba_deploy.quant import quantize, save_quantized

    opts = {"group_size": 32} if method == "int4" else {}
    q = save_quantized(quantize(load_model(DEMO), method, **opts), tmp_path / "q")
    ref, art, label = V.open_pair(DEMO, q)
    assert V.tolerance_row(label) == method
    report = V.verify(ref, art, lengths=(1, 32), batches=(2,), decode_steps=2, label=label, progress=False)
    assert report.passed, report.table()
    logits = next(c for c in report.checks if c.name == "logits_rel")
    assert logits.value > 10 * V.make_tolerance("fp32").logits_rel


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="models/demo-mamba1 has not been built")
def test_gguf_demo_model_gets_its_file_type_row(tmp_path):
    """A Q8_0 GGUF is judged by the int8 row read from general.file_type, and passes it: through
    the GGUF importer (torch) and, when llama-cpp-python is installed, through llama.cpp too."""
    import warnings

    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows too short for Q8_0 blocks fall back to F16, by design
        g = export_gguf(DEMO, tmp_path / "demo-q8_0.gguf", outtype="q8_0")
    backends = ["torch"]
    try:
        import llama_cpp  # noqa: F401

        backends.append("llama.cpp")
    except ImportError:
        pass
    for backend in backends:
        ref, art, label = V.open_pair(DEMO, g, backend=backend)
        assert label == "q8_0"
        report = V.verify(ref, art, lengths=(1, 24), batches=(2,), decode_steps=2, label=label, progress=False)
        assert report.tolerance.label == "int8"
        assert report.passed, (backend, report.table())
        assert 0 < report.checks[0].value  # really quantized: not bit-identical to the reference


def test_artifact_dtype_is_refused_for_artifacts_that_ignore_it(copies, tmp_path, capsys):
    """--artifact-dtype changes how a torch checkpoint runs (and so its row); an ONNX export runs
    what is stored in it, so the flag would only loosen the limits: it is refused, naming the
    artifact's backend and the flags that loosen on purpose, before any report is written."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from mamba_deploy.export.onnx import export_onnx

    ref, good, *_ = copies("mamba")
    onnx = export_onnx(ref, tmp_path / "onnx")
    out = tmp_path / "r.json"
    assert main(_cli_args(ref, onnx, "--artifact-dtype", "fp16", "--json", str(out))) == 2
    err = capsys.readouterr().err
    assert "--artifact-dtype fp16" in err and "onnx backend" in err and "(fp32)" in err
    assert "--dtype fp16" in err and "--tolerance" in err
    assert not out.exists()
    assert main(_cli_args(ref, onnx, "--json", str(out))) == 0  # the same export without the flag
    # a torch checkpoint really runs in half precision, so it keeps the half-precision row
    assert main(_cli_args(ref, good, "--artifact-dtype", "fp16", "--json", str(out))) == 0
    assert json.loads(out.read_text())["tolerance"]["label"] == "fp16"


@pytest.mark.parametrize("flags,pattern", [
    # the lists are refused by the argument parser (usage line, the flag named)
    (["--lengths", ""], r"usage: (.|\n)*argument --lengths: '' names no value"),
    (["--batch", " , "], r"argument --batch: ' , ' names no value"),
    (["--lengths", "1,0"], r"argument --lengths: '1,0' has 0, which is below 1; give comma-separated integers >= 1"),
    (["--tolerance", "logits_rel"], r"'logits_rel'; write NAME=NUMBER"),
    (["--tolerance", "state_rel=nan"], r"'state_rel=nan'; write NAME=NUMBER"),
    (["--tolerance", "logit_rel=1"], r"unknown tolerance logit_rel"),
])
def test_cli_bad_lists_and_tolerances_are_user_errors(copies, tmp_path, capsys, flags, pattern):
    """An empty --lengths / --batch used to skip every prefill and decode check and pass; a bare
    --tolerance name was taken for a tolerance row."""
    import re

    ref, good, *_ = copies("mamba")
    out = tmp_path / "r.json"
    try:
        code = main(_cli_args(ref, good, "--json", str(out), *flags))
    except SystemExit as e:  # refused by argparse
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert not out.exists()


def test_api_empty_cases_and_bare_tolerance_names_are_errors(copies):
    ref, good, *_ = copies("mamba")
    for lengths, batches in (((), (1,)), ((3,), ())):
        with pytest.raises(ConfigError, match="at least one value"):
            _run(ref, TorchRunner(load_model(good)), lengths=lengths, batches=batches)
    with pytest.raises(ConfigError, match="'ppl_rel' has no value; write NAME=NUMBER, e.g. ppl_rel="):
        V.make_tolerance("ppl_rel")
    assert V.make_tolerance("fp16").label == "fp16"  # a row label alone still works


def test_different_models_are_named_not_blamed_on_the_runner(copies, hf_checkpoint, tmp_path, capsys):
    """A Mamba1 reference against a Mamba2 checkpoint, or two Mamba1 of different sizes, are not
    the same model: said up front with the differing fields, not as a broken to_torch_state."""
    from conftest import build_hf_model

    ref, *_ = copies("mamba")
    m2, _ = hf_checkpoint("mamba2")
    assert main(_cli_args(ref, m2)) == 2
    err = capsys.readouterr().err
    assert "is not the same model as" in err and "arch mamba2" in err and "arch mamba1" in err
    assert "to_torch_state" not in err

    wider = tmp_path / "wider"
    build_hf_model("mamba", state_size=16).save_pretrained(wider)  # same vocabulary, larger state
    with pytest.raises(MambaDeployError, match=r"the artifact has d_state 16 where the reference has d_state 8"):
        _run(ref, TorchRunner(load_model(wider)))


DEMO2 = DEMO.parent / "demo-mamba2"
FULL_CONTINUATION = V.PPL_CONTINUATION  # read at import, before the autouse fixture shortens it


def _default_verify(artifact, monkeypatch):
    """`mamba-deploy verify models/demo-mamba2 ARTIFACT` with every default, as a user runs it."""
    monkeypatch.setattr(V, "PPL_CONTINUATION", FULL_CONTINUATION)
    ref, art, label = V.open_pair(DEMO2, artifact)
    return V.verify(ref, art, label=label, progress=False)


@pytest.fixture(scope="module")
def demo2_int4(tmp_path_factory):
    from mamba_deploy.quant import quantize, save_quantized

    return save_quantized(quantize(load_model(DEMO2), "int4", progress=False), tmp_path_factory.mktemp("int4") / "q")


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO2 / "config.json").exists(), reason="models/demo-mamba2 has not been built")
@pytest.mark.parametrize("artifact", ["int4", "awq", "q3_k_m", "q2_k"])
def test_default_low_bit_artifacts_pass_default_verify(artifact, demo2_int4, tmp_path, monkeypatch):
    """The default int4 and AWQ checkpoints of the trained demo model, and llama.cpp's own Q3_K_M /
    Q2_K of it, pass `verify` with its defaults: limits a sound quantizer cannot meet would only
    teach users to ignore the verdict (the earlier table failed all but Q2_K's here)."""
    if artifact == "int4":
        path = demo2_int4
    elif artifact == "awq":
        from mamba_deploy.quant import quantize, save_quantized

        path = save_quantized(quantize(load_model(DEMO2), "awq", progress=False), tmp_path / "awq")
    else:
        pytest.importorskip("llama_cpp", reason="K-quant GGUF types are made by llama.cpp's quantizer")
        from mamba_deploy.export.gguf import export_gguf

        path = export_gguf(DEMO2, tmp_path / f"{artifact}.gguf", outtype=artifact, n_threads=2)
    report = _default_verify(path, monkeypatch)
    assert report.tolerance.label == ("q3" if artifact == "q3_k_m" else "q2" if artifact == "q2_k" else "int4")
    assert report.passed, report.table()


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO2 / "config.json").exists(), reason="models/demo-mamba2 has not been built")
@pytest.mark.parametrize("damage, failing", [("scales", "state_rel"), ("A_log", "ppl_rel")])
def test_damaged_int4_checkpoint_fails_default_verify(damage, failing, demo2_int4, tmp_path, monkeypatch):
    """The low-bit limits still catch small damage to one layer of a sound int4 checkpoint: its
    in_proj scales x1.25 (a scale convention off in one tensor) or its A_log + 1 (A x e)."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(demo2_int4, bad)
    tensors = load_file(bad / "model.safetensors")
    if damage == "scales":
        tensors["backbone.layers.2.mixer.in_proj.scales"] *= 1.25
    else:
        tensors["backbone.layers.2.mixer.A_log"] += 1.0
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    report = _default_verify(bad, monkeypatch)
    assert not report.passed
    assert failing in [c.name for c in report.checks if not c.passed], report.table()
