"""From the thirty-sixth session's reviews; each test fails on the code before its fix.

Server (an OpenAI client's view): an integer temperature past int64 (10**20, inside float range)
and a tiny accepted repetition_penalty were 500s; misspelt fields (`max_token`) were silently
ignored, where OpenAI answers "Unrecognized request argument"; `stream_options` without a stream
was accepted; 405s had no Allow header (RFC 9110 15.5.6) and HEAD was a 501 (RFC 9110 9.1);
with include_usage the other chunks lacked OpenAI's `"usage": null`.
References: the OpenAI API reference's documented behaviour, RFC 9110, and float64 math.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_review_serve_chat import DEMO2, _post, _request
from test_review_serve_chat import server as _serve_chat_server  # noqa: F401  (its fixture, under this name)
from trt_standin import RecordingTensorRT

from mamba_deploy.errors import ConfigError
from mamba_deploy.generation import SamplingConfig, apply_repetition_penalty, filtered_probs


@pytest.fixture(scope="module")
def server(_serve_chat_server):  # noqa: F811  (the imported fixture, requested by name)
    """The review of serve.py's server: demo-mamba2 with a ChatML template."""
    return _serve_chat_server


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "min_p"])
def test_an_integer_past_int64_is_read_as_the_float_it_is(server, field):
    # 10**20 is a valid JSON number inside float range; torch cannot take it as a Python int
    value = 10**20 if field in ("temperature", "repetition_penalty") else 1
    status, data = _post(server, {"prompt": "def main(", "max_tokens": 3, field: value, "seed": 0})
    assert status == 200, data
    assert json.loads(data)["usage"]["completion_tokens"] >= 1


def test_sampling_config_takes_big_integers_as_floats_and_refuses_past_float_range():
    cfg = SamplingConfig(temperature=10**20, repetition_penalty=10**20)
    assert isinstance(cfg.temperature, float) and cfg.temperature == 1e20
    probs = filtered_probs(torch.randn(2, 50), cfg, torch.tensor([[1, 2], [3, 4]]))
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2))
    with pytest.raises(ConfigError, match="finite"):
        SamplingConfig(temperature=10**400)


@pytest.mark.parametrize("penalty", [1e-38, 1e-300])
def test_a_tiny_repetition_penalty_samples_instead_of_a_500(server, penalty):
    status, data = _post(server, {"prompt": "def main( def main(", "max_tokens": 4, "repetition_penalty": penalty,
                                  "seed": 1})
    assert status == 200, data


def test_a_tiny_repetition_penalty_makes_the_seen_token_certain():
    # float64 reference: 5 / 1e-38 (past float32's range) dwarfs every other logit, so the seen
    # token has probability 1; before, float32 made it inf and inf - inf gave NaN
    logits = torch.tensor([[-1.0, 5.0, -3.0, 0.5]])
    history = torch.tensor([[1]])
    out = apply_repetition_penalty(logits, history, 1e-38)
    assert torch.isfinite(out).all()
    probs = filtered_probs(logits, SamplingConfig(temperature=1.0, repetition_penalty=1e-38), history)
    ref = torch.softmax(torch.tensor([-1.0, 5.0 / 1e-38, -3.0, 0.5], dtype=torch.float64), -1)
    assert torch.allclose(probs.double(), ref, atol=1e-6)
    # a huge penalty on a negative logit is -inf: never drawn, the rest still a distribution
    probs = filtered_probs(torch.tensor([[-1.0, 2.0]]), SamplingConfig(1.0, repetition_penalty=1e300),
                           torch.tensor([[0]]))
    assert probs[0, 0] == 0 and math.isclose(probs[0, 1].item(), 1.0)


@pytest.mark.parametrize("path,body,name,near", [
    ("/v1/completions", {"prompt": "x", "max_token": 2}, "max_token", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temprature": 0}, "temprature", "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_token": 2},
     "max_completion_token", "max_completion_tokens"),
    ("/v1/completions", {"prompt": "x", "messages": []}, "messages", "/v1/chat/completions"),  # chat's field
])
def test_an_unknown_field_is_a_400_naming_it(server, path, body, name, near):
    status, data = _post(server, body, path)
    err = json.loads(data)["error"]
    assert status == 400 and err["param"] == name and name in err["message"], data
    if near:
        assert near in err["message"]


