"""Gaps found by a mutation review of verify.py, export/gguf_import.py and quant/{formats, plan,
onnx_nbits}.py: each test fails on a planted one-line bug (named in its comment) that the rest of
the suite let through, and passes on the reviewed code.

References, never the code under test's own output: float64 math on the stored codes, torch's
own float8 limits, transformers' models and configs, the `gguf` package's reader and its block
size table, onnxruntime running the exported graph, tokenizers' ids.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import DT_LIMIT_KIND, build_hf_model, hf_cache, rel_err, rewrite_gguf

from mamba_deploy import load_model
from mamba_deploy.errors import CheckpointError, QuantizationError
from mamba_deploy.quant import formats, quantize, save_quantized

pytest.importorskip("gguf")
from conftest import BPE_EOS as EOS  # noqa: E402

GROUP = 32  # the tiny models: d_model 32, d_inner 64


def _ids(n=2, length=9, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _rtn_bound_ok(deq, w, group, symmetric):
    """Round-to-nearest on the documented grid, in float64: symmetric step = amax / 7; asymmetric
    step = (max(wmax, 0) - min(wmin, 0)) / 15 (the range always holds 0). Error <= step / 2 (+ the
    float16 rounding of the stored step)."""
    out_f, in_f = w.shape
    wg = w.double().reshape(out_f, in_f // group, group)
    if symmetric:
        step = wg.abs().amax(-1) / 7
    else:
        step = (wg.amax(-1).clamp_min(0) - wg.amin(-1).clamp_max(0)) / 15
    err = (deq.double().reshape(out_f, in_f // group, group) - wg).abs()
    return bool((err <= step.unsqueeze(-1) * 0.5 * (1 + 4e-3) + 1e-7).all())


# ----------------------------------------------------------------------------- formats

def test_asymmetric_int4_groups_of_one_sign():  # F2 (wmin not clamped to <= 0), F3 (wmax not >= 0)
    """Groups whose weights are all positive or all negative: the asymmetric grid still spans 0
    (so exact zeros stay exact) and every weight rounds to its nearest grid point (random normal
    rows, as the other tests use, always hold both signs)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 64, generator=g).abs() * 0.1 + 0.02
    w[1] = -w[1]  # all negative
    w[3, :GROUP] = -w[3, :GROUP]  # one negative group, one positive
    w[4, 5] = 0.0  # an exact zero in an all-positive group
    t = formats.encode(w, "int4", "w", GROUP, symmetric=False)
    deq = formats.decode(t, "int4", GROUP, False)
    assert _rtn_bound_ok(deq, w, GROUP, symmetric=False)
    assert float(deq[4, 5]) == 0.0


def test_fp8_uses_the_whole_e4m3_range():  # F10 (FP8_MAX 240)
    """The fp8 scale maps each row's (or the tensor's) largest |w| to e4m3fn's largest finite value,
    torch.finfo(float8_e4m3fn).max: smaller would waste range and precision."""
    fmax = float(torch.finfo(torch.float8_e4m3fn).max)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(12))
    for scaling, amax in (("channel", w.double().abs().amax(1, keepdim=True)),
                          ("tensor", w.double().abs().amax().reshape(1, 1))):
        t = formats.encode(w, "fp8", "w", fp8_scaling=scaling)
        assert torch.allclose(t["scales"].double(), amax / fmax, rtol=1e-3), scaling
        codes = t["qweight"].double().abs()
        top = codes.amax(1) if scaling == "channel" else codes.amax()
        assert bool((top >= fmax * 0.99).all()), scaling


# ----------------------------------------------------------------------------- plan

