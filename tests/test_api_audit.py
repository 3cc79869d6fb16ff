"""Python-API misuse that an audit (2026-11-23) found crashing the process, failing deep inside
torch / llama.cpp, or silently computing something else. Each test fails on the code before
its fix (the llama.cpp ones crashed the interpreter there: a freed context used again, or a
GGML_ASSERT abort)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err

from mamba_deploy import load_model
from mamba_deploy.errors import CheckpointError, ConfigError, ShapeError
from mamba_deploy.runners import open_runner

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    return export_gguf(DEMO, tmp_path_factory.mktemp("api_audit") / "m.gguf", outtype="f32")


def _llama(gguf, **kw):
    pytest.importorskip("llama_cpp")
    return open_runner(gguf, "llama.cpp", **kw)


def test_llamacpp_batch_beyond_its_sequence_limit_is_refused_and_the_runner_goes_on(gguf):
    r = _llama(gguf)
    with pytest.raises(ShapeError, match="at most 256 sequences, a batch of 300"):
        r.new_state(300)
    ref = _llama(gguf)
    want, _ = ref.prefill(torch.tensor([[5, 6, 7]]), ref.new_state(1))
    got, _ = r.prefill(torch.tensor([[5, 6, 7]]), r.new_state(1))
    assert rel_err(got, want) == 0


def test_llamacpp_context_that_cannot_be_made_leaves_the_old_one(gguf, monkeypatch):
    """The old context was freed first and its handles kept: the next call used freed memory."""
    from mamba_deploy.runners.llamacpp_runner import LlamaCppRunner

    r = _llama(gguf)
    real = LlamaCppRunner._init_context

    def fail_large(self, n_seq):
        if n_seq > 4:
            raise CheckpointError("llama.cpp could not create a context (simulated)")
        real(self, n_seq)

    monkeypatch.setattr(LlamaCppRunner, "_init_context", fail_large)
    with pytest.raises(CheckpointError, match="simulated"):
        r.new_state(8)
    st = r.new_state(2)
    got, _ = r.prefill(torch.tensor([[5, 6, 7], [8, 9, 10]]), st)
    monkeypatch.undo()
    ref = _llama(gguf)
    want, _ = ref.prefill(torch.tensor([[5, 6, 7], [8, 9, 10]]), ref.new_state(2))
    assert rel_err(got, want) == 0


@pytest.mark.parametrize("kw,needle", [
    (dict(n_ctx=1), "n_ctx=1 is smaller than n_seq_max=4"),  # GGML_ASSERT abort
    (dict(n_batch=0), "n_batch must be an integer in 1..inf, got 0"),
    (dict(n_ctx="x"), "n_ctx must be an integer"),
    (dict(n_seq_max=300), "n_seq_max must be an integer in 1..256, got 300"),
])
def test_llamacpp_options_are_checked_before_loading(gguf, kw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        _llama(gguf, **kw)


def test_llamacpp_growing_past_n_ctx_is_refused(gguf):
    r = _llama(gguf, n_ctx=4)
    with pytest.raises(ShapeError, match="n_ctx=4 is smaller than the 8 sequences"):
        r.new_state(8)
    assert r.new_state(4).batch_size == 4


def test_llamacpp_fresh_state_reads_as_zeros(gguf):
    """llama.cpp writes 0 cells for a sequence without tokens: it was a NotImplementedError."""
    r = _llama(gguf)
    st = r.to_torch_state(r.new_state(2))
    ref = load_model(DEMO).new_state(2)
    assert st.conv.shape == ref.conv.shape and st.ssm.shape == ref.ssm.shape
    assert not st.conv.any() and not st.ssm.any()


def test_a_float64_state_needs_a_float64_model():
    """It was accepted by set_state_dtype / new_state / State.check, then every forward failed
    in the kernels ("expected scalar type Double but found Float")."""
    with pytest.raises(ConfigError, match="float64 needs a float64 model"):
        load_model(DEMO, state_dtype=torch.float64)
    m = load_model(DEMO)
    with pytest.raises(ConfigError, match="float64 needs a float64 model"):
        m.new_state(1, ssm_dtype=torch.float64)
    st = m.new_state(1)
    st.ssm = st.ssm.double()
    with pytest.raises(ShapeError, match="an ssm in float32, bfloat16, float16"):
        m(torch.tensor([[5]]), state=st)
    assert m.new_state(1, ssm_dtype="bf16").ssm.dtype == torch.bfloat16  # the CLI's names are taken too
    m64 = load_model(DEMO, dtype=torch.float64, state_dtype=torch.float64)
    want = load_model(DEMO)(torch.tensor([[5, 6, 7]])).logits
    assert rel_err(m64(torch.tensor([[5, 6, 7]])).logits, want) < 1e-5


@pytest.mark.parametrize("ids,needle", [
    (torch.tensor([list(range(10, 20)), list(range(20, 30))]), r"one stream, shape \(n,\) or \(1, n\), got \(2, 10\)"),
    ([i + 0.9 for i in range(10, 30)], "integer token ids, got torch.float64"),
    ([True, False, True], "integer token ids, got torch.bool"),
])
def test_perplexity_refuses_what_it_would_score_as_something_else(ids, needle):
    """A batch was flattened into one stream, floats truncated and bools read as 0 / 1."""
    from mamba_deploy.eval import perplexity

    with open_runner(DEMO, "torch") as r, pytest.raises(ShapeError, match=needle):
        perplexity(r, ids, window=8)


@pytest.mark.parametrize("window", ["16", None, 2.5, True])
def test_perplexity_window_and_runner_are_checked(window):
    from mamba_deploy.eval import perplexity

    ids = list(range(10, 30))
    with open_runner(DEMO, "torch") as r, pytest.raises(ConfigError, match="must be an integer >= 1"):
        perplexity(r, ids, window=window)
    with pytest.raises(ConfigError, match="perplexity needs a Runner, got MambaLM"):
        perplexity(load_model(DEMO), ids)


def test_verify_text_ids_that_are_not_integers_are_refused():
    from mamba_deploy.verify import verify

    with open_runner(DEMO, "torch") as a, open_runner(DEMO, "torch") as b, \
            pytest.raises(ShapeError, match="text_ids must be integer token ids"):
        verify(a, b, lengths=(1,), batches=(1,), decode_steps=0, text_ids=[1.5, 2.5, 3.5])


@pytest.mark.parametrize("mask", [[[1], [1, 1]], "abc", [[None, 1, 1]]])
def test_malformed_attention_masks_are_shape_errors(mask):
    with pytest.raises(ShapeError, match="attention_mask"):
        load_model(DEMO)(torch.tensor([[5, 6, 7]]), attention_mask=mask)


def test_tokenizer_refuses_what_is_not_text_or_ids():
    tok = load_model(DEMO).tokenizer
    with pytest.raises(ConfigError, match="encode takes a str, got NoneType"):
        tok.encode(None)
    for bad, needle in (([1.5], "integer token ids"), ([-1], "token id -1"), ("abc", "token ids")):
        with pytest.raises(ShapeError, match=needle):
            tok.decode(bad)
    assert tok.decode([]) == "" and tok.decode(torch.tensor([[40, 41]])) == tok.decode([40, 41])


@pytest.mark.parametrize("stops", [[5.7], ["a"], [None], [True]])
def test_generate_refuses_stop_ids_that_are_not_integers(stops):
    """[5.7] silently stopped on 5; the others were TypeError / ValueError from int()."""
    from mamba_deploy.generation import generate

    with open_runner(DEMO, "torch") as r, pytest.raises(ConfigError, match="stop_token_ids must be integer"):
        generate(r, "def", max_new_tokens=2, stop_token_ids=stops)


def test_numpy_integer_seeds_work_as_ints():
    """is_seed took np.int64 and torch's manual_seed then refused it (TypeError)."""
    from mamba_deploy.generation import generate

    with open_runner(DEMO, "torch") as r:
        a = generate(r, "def", max_new_tokens=4, temperature=1.0, seed=np.int64(3)).tokens
        b = generate(r, "def", max_new_tokens=4, temperature=1.0, seed=3).tokens
    assert a == b