def test_known_bookkeeping_fields_are_still_accepted(server):
    body = {"prompt": "x", "max_tokens": 2, "user": "u1", "metadata": {"a": "b"}, "store": False, "seed": 0}
    assert _post(server, body)[0] == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "parallel_tool_calls": True,
            "user": "u1"}
    assert _post(server, chat, "/v1/chat/completions")[0] == 200


def test_stream_options_without_stream_is_refused(server):
    status, data = _post(server, {"prompt": "x", "max_tokens": 2, "stream_options": {"include_usage": True}})
    assert status == 400 and json.loads(data)["error"]["param"] == "stream_options"


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"),
    ("POST", "/health", "GET, HEAD"), ("POST", "/v1/models", "GET, HEAD"),
])
def test_a_405_names_the_allowed_methods(server, method, path, allow):
    status, headers, _ = _request(server, method, path, {} if method == "POST" else None)
    assert status == 405 and headers.get("Allow") == allow


@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/v1/completions", "POST"), ("DELETE", "/v1/models", "GET, HEAD"), ("PATCH", "/health", "GET, HEAD"),
])
def test_other_methods_are_a_405_with_allow_and_options_lists_them(server, method, path, allow):
    status, headers, _ = _request(server, method, path, {})
    assert status == 405 and headers.get("Allow") == allow  # before: 501 without Allow
    status, headers, body = _request(server, "OPTIONS", path)
    assert status == 204 and headers.get("Allow") == f"{allow}, OPTIONS" and body == b""
    assert "Content-Length" not in headers  # RFC 9110 8.6: never in a 204
    assert _request(server, "PUT", "/nope", {})[0] == 404


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_head_answers_the_get_headers_without_a_body(server, path):
    g_status, g_headers, g_body = _request(server, "GET", path)
    status, headers, body = _request(server, "HEAD", path)
    assert status == g_status == 200 and body == b""
    assert headers["Content-Type"] == g_headers["Content-Type"]
    if path == "/v1/models":  # /health's body holds live counters; the models list is fixed
        assert headers["Content-Length"] == g_headers["Content-Length"] == str(len(g_body))


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "def main(", "max_tokens": 4, "seed": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 0}),
])
def test_include_usage_puts_a_null_usage_on_every_other_chunk(server, path, body):
    status, _, data = _request(server, "POST", path, {**body, "stream": True,
                                                      "stream_options": {"include_usage": True}})
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] >= 1
    # without include_usage there is no usage key at all (OpenAI's default)
    _, _, data = _request(server, "POST", path, {**body, "stream": True})
    assert not any("usage" in json.loads(e[len("data: "):]) for e in data.decode().split("\n\n")[:-2] if e)


# ----------------------------------------------------------------------------- files (a review of every writer and reader)

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from mamba_deploy import cli  # noqa: E402
from mamba_deploy.errors import CheckpointError, ExportError, OutputPathError  # noqa: E402

DEMO1 = DEMO2.parent / "demo-mamba1"