def test_rule_group_size_and_symmetry_override_the_method(hf_checkpoint):  # P2 (base spec wins over the rule)
    """A rule's group_size / symmetric replace the method's for the modules it matches: out_proj
    is stored in asymmetric groups of 64 while in_proj keeps symmetric groups of 32, each the
    float64 round-to-nearest of its weight on its own grid."""
    folder, _ = hf_checkpoint("mamba")
    ref = load_model(folder)
    rules = {"quant_cfg": {"*.out_proj": {"group_size": 64, "symmetric": False}}}
    model = quantize(load_model(folder), "int4", group_size=GROUP, rules=rules, progress=False)
    for name, group, sym in (("backbone.layers.0.mixer.out_proj", 64, False),
                             ("backbone.layers.0.mixer.in_proj", GROUP, True)):
        mod, w = model.get_submodule(name), ref.get_submodule(name).weight.detach()
        assert mod.scales.shape == (w.shape[0], w.shape[1] // group), name
        assert (getattr(mod, "zeros", None) is not None) == (not sym), name
        deq = formats.decode(mod.stored(), "int4", group, sym, torch.float64)
        assert _rtn_bound_ok(deq, w, group, sym), name


def test_rule_to_int4_without_a_group_size_uses_int4s_default_128(tmp_path):  # P10 (default 64)
    """--method int8 with a rule {"format": "int4"} and no group size: int4's documented default
    group of 128 (README / METHODS), checked on the stored scales and float64 rounding."""
    build_hf_model("mamba", hidden_size=128, time_step_rank=8).save_pretrained(tmp_path / "m")
    ref = load_model(tmp_path / "m")
    model = quantize(load_model(tmp_path / "m"), "int8", rules={"quant_cfg": {"*.out_proj": {"format": "int4"}}},
                     progress=False)
    name = "backbone.layers.0.mixer.out_proj"  # 256 inputs: two groups of 128
    mod, w = model.get_submodule(name), ref.get_submodule(name).weight.detach()
    assert model.quantization_config["modules"][name]["group_size"] == 128
    assert mod.scales.shape == (w.shape[0], 2)
    assert _rtn_bound_ok(formats.decode(mod.stored(), "int4", 128, True, torch.float64), w, 128, True)


def test_misspelled_quantize_option_is_an_error(hf_checkpoint):  # P4 (unknown options ignored)
    folder, _ = hf_checkpoint("mamba")
    with pytest.raises(QuantizationError, match="grup_size"):
        quantize(load_model(folder), "int4", grup_size=GROUP, progress=False)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_smoothquant_alpha_bounds_are_accepted(hf_checkpoint, alpha):  # P5 (alpha = 0 refused)
    """alpha in [0, 1] inclusive (the message says so); both ends quantize to within the int8
    row of transformers' float model."""
    folder, hf = hf_checkpoint("mamba")
    calib = dict(calib_ids=torch.arange(4096) * 7919 % 128, n_calib=4, calib_len=64, progress=False)
    model = quantize(load_model(folder), "smoothquant", alpha=alpha, **calib)
    ids = _ids()
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) < 0.05