@pytest.mark.parametrize("bad", [None, 3, b"models/demo-mamba2"])
def test_load_model_path_must_be_a_path(bad):
    from mamba_deploy.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="load_model takes a path or hub id"):
        load_model(bad)


@pytest.mark.parametrize("dtype", ["float8", torch.int8, np.float16, torch.complex64])
def test_load_model_dtype_must_be_a_float_torch_dtype(dtype):
    """"float16" reached Module.to as a device name (the names of DTYPE_NAMES are now read as their
    dtypes, as the CLI's --dtype is: tests/test_review_forty_third.py); complex64 was accepted."""
    with pytest.raises(ConfigError, match="is not one a model loads in"):
        load_model(DEMO, dtype=dtype)


def test_export_gguf_keeps_a_file_that_is_not_a_gguf(tmp_path):
    """Any existing file was overwritten with GGUF bytes (notes.txt)."""
    pytest.importorskip("gguf")
    from mamba_deploy.errors import OutputPathError
    from mamba_deploy.export.gguf import export_gguf

    notes = tmp_path / "notes.txt"
    notes.write_text("important")
    with pytest.raises(OutputPathError, match="must end in .gguf.*that file exists and is kept"):
        export_gguf(DEMO, notes)
    assert notes.read_text() == "important"


def test_quantize_takes_a_loaded_model_and_a_list_include():
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    with pytest.raises(QuantizationError, match="quantize takes a loaded model, got str"):
        quantize(str(DEMO), "int8")
    with pytest.raises(QuantizationError, match="include=5 must be a list of module names"):
        quantize(load_model(DEMO), "int8", include=5)