def test_verify_json_onto_its_own_text_file_is_refused(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("def main():\n    return 1\n" * 20)
    before = text.read_bytes()
    assert cli.main(["verify", str(DEMO1), str(DEMO1), "--text", str(text), "--json", str(text)]) == 2
    assert "corpus.txt is a file of" in capsys.readouterr().err
    assert text.read_bytes() == before


def test_an_input_given_as_its_folders_file_protects_that_folder(tmp_path):
    from mamba_deploy.atomic import refuse_input_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEMO1, ckpt)
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"graph")
    (onnx_dir / "manifest.json").write_text("{}")
    gguf = tmp_path / "g" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    shutil.copy(DEMO1 / "tokenizer.json", gguf.parent / "tokenizer.json")
    (gguf.parent / "old_report.json").write_text("{}")
    for out, inputs in ((onnx_dir / "manifest.json", [DEMO1, onnx_dir / "model.onnx"]),
                        (ckpt / "tokenizer.json", [ckpt / "config.json", gguf]),
                        (gguf.parent / "tokenizer.json", [DEMO1, gguf])):  # the GGUF's loaders read it
        with pytest.raises(OutputPathError, match="an input of this command"):
            refuse_input_file(out, inputs, "--json", "verify.json")
    # a report beside a GGUF (not a file its loaders read) may still be replaced
    refuse_input_file(gguf.parent / "old_report.json", [DEMO1, gguf], "--json", "verify.json")


def test_demo_json_inside_its_out_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from mamba_deploy import demo

    ran = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: ran.append(1) or ([], True))
    for json_path in (tmp_path / "dd", tmp_path / "dd" / "demo.json"):
        assert cli.main(["demo", "--models", str(DEMO1), "--only", "gguf f32", "--out", str(tmp_path / "dd"),
                         "--json", str(json_path)]) == 2
        assert "lies in --out" in capsys.readouterr().err
    assert not ran and not (tmp_path / "dd").exists()


def _gguf_reader_eos_text(path: Path) -> str:
    import gguf

    r = gguf.GGUFReader(str(path))
    eos = int(r.fields["tokenizer.ggml.eos_token_id"].contents())
    return r.fields["tokenizer.ggml.tokens"].contents()[eos]


def test_a_reexport_rewrites_our_modelfile_for_the_new_gguf(tmp_path):
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    other = tmp_path / "other"  # the same model whose tokenizer's EOS is another token
    shutil.copytree(DEMO1, other)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = json.loads((other / name).read_text())
        if "eos_token" in data:
            data["eos_token"] = "<|pad|>"
            (other / name).write_text(json.dumps(data))
    out = tmp_path / "m.gguf"
    export_gguf(DEMO1, out, ollama=True)
    first = (tmp_path / "Modelfile").read_text()
    assert 'PARAMETER stop "<|endoftext|>"' in first.splitlines()
    with pytest.warns(UserWarning, match="rewritten for the new one"):
        export_gguf(other, out)
    text = (tmp_path / "Modelfile").read_text()
    assert _gguf_reader_eos_text(out) == "<|pad|>" and 'PARAMETER stop "<|pad|>"' in text.splitlines()


def test_a_failed_modelfile_write_leaves_the_earlier_gguf_and_modelfile(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import errno

    from mamba_deploy.export import gguf as gguf_export

    out = tmp_path / "m.gguf"
    gguf_export.export_gguf(DEMO1, out, ollama=True)
    old_gguf, old_mf = out.read_bytes(), (tmp_path / "Modelfile").read_text()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf_export, "modelfile_text", full)
    with pytest.raises(OutputPathError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gguf_export.export_gguf(DEMO2, out, ollama=True)
    assert out.read_bytes() == old_gguf and (tmp_path / "Modelfile").read_text() == old_mf
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]  # no temporaries