def test_smoothquant_head_is_weight_only(hf_checkpoint):  # P6 (lm_head / embeddings kept w8a8)
    """SmoothQuant with --include lm_head embeddings: the head stays weight-only int8 (no int8
    rounding of the final hidden state): its output is float64 x @ W_deq^T to fp32 precision."""
    folder, _ = hf_checkpoint("mamba2_g2")  # untied head
    calib = dict(calib_ids=torch.arange(4096) * 7919 % 128, n_calib=4, calib_len=64, progress=False)
    model = quantize(load_model(folder), "smoothquant", include=("embeddings", "lm_head"), **calib)
    mods = model.quantization_config["modules"]
    assert mods["lm_head"]["format"] == mods["backbone.embeddings"]["format"] == "int8"
    head = model.lm_head
    W = formats.decode(head.stored(), "int8", head.in_features, True, torch.float64)
    x = torch.randn(5, head.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = head(x).double()
    assert rel_err(got, x.double() @ W.T) < 1e-5


def test_tied_lm_head_quantizes_the_shared_embedding_too(hf_checkpoint):  # P11
    """With tied embeddings, --include lm_head quantizes the one shared matrix: the embedding
    lookup and the head read the same int8 values (float64 round-to-nearest of the float table)."""
    folder, hf = hf_checkpoint("mamba")
    assert hf.config.tie_word_embeddings
    ref = load_model(folder).backbone.embeddings.weight.detach().double()
    model = quantize(load_model(folder), "int8", include=("lm_head",), progress=False)
    assert {"backbone.embeddings", "lm_head"} <= set(model.quantization_config["modules"])
    ids = torch.arange(128)
    with torch.no_grad():
        emb = model.backbone.embeddings(ids).double()
    step = ref.abs().amax(1, keepdim=True) / 127
    assert bool(((emb - ref).abs() <= step * 0.5 * (1 + 2e-3) + 1e-9).all())
    assert float((emb - ref).abs().max()) > 0  # really quantized
    W = formats.decode(model.lm_head.stored(), "int8", ref.shape[1], True, torch.float64)
    assert torch.equal(W, emb)


@pytest.mark.parametrize("edit,needle", [
    (dict(group_size=0), "group_size=0"),  # P7
    (dict(symmetric="false"), "symmetric='false'"),  # P8: bool("false") is True
    (dict(fp8_scaling="row"), "fp8_scaling='row'"),  # P9
])
def test_more_malformed_module_specs_are_named(hf_checkpoint, tmp_path, edit, needle):
    """A hand-edited quantization_config: a value that would otherwise load as something else is
    a QuantizationError naming it."""
    folder, _ = hf_checkpoint("mamba2")
    out = save_quantized(quantize(load_model(folder), "int4", group_size=GROUP, symmetric=False, progress=False),
                         tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    next(iter(cfg["quantization_config"]["modules"].values())).update(edit)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=needle):
        load_model(out)



def test_rule_with_an_unknown_format_is_a_quantization_error(hf_checkpoint):  # P12 (was a bare KeyError)
    folder, _ = hf_checkpoint("mamba")
    with pytest.raises(QuantizationError, match=r"unknown format 'int5'"):
        quantize(load_model(folder), "int8", rules={"quant_cfg": {"*.out_proj": {"format": "int5"}}}, progress=False)

# ----------------------------------------------------------------------------- ONNX MatMulNBits

def test_onnx_awq_export_validates(hf_checkpoint, tmp_path):  # O5 (float twin without input_scale)
    """AWQ modules carry an input scale: the export's own validation (against the quantized
    model's float twin) passes, and onnxruntime matches the PyTorch quantized model."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed")
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx
    from mamba_deploy.runners.onnx_runner import open_onnx

    folder, _ = hf_checkpoint("mamba2")
    calib = dict(calib_ids=torch.arange(4096) * 7919 % 128, n_calib=4, calib_len=64, progress=False)
    model = quantize(load_model(folder), "awq", group_size=GROUP, **calib)
    out = export_quantized_onnx(model, tmp_path / "onnx", accuracy_level=0)  # validate=True
    runner = open_onnx(out)
    ids = _ids(2, 7)
    got, _ = runner.prefill(ids, runner.new_state(2))
    with torch.no_grad():
        assert rel_err(got, model(ids).logits) < 1e-5


def test_onnx_int4_groups_ort_cannot_take_stay_float(tmp_path):  # O6b (group size not checked against BLOCKS)
    """int4 groups of 48 (not a MatMulNBits block size) keep a float MatMul of the dequantized
    weight: reported as such, and onnxruntime still matches the PyTorch quantized model."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed")
    from mamba_deploy.quant.onnx_nbits import export_quantized_onnx
    from mamba_deploy.runners.onnx_runner import open_onnx

    build_hf_model("mamba2", hidden_size=48, head_dim=16, num_heads=6).save_pretrained(tmp_path / "m")
    model = quantize(load_model(tmp_path / "m"), "int4", group_size=48, progress=False)
    with pytest.warns(UserWarning, match=r"of \d+ quantized linear layers stay float32 in the ONNX graph .*int4 group 48, "
                                         r"not a MatMulNBits block.*--method int8, int4"):  # said, not only recorded
        out = export_quantized_onnx(model, tmp_path / "onnx", validate=False, accuracy_level=0)
    kept = json.loads((out / "manifest.json").read_text())["quantization"]["kept_float"]
    assert "backbone.layers.0.mixer.in_proj" in kept
    runner = open_onnx(out)
    ids = _ids(2, 7)
    got, _ = runner.prefill(ids, runner.new_state(2))
    with torch.no_grad():
        assert rel_err(got, model(ids).logits) < 1e-5