def test_onnx_runner_batch_zero_is_empty_like_the_torch_runner(tmp_path):
    """ONNX Runtime's Reshape failed on 0 rows (a RuntimeError); the other runners return empty logits."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy.export.onnx import export_onnx

    out = export_onnx(DEMO, tmp_path / "onnx", validate=False)
    got, want = {}, {}
    for name, path, into in (("onnx", out, got), ("torch", DEMO, want)):
        with open_runner(path, name) as r:
            st = r.new_state(0)
            into["full"], st = r.prefill(torch.zeros(0, 3, dtype=torch.long), st)
            into["last"], st = r.prefill(torch.zeros(0, 3, dtype=torch.long), st, last_only=True)
            into["step"], st = r.step(torch.zeros(0, dtype=torch.long), st)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


def test_make_server_refuses_a_template_file_name_as_template_text():
    """chat_template="/x/chat.jinja" compiled as a constant template: every chat rendered the name."""
    from mamba_deploy.chat import ChatTemplateError
    from mamba_deploy.serve import make_server

    with open_runner(DEMO, "torch") as r, pytest.raises(ChatTemplateError, match="looks like a file name"):
        make_server(r, "127.0.0.1", 0, chat_template="/nope/chat.jinja")


def test_small_api_argument_checks():
    """Each was a TypeError from deep inside: a bare provider name iterated letter by letter
    ("providers ['C', 'P', 'U', ...] are not available"), tolerance=5, make_server(host=5)."""
    from mamba_deploy.serve import make_server
    from mamba_deploy.verify import make_tolerance

    pytest.importorskip("onnxruntime")
    with pytest.raises(ConfigError, match="tolerance must be a label"):
        make_tolerance(5)
    with open_runner(DEMO, "torch") as r, pytest.raises(ConfigError, match="host must be a name or address string"):
        make_server(r, 5, 0)


def test_onnx_runner_takes_one_provider_name(tmp_path):
    pytest.importorskip("onnxruntime")
    from mamba_deploy.export.onnx import export_onnx

    out = export_onnx(DEMO, tmp_path / "onnx", validate=False)
    with open_runner(out, "onnx", providers="CPUExecutionProvider") as r:
        assert r.session.get_providers() == ["CPUExecutionProvider"]


def test_open_runner_refuses_an_option_no_backend_takes():
    """thread=2 (a typo) was swallowed by every factory's **kwargs."""
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['thread'\]; the torch backend takes device, dtype"):
        open_runner(DEMO, "torch", thread=2)