_KERNEL_PROBE = ("import warnings, sys; warnings.simplefilter('always')\n"
                 "from mamba_deploy.ops import cpu_kernels as k\n"
                 "print('simd', k.simd_level())\n")


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_a_damaged_cached_kernel_library_is_rebuilt(tmp_path, damage):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the CPU kernels")
    env = {**os.environ, "MAMBA_DEPLOY_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("MAMBA_DEPLOY_NO_CPU_KERNELS", None)
    first = subprocess.run([sys.executable, "-c", _KERNEL_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "simd -1" not in first.stdout, first.stderr
    (so,) = tmp_path.rglob("cpu_scan-*.so")
    with open(so, "r+b") as f:
        f.truncate(5000 if damage == "truncate" else 0)
    again = subprocess.run([sys.executable, "-c", _KERNEL_PROBE], env=env, capture_output=True, text=True, timeout=300)
    # before: SIGBUS (truncated) or the reference ops on every run, never rebuilt (empty)
    assert again.returncode == 0, (again.returncode, again.stderr[-500:])
    assert "damaged" in again.stderr and "simd -1" not in again.stdout
    assert so.stat().st_size > 5000


def test_openvino_names_a_graph_file_that_is_not_onnx(tmp_path):
    pytest.importorskip("openvino")
    from mamba_deploy.export.onnx import export_onnx, file_record
    from mamba_deploy.runners import open_runner as open_

    folder = export_onnx(DEMO1, tmp_path / "onnx", validate=False)
    graph = folder / "model.onnx"
    graph.write_bytes(os.urandom(4096))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = file_record(graph)  # re-recorded as for an edited graph
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="not a valid ONNX graph"):
        open_(folder, "openvino")


@pytest.mark.parametrize("kind,value", [("opt", {}), ("rng", "torch"), ("step", "2"), ("log", None)])
def test_resume_from_a_state_with_foreign_values_is_a_checkpoint_error(tmp_path, kind, value):
    from test_train import _tiny_run

    from mamba_deploy import train

    train.train(_tiny_run(tmp_path))
    state = tmp_path / "work" / "train_state.pt"
    st = torch.load(state, weights_only=False)
    st[kind] = torch.get_rng_state() if value == "torch" else value
    torch.save(st, state)
    with pytest.raises(CheckpointError, match=f"train_state.pt is not a `mamba-deploy train` state \\(its {kind}"):
        train.train(_tiny_run(tmp_path, steps=3, resume=True))


def test_a_gguf_eos_past_the_vocabulary_is_ignored_with_a_warning_naming_the_key(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from mamba_deploy import load_model
    from mamba_deploy.export.gguf import export_gguf

    path = export_gguf(DEMO1, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(path))
    f = r.fields["tokenizer.ggml.eos_token_id"]
    part = f.parts[f.data[0]]
    offset = part.__array_interface__["data"][0] - r.data.__array_interface__["data"][0]
    del r, f, part
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.array([10**6], dtype=np.uint32).tobytes())
    with pytest.warns(UserWarning, match="tokenizer.ggml.eos_token_id = 1000000 is outside"):
        model = load_model(path)
    assert model.tokenizer.eos_token_id is None
    res = model.generate(["def main("], max_new_tokens=3)  # before: "stop token id(s) [1000000] outside ..."
    assert len(res.tokens[0]) == 3


# ----------------------------------------------------------------------------- quantization (a review against the papers)

def test_gptq_act_order_takes_its_grids_from_the_weights_it_quantizes():
    """An input that never fires (H_jj = 0) gets weight 0, as without act-order; its group's
    scale must come from the zeroed weights, or one large stored value there (2.0 among 0.05s)
    stretches the whole group's grid. Reference: with act-order the grid of group 0 is the
    symmetric int4 absmax of the live weights (/7), in float64; and the calibration error stays
    within 1.5x of GPTQ without act-order (before: 39x, no better than round-to-nearest)."""
    from mamba_deploy.quant import algos, formats

    g = torch.Generator().manual_seed(3)
    T, n, out_f, gs = 2048, 256, 64, 128
    X = torch.randn(T, n, generator=g, dtype=torch.float64)
    X[:, 10] = 0
    W = torch.randn(out_f, n, generator=g) * 0.05
    W[:, 10] = 2.0
    H = 2 * X.T @ X / T
    ref = X @ W.double().T

    def err(t):
        return float(((X @ formats.decode(t, "int4", gs, True).double().T - ref) ** 2).mean())
    plain = algos.gptq(W, H, gs, True, act_order=False)
    ordered = algos.gptq(W, H, gs, True, act_order=True)
    live = W.double().clone()
    live[:, 10] = 0
    want = live[:, :gs].abs().amax(-1) / 7
    assert torch.allclose(ordered["scales"][:, 0].double(), want, rtol=2e-3)  # fp16 scales
    assert err(ordered) < 1.5 * err(plain)


def test_auto_keeps_group_size_and_asymmetric_for_the_4bit_layers_of_a_config(tmp_path, capsys):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"quant_cfg": {"*.in_proj": {"format": "int4"}}}))
    assert cli.main(["quantize", str(DEMO2), str(tmp_path / "q"), "--auto", "--config", str(rules),
                     "--group-size", "64", "--asymmetric"]) == 0
    out = capsys.readouterr().out
    assert "--auto picked int8" in out and "ignored" not in out
    modules = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    in_proj = modules["backbone.layers.0.mixer.in_proj"]
    assert in_proj["format"] == "int4" and in_proj["group_size"] == 64 and in_proj["symmetric"] is False
    # without a rule making 4-bit layers, both flags are dropped with a note (no 500-style refusal later)
    assert cli.main(["quantize", str(DEMO2), str(tmp_path / "r"), "--auto", "--group-size", "64",
                     "--asymmetric"]) == 0
    out = capsys.readouterr().out
    assert "--group-size 64 does not apply to int8" in out and "--asymmetric does not apply to int8" in out