# ----------------------------------------------------------------------------- GGUF import

def _export(model_or_folder, path, tok_folder):
    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # F32 fallbacks / falcon eps: tested elsewhere
        return export_gguf(model_or_folder, path, tokenizer=tok_folder)


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("kind,vocab", [("falcon_mamba", 128), ("mamba2", 125)])
def test_gguf_from_another_converter_gets_llamacpps_defaults(kind, vocab, tiny_tokenizer, tmp_path):
    """A GGUF without this toolkit's mamba_deploy.* keys (llama.cpp's own converter writes none):
    residual_in_fp32 as transformers' default (G3), EOS from tokenizer.ggml.eos_token_id (G4),
    Falcon-Mamba's dt/B/C norm eps = the layer eps, as llama.cpp computes it (G5), and a vocabulary
    of 125 rows stays 125 logits, not padded to a multiple of 8 (G7). Logits match transformers."""
    import gguf
    from tokenizers import Tokenizer

    hf = build_hf_model(kind, vocab_size=vocab)
    hf.save_pretrained(tmp_path / "hf")
    ours = _export(tmp_path / "hf", tmp_path / "ours.gguf", tiny_tokenizer)
    (tmp_path / "g").mkdir()
    path = rewrite_gguf(ours, tmp_path / "g" / "m.gguf", drop=lambda k: k.startswith("mamba_deploy."))
    r = gguf.GGUFReader(str(path))
    assert not [k for k in r.fields if k.startswith("mamba_deploy.")]
    model = load_model(path)
    cfg = model.config
    assert cfg.residual_in_fp32 is hf.config.residual_in_fp32 is True
    assert cfg.eos_token_id == Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json")).token_to_id(EOS)
    if kind == "falcon_mamba":
        arch = r.get_field("general.architecture").contents()
        layer_eps = r.get_field(f"{arch}.attention.layer_norm_rms_epsilon").contents()
        assert cfg.mixer_rms_eps == pytest.approx(layer_eps, rel=1e-6)
    ids = _ids(2, 11, vocab=100)
    with torch.no_grad():
        got = model(ids).logits
    want = _hf_logits(hf, ids)
    assert got.shape == want.shape
    # falcon: transformers normalises dt/B/C with mixer_rms_eps (1e-6), llama.cpp with the layer eps
    assert rel_err(got, want) <= (1e-4 if kind == "falcon_mamba" else 1e-5)


def test_gguf_with_d_inner_not_a_multiple_of_d_model(tiny_tokenizer, tmp_path):  # G2
    """d_inner 48 on d_model 32 (transformers' intermediate_size; its config takes only an integer
    expand): ssm.inner_size is the layer width, not a whole multiple of d_model. llama.cpp runs
    Mamba1 at expand 2 only, so `export gguf` refuses this model; the file is written here as
    another converter would, and read back by the torch backend."""
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.gguf import write_gguf
    from mamba_deploy.export.gguf_tables import OUTTYPES
    from mamba_deploy.export.gguf_vocab import find_tokenizer_file, read_vocab

    import transformers
    from conftest import TINY

    cfg = transformers.MambaConfig(**TINY["mamba"]["kw"])
    cfg.intermediate_size = 48
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "A_log" in name or "dt" in name else 0.05))
    assert hf.backbone.layers[0].mixer.in_proj.weight.shape == (96, 32)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ExportError, match="expansion factor other than 2"):
        _export(tmp_path / "hf", tmp_path / "m.gguf", tiny_tokenizer)
    src = load_model(tmp_path / "hf")
    vocab = read_vocab(find_tokenizer_file(tiny_tokenizer, None), src.config.padded_vocab_size)
    write_gguf(src, vocab, tmp_path / "m.gguf", *OUTTYPES["f32"])
    model = load_model(tmp_path / "m.gguf")
    assert model.config.d_inner == 48
    ids = _ids(2, 11, vocab=100)
    with torch.no_grad():
        assert rel_err(model(ids).logits, _hf_logits(hf, ids)) <= 1e-5


