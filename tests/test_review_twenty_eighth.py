"""Twenty-eighth session: the CLI verify's reference pass compares nothing (it used to compare the
reference with a stand-in's zeros and throw the result away), ..."""

from __future__ import annotations

import json

import pytest
import torch

from test_runners import export_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return export_artifacts(tmp_path_factory.mktemp("runners28"))


def test_cli_verify_compares_each_logit_once(artifacts, tmp_path, monkeypatch):
    """Reference: verify() with both runners open compares every logit row once; the CLI's two
    passes (record the reference, then replay it against the artifact) must compare no more."""
    from mamba_deploy import verify as V
    from mamba_deploy.cli import main

    pytest.importorskip("onnxruntime")
    rows = []
    real = V._Diff._add_rows

    def counted(self, ref, art):
        rows.append(ref.shape[0])
        return real(self, ref, art)

    monkeypatch.setattr(V._Diff, "_add_rows", counted)
    args = ["--lengths", "1,9", "--batch", "1,2", "--decode-steps", "3"]
    main(["verify", str(artifacts["torch"]), str(artifacts["onnx"]), *args, "--quiet",
          "--json", str(tmp_path / "v.json")])
    cli_rows, rows[:] = sum(rows), []
    ref, art, label = V.open_pair(artifacts["torch"], artifacts["onnx"])
    want = V.verify(ref, art, (1, 9), (1, 2), 3, label=label, progress=False).to_dict()
    assert cli_rows == sum(rows) > 0
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["checks"] == json.loads(json.dumps(want["checks"])) and got["passed"] is True