# ----------------------------------------------------------------------------- eval (a review of the reported numbers)

def test_llamacpp_eval_carries_its_state_past_131072_tokens(hf_checkpoint, tiny_tokenizer, tmp_path):
    """A Mamba state has no context limit: `eval` streams a corpus of 423k tokens. The llama.cpp
    runner's default n_ctx (131072) refused position 131072. Reference: the torch backend's
    perplexity of the same ids (float32; llama.cpp F32 agrees to ~1e-6 elsewhere)."""
    pytest.importorskip("llama_cpp")
    from mamba_deploy.eval import perplexity
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.runners import open_runner as open_

    folder, _ = hf_checkpoint("mamba2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gguf_path = export_gguf(folder, tmp_path / "m.gguf", tokenizer=tiny_tokenizer)
    n = 131072 + 200
    ids = torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    with open_(gguf_path, "llama.cpp", threads=2) as r:
        got = perplexity(r, ids, window=8192)
    with open_(folder, "torch") as r:
        want = perplexity(r, ids, window=8192)
    assert got["tokens"] == want["tokens"] == n - 1
    assert abs(got["nll"] - want["nll"]) <= 1e-4 * abs(want["nll"])


def test_the_training_runs_unigram_baseline_counts_the_tokens_it_scores():
    """final_eval scores ids[1:] (the first token has no prediction); its unigram baseline over
    all ids disagreed with `eval --baseline` on the same text. Reference: add-one unigram
    perplexity in float64 over exactly the scored tokens."""
    import numpy as np

    from mamba_deploy import train
    from mamba_deploy.model import MambaLM
    from mamba_deploy.config import MambaConfig

    cfg = MambaConfig(arch="mamba2", d_model=16, n_layer=1, vocab_size=8, d_state=4, headdim=8, chunk_size=4)
    model = MambaLM(cfg)
    train_ids = np.array([0, 1, 1, 2, 3, 3, 3, 4])
    val_ids = np.array([7, 3, 3, 1])  # the first id (never scored) is the rarest: it moves the baseline
    res = train.final_eval(model, train_ids, val_ids, 4, 8)
    counts = np.bincount(train_ids, minlength=8) + 1.0
    logp = np.log(counts / counts.sum())
    want = float(np.exp(-logp[val_ids[1:]].mean()))
    assert res["tokens"] == 3 and abs(res["unigram_ppl"] - want) < 1e-9 * want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a model quantized on the GPU)")