def test_gguf_round_trip_keeps_the_dt_clamp(hf_checkpoint, tiny_tokenizer, tmp_path):  # G6
    """Mamba2's time_step_limit comes back from the GGUF (dropping it moves transformers' logits
    by ~5e-2 on this model)."""
    folder, hf = hf_checkpoint(DT_LIMIT_KIND)
    model = load_model(_export(folder, tmp_path / "m.gguf", tiny_tokenizer))
    assert tuple(model.config.dt_limit) == pytest.approx(tuple(hf.config.time_step_limit))
    ids = _ids(2, 21, vocab=100)
    with torch.no_grad():
        assert rel_err(model(ids).logits, _hf_logits(hf, ids)) <= 1e-5


def test_gguf_loads_in_the_dtype_asked_for(hf_checkpoint, tiny_tokenizer, tmp_path):  # G8 (dtype ignored)
    folder, hf = hf_checkpoint("mamba2")
    model = load_model(_export(folder, tmp_path / "m.gguf", tiny_tokenizer), dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    ids = _ids(2, 11, vocab=100)
    with torch.no_grad():
        assert rel_err(model(ids).logits.float(), _hf_logits(hf, ids)) <= 1e-2


def test_gguf_with_more_layers_than_its_block_count_is_refused(hf_checkpoint, tiny_tokenizer, tmp_path):  # G9
    """block_count 1 over a file holding two layers' tensors: a CheckpointError naming the
    tensors it would otherwise drop (it loaded as a silently truncated one-layer model)."""
    folder, _ = hf_checkpoint("mamba")
    src = _export(folder, tmp_path / "m.gguf", tiny_tokenizer)
    (tmp_path / "g").mkdir()
    bad = rewrite_gguf(src, tmp_path / "g" / "bad.gguf", edit={"mamba.block_count": 1})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['blk\.1\."):
        load_model(bad)



def test_gguf_mamba2_head_count_not_dividing_the_width_names_the_gguf_keys():  # G11
    """A GGUF whose ssm.time_step_rank (Mamba2's head count, 6) does not divide ssm.inner_size (64)
    is a ConfigError naming those GGUF keys (without the check it blamed config.json's expand /
    head_dim, which a GGUF does not have)."""
    from types import SimpleNamespace

    from mamba_deploy.errors import ConfigError
    from mamba_deploy.export.gguf_import import read_config

    fields = {"general.architecture": "mamba2", "mamba2.embedding_length": 32, "mamba2.block_count": 2,
              "mamba2.ssm.conv_kernel": 4, "mamba2.ssm.inner_size": 64, "mamba2.ssm.state_size": 16,
              "mamba2.ssm.time_step_rank": 4, "mamba2.ssm.group_count": 1,
              "mamba2.attention.layer_norm_rms_epsilon": 1e-5}

    class Reader:  # the GGUFReader surface read_config uses
        def __init__(self, f):
            self.f = f

        def get_field(self, key):
            return SimpleNamespace(contents=lambda: self.f[key]) if key in self.f else None

    shapes = {"token_embd.weight": (128, 32)}
    assert read_config(Reader(fields), shapes).headdim == 16  # the fake reader is right
    with pytest.raises(ConfigError, match=r"time_step_rank \(head count\) 6 does not divide ssm.inner_size 64"):
        read_config(Reader({**fields, "mamba2.ssm.time_step_rank": 6}), shapes)

# ----------------------------------------------------------------------------- verify

def _verify(ref_folder, art_runner, **kw):
    from mamba_deploy import verify as V
    from mamba_deploy.runners.torch_runner import TorchRunner

    kw = {"lengths": (5, 9), "batches": (2,), "decode_steps": 2, "progress": False, **kw}
    return V.verify(TorchRunner(load_model(ref_folder)), art_runner, **kw)


def _corrupted(hf, tmp_path, name="backbone.layers.0.mixer.out_proj.weight"):
    import copy

    bad = copy.deepcopy(hf)
    with torch.no_grad():
        dict(bad.named_parameters())[name][3, 5] += 0.5
    bad.save_pretrained(tmp_path / "bad")
    return tmp_path / "bad", bad


def _hf_states(hf, ids):
    """transformers' cache after a prefill: conv windows (its last d_conv - 1 inputs, the part a
    state carries forward) and SSM states, every layer, float64."""
    with torch.no_grad():
        c = hf_cache(hf(ids, use_cache=True))
    n = hf.config.num_hidden_layers
    conv = torch.stack([c.get_conv_state(i)[..., 1:] for i in range(n)]).double()
    ssm = torch.stack([c.get_recurrent_state(i) for i in range(n)]).double()
    return conv, ssm


def test_state_errors_match_transformers_cache(hf_checkpoint, tmp_path):  # V5 (conv state error ignored)
    """verify's per-kind state errors after prefill, recomputed from transformers' caches of the
    reference and the corrupted model (max |diff| / max |ref| over all layers: layout-free), and
    state_rel is the worse of the two (here the conv windows', 0.18 vs 0.10)."""
    from mamba_deploy.runners.torch_runner import TorchRunner

    class Recording(TorchRunner):
        seen = []

        def prefill(self, ids, state, attention_mask=None, last_only=False):
            self.seen.append(ids.clone())
            return super().prefill(ids, state, attention_mask, last_only)

    folder, hf = hf_checkpoint("mamba")
    bad_folder, bad_hf = _corrupted(hf, tmp_path)
    art = Recording(load_model(bad_folder))
    report = _verify(folder, art, decode_steps=0)
    worst = worst_conv = worst_ssm = 0.0
    assert report.cases[-1].get("left_padded")  # last, after the sequence; its rows run alone in transformers
    for case, ids in zip(report.cases, art.seen[:len(report.cases) - 1] + art.seen[-1:]):
        rows = [ids[i:i + 1, case["length"] - n:] for i, n in enumerate(case.get("left_padded", []))] or [ids]
        (rc, rs), (bc, bs) = [[torch.cat(t, 1) for t in zip(*[_hf_states(m, r) for r in rows])] for m in (hf, bad_hf)]
        conv = float((bc - rc).abs().max() / rc.abs().max())
        ssm = float((bs - rs).abs().max() / rs.abs().max())
        st = case["state_after_prefill"]
        assert st["conv"] == pytest.approx(conv, rel=1e-3) and st["ssm"] == pytest.approx(ssm, rel=1e-3)
        worst = max(worst, conv, ssm)
        worst_conv, worst_ssm = max(worst_conv, conv), max(worst_ssm, ssm)
    assert worst_conv > worst_ssm  # the case this test is for
    (check,) = [c for c in report.checks if c.name == "state_rel"]
    assert check.value == pytest.approx(worst, rel=1e-3)


def test_decode_is_teacher_forced_with_the_references_greedy_tokens(hf_checkpoint, tmp_path):  # V6
    """The tokens fed to both sides after prefill are transformers' greedy continuation of the
    reference, even where the artifact (another random model of the same shape) would pick others."""
    from mamba_deploy.runners.torch_runner import TorchRunner

    class Recording(TorchRunner):
        def __init__(self, model):
            super().__init__(model)
            self.prefills, self.steps = [], []

        def prefill(self, ids, state, attention_mask=None, last_only=False):
            self.prefills.append(ids.clone())
            return super().prefill(ids, state, attention_mask, last_only)

        def step(self, ids, state):
            self.steps.append(ids.clone())
            return super().step(ids, state)

    folder, hf = hf_checkpoint("mamba2_g2")
    other = build_hf_model("mamba2_g2", seed=1)
    other.save_pretrained(tmp_path / "other")
    art = Recording(load_model(tmp_path / "other"))
    steps = 3
    report = _verify(folder, art, decode_steps=steps, lengths=(4, 7))
    differ = 0
    for i, case in enumerate(c for c in report.cases if not c.get("left_padded")):  # (rows alone: other tests)
        seq = art.prefills[i]
        for s in range(steps):
            with torch.no_grad():
                want = hf(seq, use_cache=False).logits[:, -1].argmax(-1)
                mine = other(seq, use_cache=False).logits[:, -1].argmax(-1)
            differ += int((want != mine).sum())
            assert torch.equal(art.steps[i * steps + s], want), (case["length"], s)
            seq = torch.cat([seq, want[:, None]], 1)
    assert differ > 0  # the artifact's own greedy tokens would have been others


def test_all_four_limits_are_inclusive(hf_checkpoint, tmp_path):  # V8 (logits_rel strict)
    """Every check passes with its limit set to exactly the value measured (the doc: limits are
    inclusive), and fails just below (above for top1)."""
    from mamba_deploy import verify as V

    folder, hf = hf_checkpoint("mamba2_g2")
    bad_folder, _ = _corrupted(hf, tmp_path)
    from mamba_deploy.runners.torch_runner import TorchRunner

    ko = _verify(folder, TorchRunner(load_model(bad_folder)))
    values = {c.name: c.value for c in ko.checks}
    assert set(values) == {"logits_rel", "state_rel", "top1", "ppl_rel"} and values["logits_rel"] > 0
    assert all(c.passed for c in V._build_checks(ko.cases, ko.sequence, V.make_tolerance(values)))
    for name, v in values.items():
        tighter = {**values, name: v * (1.001 if name == "top1" else 0.999)}
        failed = [c.name for c in V._build_checks(ko.cases, ko.sequence, V.make_tolerance(tighter)) if not c.passed]
        assert failed == [name], (name, failed)


def test_state_after_decode_is_checked(hf_checkpoint):  # V9 (state after decode skipped)
    """A backend whose decode step returns the right logits but leaves a wrong state behind
    (here: the SSM state x 1.5) fails state_rel after the last step, even where no later logit
    shows it."""
    from mamba_deploy.runners.torch_runner import TorchRunner

    class BadStepState(TorchRunner):
        def step(self, ids, state):
            logits, state = super().step(ids, state)
            state.ssm.mul_(1.5)
            return logits, state

    folder, _ = hf_checkpoint("mamba")
    report = _verify(folder, BadStepState(load_model(folder)), decode_steps=1)
    failed = {c.name: c for c in report.checks if not c.passed}
    assert set(failed) == {"state_rel"}, report.table()
    assert "state after decode" in failed["state_rel"].where


def test_float64_reference_really_runs_in_float64(hf_checkpoint):  # V10 (float64 reference run in float32)
    """--reference-dtype float64 (open_pair): the reference runs in float64, so against the same
    checkpoint run in float32 the logits differ by float32 rounding: nonzero, far below fp32's
    limit (two float32 runs agree exactly)."""
    from mamba_deploy import verify as V

    folder, _ = hf_checkpoint("mamba2")
    ref, art, _ = V.open_pair(folder, folder, reference_dtype="float64")
    try:
        assert next(ref.model.parameters()).dtype == torch.float64
        report = V.verify(ref, art, lengths=(9,), batches=(2,), decode_steps=1, progress=False)
    finally:
        art.close()
        ref.close()
    assert 0 < report.cases[0]["prefill"]["rel"] < 1e-5, report.table()
    assert report.passed, report.table()


def test_gguf_type_labels_get_the_row_of_their_code_width():  # V1, V2 (a K-quant label on another row)
    """llama.cpp's type names carry their code width (q5_k_m: 5-bit codes, iq4_xs: 4-bit): every
    such label verify knows maps to that width's row, also spelled as the gguf package's
    LlamaFileType names it (MOSTLY_Q5_K_M)."""
    import re

    import gguf

    from mamba_deploy import verify as V

    width_row = {8: "int8", 6: "q6", 5: "q5", 4: "int4", 3: "q3", 2: "q2"}
    file_types = {ft.name.lower() for ft in gguf.LlamaFileType}
    checked = 0
    for label in sorted(V.LABEL_ALIASES):
        m = re.fullmatch(r"i?q(\d)_(0|1|k|k_s|k_m|k_l|nl|xs)", label)
        if m is None or int(m.group(1)) not in width_row:
            continue
        assert V.tolerance_row(label) == width_row[int(m.group(1))], label
        if f"mostly_{label}" in file_types:
            assert V.tolerance_row(f"MOSTLY_{label.upper()}") == width_row[int(m.group(1))], label
        checked += 1
    assert checked >= 15


def test_tolerance_rows_loosen_as_bits_drop():  # V21 (two rows' limits swapped)
    """From fp32 down to q2 every limit is at least as loose as the row above it."""
    from mamba_deploy import verify as V

    order = ["fp32", "fp16", "bf16", "int8", "q6", "fp8", "q5", "int4", "q3", "q2"]
    assert set(order) == set(V.TOLERANCES)
    for hi, lo in zip(order, order[1:]):
        a, b = V.TOLERANCES[hi], V.TOLERANCES[lo]
        for k in ("logits_rel", "state_rel", "ppl_rel"):
            assert b[k] >= a[k], (hi, lo, k)
        assert b["top1"] <= a["top1"], (hi, lo)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
@pytest.mark.parametrize("outtype,row", [("q8_0", "int8"), ("q4_0", "int4"), ("f16", "fp16")])
def test_gguf_without_file_type_gets_the_row_of_its_matrices(kind, outtype, row, tiny_tokenizer, tmp_path):
    """No general.file_type (older or third-party files): the row comes from the type the weight
    matrices are stored in. Was: the most common type among 2-D tensors, which in a Mamba2 file are
    mostly the small F32 ones every outtype keeps (conv, A, D, gated norm: 4 a layer against 2
    matrices), so a Q4_0 file got fp32's limits and failed verify (a real bug, fixed)."""
    import gguf

    from mamba_deploy import verify as V
    from mamba_deploy.export.gguf import export_gguf

    hf = build_hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = export_gguf(tmp_path / "hf", tmp_path / "m.gguf", outtype=outtype, tokenizer=tiny_tokenizer)
    (tmp_path / "g").mkdir()
    path = rewrite_gguf(src, tmp_path / "g" / "m.gguf", drop=lambda k: k == "general.file_type")
    r = gguf.GGUFReader(str(path))
    assert r.get_field("general.file_type") is None
    assert r.get_field(f"{r.get_field('general.architecture').contents()}.ssm.inner_size") is not None
    assert V.tolerance_row(V.infer_artifact_dtype(path)) == row


def test_text_ids_must_be_inside_the_vocabulary(hf_checkpoint):  # V14 (id == vocab let through)
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.runners.torch_runner import TorchRunner

    folder, _ = hf_checkpoint("mamba")
    with pytest.raises(ConfigError, match="token id 128 is outside the vocabulary of 128"):
        _verify(folder, TorchRunner(load_model(folder)), text_ids=[1, 2, 128, 3])


@pytest.mark.parametrize("bits,row", [(8, "int8"), (6, "q6"), (5, "q5"), (4, "int4"), (3, "q3"), (2, "q2")])
def test_other_quantizers_bit_width_picks_the_row(tmp_path, bits, row):  # V17 (q5 / q6 swapped)
    """A checkpoint quantized by another tool whose quantization_config names only its bit width
    is judged by that width's row."""
    from mamba_deploy import verify as V

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "other",
                                                                               "bits": bits}}))
    assert V.tolerance_row(V.infer_artifact_dtype(tmp_path)) == row


def test_mamba2_models_differing_only_in_groups_are_named(hf_checkpoint, tmp_path):  # V18
    """Same width, heads and state size, 1 vs 2 B/C groups: not the same model, said up front with
    the differing field (not blamed on the artifact runner's state layout)."""
    from mamba_deploy.errors import VerificationError
    from mamba_deploy.runners.torch_runner import TorchRunner

    folder, _ = hf_checkpoint("mamba2")
    build_hf_model("mamba2", n_groups=2).save_pretrained(tmp_path / "g2")
    with pytest.raises(VerificationError, match="the artifact has ngroups 2 where the reference has ngroups 1"):
        _verify(folder, TorchRunner(load_model(tmp_path / "g2")))