def test_a_runner_returning_no_logits_fails_verification(artifacts):
    """NOT_RUN skips comparison for the CLI's stand-in only: a runner whose answer is not a tensor
    is a VerificationError naming what it returned (it was an AttributeError from inside verify)."""
    from mamba_deploy import verify as V
    from mamba_deploy.errors import VerificationError
    from mamba_deploy.runners import open_runner

    ref, art = open_runner(artifacts["torch"], "torch"), open_runner(artifacts["torch"], "torch")

    class Broken(type(art)):
        def prefill(self, ids, state, attention_mask=None, last_only=False):
            return None, super().prefill(ids, state, attention_mask=attention_mask, last_only=last_only)[1]

    art.__class__ = Broken
    with pytest.raises(VerificationError, match="returned NoneType where the reference has logits"):
        V.verify(ref, art, (3,), (1,), 1, progress=False)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_hf_pad_vocab_size_multiple_is_ignored_as_transformers_does(ckpt, tmp_path, arch):
    """transformers builds vocab_size rows whatever pad_vocab_size_multiple says (older versions
    saved 8 in every config): a resized vocabulary of 101 ids gave 104 logit columns here
    (128 padded to 48s: 144).
    Reference: transformers' logits, shape and values."""
    import shutil

    import torch
    import transformers

    from mamba_deploy import load_model

    folder = shutil.copytree(ckpt(arch)[0], tmp_path / arch)
    cfg = json.loads((folder / "config.json").read_text())
    vocab = cfg["vocab_size"]
    assert vocab % 48, "the test model's vocabulary must not be a multiple of 48"
    (folder / "config.json").write_text(json.dumps({**cfg, "pad_vocab_size_multiple": 48}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    got = load_model(folder)(ids).logits
    assert got.shape == want.shape == (2, 7, vocab)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_int4_zero_points_outside_four_bits_are_refused_on_load(hf_checkpoint, tmp_path):
    """A zero point of 200 loaded silently (it shifted that layer's weights) and broke the nibble
    packing of an ONNX export, whose error then blamed the export."""
    from safetensors.torch import load_file, save_file

    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError
    from mamba_deploy.quant import quantize, save_quantized

    q = save_quantized(quantize(load_model(hf_checkpoint("mamba2")[0]), "int4", group_size=16, symmetric=False,
                                progress=False), tmp_path / "q")
    load_model(q)  # as written, the zero points are in range
    key = "backbone.layers.1.mixer.in_proj.zeros"
    sd = load_file(q / "model.safetensors")
    sd[key][0, 0] = 200
    save_file(sd, str(q / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key} holds zero points up to 200, outside int4's 0..15"):
        load_model(q)


def test_fp16_rule_on_weights_past_float16_is_a_quantization_error(hf_checkpoint):
    """format fp16 stored inf silently; the saved checkpoint then failed to load as 'corrupt'."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    m = load_model(hf_checkpoint("mamba2")[0])
    with torch.no_grad():
        m.backbone.layers[0].mixer.out_proj.weight[0, 0] = 1e5
    rules = {"quant_cfg": {"backbone.layers.0.mixer.out_proj": {"format": "fp16"}}}
    with pytest.raises(QuantizationError, match=r"out_proj: weights up to 1e\+05 overflow the float16 qweight"):
        quantize(m, "int8", rules=rules, progress=False)


def test_a_rules_group_size_error_names_the_rule_not_the_flag(hf_checkpoint):
    """A rule's group_size overrides --group-size, so suggesting --group-size looped."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    m = load_model(hf_checkpoint("mamba2")[0])
    pattern = "backbone.layers.0.mixer.in_proj"
    rules = {"quant_cfg": {pattern: {"format": "int4", "group_size": 48}}}
    with pytest.raises(QuantizationError, match=rf"set the group_size of rule '{pattern}' to \d+") as err:
        quantize(m, "int8", rules=rules, progress=False)
    assert "--group-size" not in str(err.value)
    later = {"quant_cfg": {"*.in_proj": {"format": "int4", "group_size": 48}, "backbone.*.in_proj": {"group_size": 16}}}
    quantize(load_model(hf_checkpoint("mamba2")[0]), "int8", rules=later, progress=False)  # a later rule mends it


@pytest.mark.parametrize("fmt,rule", [("int4", "backbone.embeddings"), ("int8", "lm_head")])
def test_tied_model_with_one_side_quantized_exports_what_torch_computes(hf_checkpoint, tmp_path, fmt, rule):
    """A tied model whose lm_head alone is quantized (or embeddings alone) no longer shares one
    matrix: the ONNX graph looked its tokens up in the dequantized lm_head (0.19 relative for
    int4), and its own check compared with a float copy that made the same mistake.
    Reference: the quantized PyTorch model's logits."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx
    from mamba_deploy.runners import open_runner

    model = load_model(hf_checkpoint("mamba")[0])
    assert model.config.tie_embeddings
    opts = dict(group_size=16) if fmt == "int4" else {}
    quantize(model, fmt, include=["lm_head"], rules={"quant_cfg": {rule: {"enable": False}}}, progress=False, **opts)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    out = export_quantized_onnx(model, tmp_path / "onnx", accuracy_level=0)
    with open_runner(out, "onnx", threads=1) as r:
        got, _ = r.prefill(ids, r.new_state(2))
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_quantized_onnx_export_builds_no_float_copy_of_the_model(hf_checkpoint, tmp_path, monkeypatch):
    """The export built a float32 twin of the quantized model and exported that (a 472 MB int4
    checkpoint peaked at 4.9 GB unvalidated); it now writes the codes straight from the quantized
    model, so no MambaLM is built unless the float64 second opinion is needed."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy import load_model, model as model_mod
    from mamba_deploy.quant import quantize
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx

    q = quantize(load_model(hf_checkpoint("mamba2")[0]), "int4", group_size=16, progress=False)

    def no_copy(*a, **kw):
        raise AssertionError("a float copy of the model was built")

    monkeypatch.setattr(model_mod.MambaLM, "__init__", no_copy)
    out = export_quantized_onnx(q, tmp_path / "onnx")
    report = json.loads((out / "manifest.json").read_text())["quantization"]
    assert report["validation"]["accuracy_level_0"] < 1e-4 and report["rewritten"]


def test_a_level_4_failure_points_to_accuracy_level_0(hf_checkpoint, tmp_path, monkeypatch):
    """A deep random 210M Mamba2 amplified level 4's int8 activations to 0.7 relative while level 0
    passed; the error only said the export disagreed. Nothing is written."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy import load_model
    from mamba_deploy.errors import ExportError
    from mamba_deploy.quant import onnx_nbits, quantize

    q = quantize(load_model(hf_checkpoint("mamba2")[0]), "int4", group_size=16, progress=False)
    monkeypatch.setitem(onnx_nbits.LEVEL_TOLERANCE, 4, 1e-9)  # any rounding is then too much
    with pytest.raises(ExportError, match=r"at accuracy_level 4: .* int8 blocks .* --accuracy-level 0"):
        onnx_nbits.export_quantized_onnx(q, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph runner needs a CUDA GPU")
def test_seeded_rows_sample_alone_or_listed_on_the_cuda_graph_runner(hf_checkpoint):
    """Each prompt's own generator (generation.row_generators) on the CUDA-graph decode path,
    whose logits come back from the GPU: listed with others, a prompt samples what it samples
    alone. Reference: the same prompt run alone."""
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    r = open_runner(hf_checkpoint("mamba2")[0], "torch", device="cuda", dtype=torch.float32)
    prompts = [[5, 6, 7], [9, 10], [5, 6, 7]]
    kw = dict(max_new_tokens=12, temperature=1.0, seed=3)
    listed = generate(r, prompts, **kw).tokens
    alone = [generate(r, [p], **kw).tokens[0] for p in prompts]
    assert listed == alone and listed[0] == listed[2]


def test_a_norm_before_gate_mamba2_exports_to_onnx(hf_checkpoint, tmp_path):
    """mamba_ssm's ssm_cfg.norm_before_gate: true loaded and ran, but GGUF export sent the user to
    ONNX, which refused it too. Reference: the PyTorch model (its norm_before_gate=True path is
    held to an independent float64 Mamba2 in tests/test_parity_mamba2_variants_f64.py; the GPU
    test against mamba_ssm covers only its default order), whose flag must matter here."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner

    ssm = save_checkpoint(load_model(hf_checkpoint("mamba2_g2")[0]), tmp_path / "ssm", fmt="mamba_ssm")
    cfg = json.loads((ssm / "config.json").read_text())
    plain = load_model(ssm)
    cfg["ssm_cfg"]["norm_before_gate"] = True
    (ssm / "config.json").write_text(json.dumps(cfg))
    model = load_model(ssm)
    assert model.config.norm_before_gate and model.config.ngroups == 2
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, st = model(ids), None
        step_want = model.step(ids[:, 0], want.state)
        assert float((plain(ids).logits - want.logits).abs().max()) > 1e-3  # the flag changes the model
    out = export_onnx(model, tmp_path / "onnx")
    with open_runner(out, "onnx", threads=1) as r:
        got, st = r.prefill(ids, r.new_state(2))
        step_got, _ = r.step(ids[:, 0], st)
    for g, w in ((got, want.logits), (step_got, step_want)):
        assert float((g - w).abs().max() / w.abs().max()) < 1e-4


def test_an_int8_layer_kept_float_says_its_row_length_is_why(hf_checkpoint, tmp_path):
    """An int8 checkpoint's dt_proj (4 inputs: no MatMulNBits block divides it) stayed float with
    'format int8 / group None has no MatMulNBits form', and the advice to quantize with int8."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx

    q = quantize(load_model(hf_checkpoint("mamba")[0]), "int8", progress=False)
    rank = q.backbone.layers[0].mixer.dt_proj.in_features
    with pytest.warns(UserWarning, match=rf"int8 rows of {rank} inputs, which no MatMulNBits block \(16/32/64/128/256\) "
                                         r"divides") as seen:
        out = export_quantized_onnx(q, tmp_path / "onnx", validate=False, accuracy_level=0)
    assert not any("--method" in str(w.message) for w in seen)
    kept = json.loads((out / "manifest.json").read_text())["quantization"]["kept_float"]
    assert kept["backbone.layers.0.mixer.dt_proj"].startswith(f"int8 rows of {rank} inputs")


def test_a_quantized_gguf_reference_keeps_fp32_limits_for_its_own_export(tmp_path):
    """A Q8_0 GGUF verified against its ONNX export got the int8 row (5e-2), though the reference
    runs those very weights; a folder converted from it already kept fp32's 1e-4."""
    pytest.importorskip("gguf")
    pytest.importorskip("onnxruntime")
    import warnings

    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.verify import infer_artifact_dtype

    from test_runners import DEMO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q8 = export_gguf(DEMO, tmp_path / "m.gguf", outtype="q8_0")
    onnx_dir = export_onnx(q8, tmp_path / "onnx")
    assert infer_artifact_dtype(onnx_dir) == "q8_0"  # alone, it records the GGUF's rounding
    assert infer_artifact_dtype(onnx_dir, q8) == "fp32"  # against that GGUF: nothing more is rounded


def test_validation_loss_is_scored_in_bounded_pieces(hf_checkpoint, monkeypatch):
    """quick_val_loss ran every validation window in one forward: `train --eval-batch 100000`
    grew to 24 GB and was killed. Reference: the mean next-token NLL from transformers' logits in
    float64, over all windows."""
    from mamba_deploy import load_model, train

    folder, hf = hf_checkpoint("mamba")
    windows = torch.randint(0, 128, (5, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logp = torch.log_softmax(hf(windows[:, :-1]).logits.double(), -1)
    want = -float(logp.gather(-1, windows[:, 1:, None]).mean())
    seen, real = [], train.lm_logits

    def spy(model, x):
        seen.append(x.shape[0])
        return real(model, x)

    monkeypatch.setattr(train, "lm_logits", spy)
    monkeypatch.setattr(train, "VAL_PIECE_TOKENS", 32)  # two 16-token windows per piece
    assert train.quick_val_loss(load_model(folder), windows, None) == pytest.approx(want, rel=1e-5)
    assert seen == [2, 2, 1]