@pytest.mark.parametrize("method,kw", [("gptq", {}), ("gptq", {"act_order": True}), ("awq", {}), ("smoothquant", {})])
def test_calibrated_methods_quantize_a_model_on_the_gpu(method, kw):
    """The calibration statistics are gathered on the CPU; GPTQ, AWQ and SmoothQuant mixed them
    with a CUDA model's weights ("Expected all tensors to be on the same device"). The codes must
    be the CPU run's (same algorithm and inputs; float32 on both devices: a few codes may round
    the other way), and the quantized model must compute its dequantized weights' function."""
    from mamba_deploy import load_model
    from mamba_deploy.quant.quantizer import quantize

    opts = dict(n_calib=4, calib_len=64, progress=False, **kw)
    cpu, gpu = load_model(DEMO2), load_model(DEMO2, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(cpu, method, **opts)
        quantize(gpu, method, **opts)
    name = "backbone.layers.0.mixer.in_proj"
    a, b = cpu.get_submodule(name), gpu.get_submodule(name)
    qa, qb = a.qweight.cpu(), b.qweight.cpu()
    differ = float((qa != qb).float().mean())
    assert qa.shape == qb.shape and differ < 0.01, differ
    # the GPU layer computes its own dequantized weight's function (float64 reference; the CUDA
    # int4 kernel takes bf16 activations, hence 2e-2)
    x = torch.randn(5, b.in_features, generator=torch.Generator().manual_seed(0))
    xs = x.double() * (b.input_scale.double().cpu() if getattr(b, "input_scale", None) is not None else 1.0)
    want = xs @ b.weight.double().cpu().T + (0 if b.bias is None else b.bias.double().cpu())
    got = b(x.cuda()).double().cpu()
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 2e-2, (rel, differ)


# ----------------------------------------------------------------------------- TensorRT (desk review; TensorRT is not installable here)

@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    pytest.importorskip("onnx")
    from mamba_deploy.export.onnx import export_onnx

    return export_onnx(DEMO2, tmp_path_factory.mktemp("trt") / "onnx", validate=False)


def test_an_fp32_engine_turns_tensorrts_default_tf32_off(demo_onnx, tmp_path, monkeypatch):
    """TensorRT's BuilderFlag.TF32 is on by default (its docs): matmul inputs rounded to 10-bit
    mantissas, ~4e-4 logits error against the fp32 engine's 1e-4 check."""
    from mamba_deploy.export.tensorrt import build_engine

    fake = RecordingTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    build_engine(demo_onnx, tmp_path / "m.engine", max_batch=2, max_seq=64)
    assert fake.rec["flags"] == [("clear", "TF32")] and fake.rec["built"] == 1


@pytest.mark.parametrize("kw,match", [
    ({"opt_seq": -5}, "opt_seq=-5"), ({"opt_seq": 2.5}, "opt_seq=2.5"), ({"workspace_mb": -1}, "workspace_mb=-1"),
    ({"max_batch": 4096, "max_seq": 8192}, "2\\*\\*31-element"),
])
def test_engine_options_are_checked_before_tensorrt_sees_them(demo_onnx, tmp_path, monkeypatch, kw, match):
    from mamba_deploy.export.tensorrt import build_engine

    fake = RecordingTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    with pytest.raises(ExportError, match=match):
        build_engine(demo_onnx, tmp_path / "m.engine", **kw)
    assert fake.rec["built"] == 0 and not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("fake_kw,match", [({"keep_is_shape": False}, "not as a shape tensor"),
                                           ({"profile_index": -1}, "refused the optimization profile")])
def test_a_profile_or_shape_input_tensorrt_cannot_take_is_an_export_error(demo_onnx, tmp_path, monkeypatch,
                                                                          fake_kw, match):
    from mamba_deploy.export.tensorrt import build_engine

    fake = RecordingTensorRT(**fake_kw)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    with pytest.raises(ExportError, match=match):
        build_engine(demo_onnx, tmp_path / "m.engine", max_batch=2, max_seq=64)
    assert not (tmp_path / "m.engine").exists()


# ----------------------------------------------------------------------------- memory (a review of scale behaviour)

@pytest.mark.parametrize("model", ["demo-mamba1", "demo-mamba2"])
def test_a_limited_encode_reads_a_prefix_and_equals_the_whole_texts_first_tokens(model, monkeypatch):
    """eval --max-tokens / verify --max-text-tokens tokenized a whole file (a 32 MB text: 5.9 GB
    peak) to keep 2000 tokens. Reference: the tokenizer's own encoding of the whole text, cut."""
    from mamba_deploy import tokenizer as tokmod

    tok = tokmod.load_tokenizer(DEMO2.parent / model)
    words = ["def", "main", "(", "):", "\n", "  ", "return", "x", "→", "ü", "\t", "🙂", "  \n\n", "# note"]
    g = torch.Generator().manual_seed(1)
    text = "".join(words[int(i)] + (" " if int(i) % 3 else "") for i in torch.randint(0, len(words), (200_000,),
                                                                                          generator=g))
    seen = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda t, *a, **k: seen.append(len(t)) or encode(t, *a, **k))
    for k in (1, 7, 1000, 5000):
        seen.clear()
        got = tokmod.encode_prefix(tok, text, k)
        assert got == encode(text)[:k]
        assert max(seen) < len(text)  # never the whole text
    assert tokmod.encode_prefix(tok, text[:300], 10**6) == encode(text[:300])  # shorter than the limit: all of it