@pytest.mark.parametrize("backend", ["torch", "onnx", "llama.cpp", "openvino", "tensorrt"])
def test_open_runner_option_table_matches_each_factory(backend):
    """runners.OPTIONS is the data open_runner checks against; a factory's new keyword must be added there."""
    import importlib
    import inspect

    from mamba_deploy.runners import BACKENDS, OPTIONS

    mod, fn = BACKENDS[backend]
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        pytest.skip(f"{backend} cannot be imported here: {e}")
    params = inspect.signature(factory).parameters
    named = {n for n, p in params.items() if n != "path" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    assert named == set(OPTIONS[backend])


@pytest.mark.parametrize("kw,needle", [
    (dict(max_new_tokens=True), "max_new_tokens must be an int >= 0, got True"),
    (dict(on_token=5), "on_token must be a function"),
    (dict(on_prefill="x", prefill_chunk=2), "on_prefill must be a function"),
])
def test_generate_checks_its_counts_and_callbacks_first(kw, needle):
    """True was taken as 1 token; a non-callable on_token failed at the first token (TypeError)."""
    from mamba_deploy.generation import generate

    with open_runner(DEMO, "torch") as r, pytest.raises(ConfigError, match=needle):
        generate(r, "def", **kw)


def test_export_argument_checks(tmp_path):
    """An nn.Module that is not a Mamba model failed on its missing .config; ollama="no" wrote a
    Modelfile; n_threads=None failed in llama.cpp's quantizer after the f32 pass."""
    pytest.importorskip("gguf")
    pytest.importorskip("onnx")
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.export.onnx import export_onnx

    for export, out in ((export_onnx, tmp_path / "o"), (export_gguf, tmp_path / "m.gguf")):
        with pytest.raises(ExportError, match="export takes a mamba_deploy model .* got Linear"):
            export(torch.nn.Linear(2, 2), out)
        assert not out.exists()
    with pytest.raises(ExportError, match="ollama must be True or False, got 'no'"):
        export_gguf(DEMO, tmp_path / "m.gguf", ollama="no")
    assert export_gguf(DEMO, tmp_path / "m.gguf", n_threads=None).is_file()


def test_accuracy_level_true_is_not_level_1(tmp_path):
    """True == 1 passed the level check and the manifest recorded "accuracy_level": true."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.quant import quantize

    with pytest.raises(ExportError, match="accuracy_level True is not one of"):
        export_onnx(quantize(load_model(DEMO), "int8", progress=False), tmp_path / "q", accuracy_level=True)
    assert not (tmp_path / "q").exists()


def test_llamacpp_tokenizer_encode_takes_a_str(gguf):
    with pytest.raises(ConfigError, match="encode takes a str, got NoneType"):
        _llama(gguf).tokenizer.encode(None)


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_text_with_a_lone_surrogate_is_a_config_error(gguf, backend, capsys):
    """Python and JSON allow lone surrogates ("\\ud800"), which are not text: the tokenizers
    raised a raw TypeError (tokenizers) or UnicodeEncodeError (llama.cpp), a traceback in the CLI."""
    from mamba_deploy.cli import main

    path = DEMO if backend == "torch" else gguf
    r = open_runner(path, backend) if backend == "torch" else _llama(gguf)
    with r, pytest.raises(ConfigError, match=r"holds '\\ud800' at character 3, a lone surrogate"):
        r.tokenizer.encode("abc\ud800def")
    argv = ["generate", str(path), "--backend", backend, "--prompt", "abc\ud800", "--max-new-tokens", "2",
            "--threads", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lone surrogate" in err and "Traceback" not in err


def test_generate_given_a_model_is_a_config_error():
    """generate(model, ...) was AttributeError: 'MambaLM' object has no attribute 'vocab_size'."""
    from mamba_deploy.generation import generate

    with pytest.raises(ConfigError, match=r"generate needs a Runner, got MambaLM; open one with mamba_deploy.runners.open_runner\(path\) \(or call "
                                          r"model.generate"):
        generate(load_model(DEMO), "def f(")
    with pytest.raises(ConfigError, match="generate needs a Runner, got str"):
        generate(str(DEMO), "def f(")


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_results_are_strict_when_values_are_not_finite(tmp_path, capsys):
    """A broken artifact's NaN / inf went out as bare NaN / Infinity, which JSON parsers other
    than Python's refuse (JavaScript's JSON.parse, jq): eval --json printed "ppl": NaN and
    verify --json wrote "value": NaN. They are null now."""
    from mamba_deploy import save_checkpoint
    from mamba_deploy.atomic import json_text
    from mamba_deploy.cli import main

    assert _strict_json(json_text({"a": float("nan"), "b": [float("inf"), 1.5, {"c": -float("inf")}]})) == \
        {"a": None, "b": [None, 1.5, {"c": None}]}
    model = load_model(DEMO)
    with torch.no_grad():  # within float16's range, so it loads; its activations overflow in fp16
        model.backbone.layers[1].mixer.out_proj.weight.fill_(60000.0)
    bad = save_checkpoint(model, tmp_path / "bad", dtype=torch.float16)
    text = tmp_path / "t.txt"
    text.write_text("def main():\n    return 0\n" * 4)
    assert main(["eval", str(bad), "--dtype", "fp16", "--text", str(text), "--json", "--threads", "1"]) == 0
    res = _strict_json(capsys.readouterr().out)
    assert res["ppl"] is None
    out = tmp_path / "v.json"
    main(["verify", str(DEMO), str(bad), "--artifact-dtype", "fp16", "--lengths", "5", "--batch", "1",
          "--json", str(out), "--threads", "1"])
    capsys.readouterr()
    assert "null" in out.read_text() and _strict_json(out.read_text())