# ----------------------------------------------------------------------------- concurrency (a review of threads and interrupts)

def test_onnx_close_from_another_thread_mid_call_is_runner_closed(demo_onnx, monkeypatch):
    """close() dropped the session between a call's open check and its use: AttributeError
    ('NoneType' has no attribute 'io_binding'). Forced here by closing inside the call."""
    from mamba_deploy.errors import RunnerClosedError
    from mamba_deploy.runners import onnx_runner
    from mamba_deploy.runners import open_runner as open_

    r = open_(demo_onnx, "onnx", threads=1)
    st = r.new_state(1)
    real = onnx_runner.check_state

    def closing(*a, **k):  # runs after the open check, before the session is used
        r.close()
        return real(*a, **k)
    monkeypatch.setattr(onnx_runner, "check_state", closing)
    with pytest.raises(RunnerClosedError):
        r.step(torch.tensor([5]), st)


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_gguf(DEMO1, tmp_path_factory.mktemp("gguf") / "m.gguf")


def test_llamacpp_close_waits_for_a_running_tokenize(demo_gguf):
    """close() freed the model under another thread's llama_tokenize: encode returned [] (a use
    after free). Now it is the whole token list, or RunnerClosedError when close came first."""
    import threading
    import time

    from mamba_deploy.errors import RunnerClosedError
    from mamba_deploy.runners import open_runner as open_

    r = open_(demo_gguf, "llama.cpp", threads=1)
    tok = r.tokenizer
    text = (Path(__file__).resolve().parents[1] / "src" / "mamba_deploy" / "generation.py").read_text() * 120
    want = len(tok.encode(text))
    got = []

    def encode():
        try:
            got.append(len(tok.encode(text)))
        except RunnerClosedError as e:
            got.append(e)
    t = threading.Thread(target=encode)
    t.start()
    time.sleep(0.2)
    r.close()
    t.join(60)
    assert got and (got[0] == want or isinstance(got[0], RunnerClosedError)), (got, want)
    with pytest.raises(RunnerClosedError):
        tok.encode("x")


def test_llamacpp_interrupted_new_state_keeps_its_sequences(demo_gguf):
    """A KeyboardInterrupt inside new_state (in its llama_memory_seq_rm loop) lost the popped
    sequence slots for good: after enough of them, no state could be made."""
    from mamba_deploy.runners import open_runner as open_

    r = open_(demo_gguf, "llama.cpp", threads=1, n_seq_max=4)
    real = r._lib

    class Interrupting:
        def __getattr__(self, name):
            if name == "llama_memory_seq_rm":
                def rm(*a):
                    raise KeyboardInterrupt
                return rm
            return getattr(real, name)
    free_before = list(r._free)
    r._lib = Interrupting()
    with pytest.raises(KeyboardInterrupt):
        r.new_state(3)
    r._lib = real
    assert sorted(r._free) == sorted(free_before)
    st = r.new_state(4)  # all four again, without growing the context
    assert r._n_seq == 4 and len(st.seq_ids) == 4
    r.close()
