"""User flows that went wrong in a review from the command line: each test drives the CLI (or the
call behind it) with a mistake a user can make and checks that the answer names the real problem,
on the shipped demo models (CPU, no network)."""
from __future__ import annotations

import http.client
import json
import shutil
import threading
from pathlib import Path

import pytest

from mamba_deploy.chat import ChatTemplateError, chat_ids
from mamba_deploy.cli import main
from mamba_deploy.errors import CheckpointError, ConfigError
from mamba_deploy.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO1 = REPO / "models" / "demo-mamba1"
DEMO2 = REPO / "models" / "demo-mamba2"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _copy_with_config(tmp_path, src, **changes) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


# ----------------------------------------------------------------------------- chat

def test_bad_messages_are_named_as_such_not_as_a_template_failure():
    """A conversation the caller got wrong is the caller's error ("message 0 must be ..."), not
    "the chat template failed" (the template is fine)."""
    tok = load_tokenizer(DEMO2)
    for messages, match in [([{"role": "robot", "content": "x"}], "message 0 must be an object with a role"),
                            ([], "`messages` must be a non-empty list"),
                            ([{"role": "user", "content": None}], "message 0 content must be a string")]:
        with pytest.raises(ConfigError, match=match) as e:
            chat_ids(tok, messages, CHATML)
        assert not isinstance(e.value, ChatTemplateError)
        assert "template" not in str(e.value)


def test_a_template_that_renders_nothing_is_a_template_error():
    """An empty template file rendered the conversation as "", which then failed as "a prompt is
    empty; give at least one token": it pointed at the prompt, not at the template."""
    tok = load_tokenizer(DEMO2)
    with pytest.raises(ChatTemplateError, match="rendered nothing"):
        chat_ids(tok, [{"role": "user", "content": "hello"}], "\n")
    with pytest.raises(ChatTemplateError, match="rendered nothing"):
        chat_ids(tok, [{"role": "user", "content": "hello"}], "{% if false %}x{% endif %}")


def _post(srv, body):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_serve_chat_template_flag(tmp_path, capsys):
    """The server's "no chat template" 400 told users to pass --chat-template FILE, a flag `serve`
    did not have. It has it now: the template serves /v1/chat/completions as generate --chat uses
    it (same ids), and an unreadable file is refused before the model loads."""
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    assert main(["serve", str(DEMO2), "--chat-template", str(tmp_path / "none.jinja"), "--port", "0"]) == 2
    assert "--chat-template" in capsys.readouterr().err
    runner = open_runner(DEMO2, "torch")
    messages = [{"role": "user", "content": "def main():"}]
    want_ids = chat_ids(runner.tokenizer, messages, CHATML)
    assert "<|im_start|>" in runner.tokenizer.decode(want_ids)  # the template was used
    want = generate(runner, [want_ids], max_new_tokens=6, stop_token_ids=[runner.tokenizer.eos_token_id])
    srv = make_server(runner, "127.0.0.1", 0, quiet=True, chat_template=CHATML)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, res = _post(srv, {"messages": messages, "max_tokens": 6, "temperature": 0})
        assert status == 200, res
        assert res["usage"]["prompt_tokens"] == len(want_ids)
        assert res["choices"][0]["token_ids"] == want.tokens[0]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


# ----------------------------------------------------------------------------- generate

@pytest.mark.parametrize("extra,match", [(["--stop", "99999"], "outside the vocabulary"),
                                        (["--prompt", ""], "a prompt is empty")])
def test_generate_prints_nothing_before_a_refusal(capsys, extra, match):
    """The streamed prompt was echoed before the request was checked, so the terminal showed
    "def main(error: ..." and stdout carried a prompt without a completion."""
    assert main(["generate", str(DEMO1), "--prompt", "def main(", "--max-new-tokens", "2", *extra]
                if "--prompt" not in extra else ["generate", str(DEMO1), *extra, "--max-new-tokens", "2"]) == 2
    out = capsys.readouterr()
    assert match in out.err
    assert out.out == ""


def test_generate_without_tokenizer_prints_nothing_first(tmp_path, capsys):
    folder = tmp_path / "notok"
    shutil.copytree(DEMO1, folder)
    (folder / "tokenizer.json").unlink()
    assert main(["generate", str(folder), "--prompt", "def main(", "--max-new-tokens", "2"]) == 2
    out = capsys.readouterr()
    assert "no tokenizer" in out.err and out.out == ""


# ----------------------------------------------------------------------------- eval

def test_eval_refuses_a_text_file_that_is_not_utf8(tmp_path, capsys):
    """`eval --text` ("a UTF-8 text file") replaced undecodable bytes with U+FFFD and scored
    that other text without a word; verify --text refuses such a file. Now eval does too."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 = 1\n".encode("latin-1") * 20)
    assert main(["eval", str(DEMO1), "--text", str(bad), "--json"]) == 2
    err = capsys.readouterr().err
    assert "UTF-8" in err and str(bad) in err
    good = tmp_path / "utf8.txt"
    good.write_text("caf\u00e9 = 1\n" * 20, encoding="utf-8")
    assert main(["eval", str(DEMO1), "--text", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 1


# ----------------------------------------------------------------------------- checkpoint

def test_config_vocab_larger_than_the_weights_is_refused(tmp_path, capsys):
    """config.json's vocab_size above the embedding's rows was zero-padded: ids the weights never
    had got logits of exactly 0 and could be sampled. mamba_ssm's padding to a multiple (rows
    between vocab_size and padded_vocab_size) stays allowed."""
    from mamba_deploy import load_model

    folder = _copy_with_config(tmp_path, DEMO1, vocab_size=5000)
    with pytest.raises(CheckpointError, match="4096 vocab rows.*vocab_size 5000"):
        load_model(folder)
    assert main(["inspect", str(folder)]) == 2  # headers only: the same check
    assert "vocab_size 5000" in capsys.readouterr().err


def test_chat_request_errors_name_the_fields_chat_takes(tmp_path):
    """/v1/chat/completions answered `n`=2 with "send the prompt several times in `prompt`" (a field
    it refuses) and max_completion_tokens=0 as "`max_tokens` must be in ..." (a field not sent)."""
    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    srv = make_server(open_runner(DEMO2, "torch"), "127.0.0.1", 0, quiet=True, chat_template=CHATML,
                      max_tokens_limit=64)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    messages = [{"role": "user", "content": "hi"}]
    try:
        status, res = _post(srv, {"messages": messages, "n": 2})
        assert status == 400 and res["error"]["param"] == "n"
        assert "only n=1" in res["error"]["message"] and "prompt" not in res["error"]["message"]
        for value in (0, 65, "3"):
            status, res = _post(srv, {"messages": messages, "max_completion_tokens": value})
            assert status == 400 and res["error"]["param"] == "max_completion_tokens", res
            assert "`max_completion_tokens`" in res["error"]["message"]
        status, res = _post(srv, {"messages": messages, "max_completion_tokens": 3, "temperature": 0})
        assert status == 200 and res["usage"]["completion_tokens"] <= 3
        assert _post(srv, {"messages": messages, "max_tokens": 0})[1]["error"]["param"] == "max_tokens"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def demo1_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    return export_gguf(DEMO1, tmp_path_factory.mktemp("gguf") / "demo1.gguf")


@pytest.mark.parametrize("verb,flags", [("generate", ["--dtype", "bf16"]), ("generate", ["--state-dtype", "fp16"]),
                                        ("eval", ["--dtype", "fp16"]), ("serve", ["--device", "cuda"])])
def test_torch_only_flags_are_refused_for_other_backends(demo1_gguf, capsys, verb, flags):
    """generate / eval / serve passed --dtype, --state-dtype and --device to the torch backend only
    and dropped them for a .gguf or ONNX folder: `generate model.gguf --dtype bf16` ran llama.cpp's
    F32 without a word (verify refuses --artifact-dtype for such artifacts)."""
    import socket

    pytest.importorskip("llama_cpp")
    with socket.socket() as busy:  # a server that got past the check fails to bind instead of serving forever
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rest = {"generate": ["--prompt", "x", "--max-new-tokens", "1"],
                "eval": ["--corpus", "stdlib-val", "--max-tokens", "8"],
                "serve": ["--port", str(busy.getsockname()[1])]}[verb]
        assert main([verb, str(demo1_gguf), *flags, *rest]) == 2
    err = capsys.readouterr().err
    assert flags[0] in err and "llama.cpp" in err


def test_torch_only_flags_still_apply_to_torch(demo1_gguf, capsys):
    """The same flags on the torch backend (a folder, or the .gguf with --backend torch) still run,
    and their defaults spelled out ("--dtype float32") are not refused."""
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    assert main(["generate", str(demo1_gguf), "--backend", "torch", "--dtype", "bf16", "--prompt", "def",
                 "--max-new-tokens", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["tokens"]
    import torch

    want = generate(open_runner(demo1_gguf, "torch", dtype=torch.bfloat16), ["def"], max_new_tokens=3).tokens[0]
    assert got == want
    pytest.importorskip("llama_cpp")
    assert main(["generate", str(demo1_gguf), "--dtype", "float32", "--device", "cpu", "--prompt", "def",
                 "--max-new-tokens", "1", "--json"]) == 0


# ----------------------------------------------------------------------------- backend names and artifacts

def test_backend_aliases_reach_the_same_backend(demo1_gguf, capsys):
    """`--backend llamacpp` (the brief's spelling; the package is llama_cpp) and other common
    spellings were "unknown backend": they now fold to the names the backends are registered under."""
    from mamba_deploy.bench import parse_targets
    from mamba_deploy.runners import open_runner

    assert main(["generate", str(DEMO1), "--backend", "torch", "--prompt", "def", "--max-new-tokens", "3",
                 "--json"]) == 0
    want = json.loads(capsys.readouterr().out)[0]["tokens"]
    assert main(["generate", str(DEMO1), "--backend", "PyTorch", "--prompt", "def", "--max-new-tokens", "3",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["tokens"] == want
    assert parse_targets([str(demo1_gguf)], ["LlamaCpp"]) == [(str(demo1_gguf), "llama.cpp")]
    assert parse_targets(["x"], ["onnxruntime", "ORT"]) == [("x", "onnx"), ("x", "onnx")]
    with pytest.raises(SystemExit) as e:  # refused by argparse, before any model loads
        main(["generate", str(DEMO1), "--backend", "cuda", "--prompt", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown backend 'cuda'" in err and "llama.cpp" in err
    pytest.importorskip("llama_cpp")
    with open_runner(demo1_gguf, "llamacpp") as r:
        assert r.name == "llama.cpp"


def test_reexported_gguf_keeps_its_general_name(demo1_gguf, tmp_path):
    """Re-exporting a GGUF (e.g. to another outtype) named the new file after the folder the source
    GGUF lay in (general.name "gguf0"), not the model's own name stored in the source."""
    gguf = pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    def name(path):
        return gguf.GGUFReader(path).get_field("general.name").contents()

    assert name(demo1_gguf) == DEMO1.name  # written from the checkpoint folder's name
    out = export_gguf(demo1_gguf, tmp_path / "again.gguf", outtype="q8_0")
    assert name(out) == DEMO1.name


def test_onnx_backend_on_a_file_suggests_a_new_folder(demo1_gguf):
    """`generate m.gguf --backend onnx` told the user to `export onnx MODEL m.gguf`: an export into
    the path of the existing file. It now names a folder beside it."""
    from mamba_deploy.errors import ModelNotFoundError
    from mamba_deploy.runners import open_runner

    pytest.importorskip("onnxruntime")
    with pytest.raises(ModelNotFoundError, match="is a file") as e:
        open_runner(demo1_gguf, "onnx")
    assert f"export onnx {demo1_gguf} {demo1_gguf.with_name('demo1-onnx')}" in str(e.value)


def test_quantize_names_the_flag_a_method_does_not_take(tmp_path, capsys, monkeypatch):
    """`quantize --method int8 --act-order` said "unknown option(s) ['act_order']" (an internal
    name) after loading the model; it now names the flag and the methods that take it, first."""
    from mamba_deploy import checkpoint

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(checkpoint, "load_model", no_load)
    for method, flag, takers in [("int8", "--act-order", "gptq"), ("int4", "--alpha", "smoothquant"),
                                 ("awq", "--fp8-scaling", "fp8")]:
        assert main(["quantize", str(DEMO1), str(tmp_path / method), "--method", method, flag,
                     *(["0.5"] if flag == "--alpha" else ["tensor"] if flag == "--fp8-scaling" else [])]) == 2
        err = capsys.readouterr().err
        assert f"{flag} does not apply to --method {method}; it applies to {takers}" in err
        assert not (tmp_path / method).exists()


def test_int_lists_refuse_empty_entries(capsys):
    """`verify --lengths 1,,2` ran lengths 1 and 2 as if the typo were not there."""
    from mamba_deploy.argtypes import int_list

    for text in ("1,,2", "1,2,", ",7"):
        with pytest.raises(ConfigError, match="has an empty entry"):
            int_list(text, "--lengths", "1,7,257")
    assert int_list("1, 7 ,257", "--lengths", "1,7,257") == [1, 7, 257]
    with pytest.raises(SystemExit) as e:  # refused by argparse, before any model loads
        main(["verify", str(DEMO1), str(DEMO1), "--lengths", "1,,2"])
    assert e.value.code == 2
    assert "argument --lengths: '1,,2' has an empty entry" in capsys.readouterr().err


@pytest.mark.parametrize("spec,match", [("top1=2", "top1=2 can never pass"), ("top1=-0.1", "top1=-0.1 can never"),
                                        ("logits_rel=-1e-3", "logits_rel=-0.001 can never pass")])
def test_verify_refuses_limits_that_can_never_pass(spec, match, capsys):
    """`verify --tolerance top1=2` ran every case and then failed on a limit no artifact can meet
    (a typo for 0.2?); it is refused before any model runs."""
    from mamba_deploy.verify import make_tolerance

    with pytest.raises(ConfigError, match=match):
        make_tolerance(spec)
    assert main(["verify", str(DEMO1), str(DEMO1), "--tolerance", spec]) == 2
    assert match in capsys.readouterr().err
    assert make_tolerance("logits_rel=inf,top1=0").logits_rel == float("inf")  # "no limit" stays possible


def test_onnx_export_of_a_quantized_gguf_is_verified_at_its_type(tmp_path, capsys):
    """`export onnx m.q8_0.gguf DIR` wrote a manifest saying only "dtype": "fp32", so `verify
    REFERENCE DIR` held the dequantized Q8_0 weights to fp32's 1e-4 and failed. The manifest now
    carries the GGUF's type (as the gguf package reads it), and verify picks that type's row."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("onnxruntime")
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.export.onnx import export_onnx

    q8 = export_gguf(DEMO2, tmp_path / "m.q8_0.gguf", outtype="q8_0")
    f = gguf.GGUFReader(q8).get_field("general.file_type")
    want = gguf.LlamaFileType(int(f.contents())).name.lower().removeprefix("mostly_")
    out = export_onnx(q8, tmp_path / "onnx")
    assert json.loads((out / "manifest.json").read_text())["source_weights"] == want == "q8_0"
    args = ["verify", str(DEMO2), str(out), "--lengths", "1,7", "--batch", "1", "--decode-steps", "2"]
    assert main(args) == 0, capsys.readouterr().out
    assert "(int8 tolerances)" in capsys.readouterr().out
    f32 = export_onnx(export_gguf(DEMO2, tmp_path / "m.f32.gguf", outtype="f32"), tmp_path / "onnx32")
    assert "source_weights" not in json.loads((f32 / "manifest.json").read_text())  # exact: fp32's limits stay
    # `convert` of the same GGUF: an HF checkpoint of the dequantized weights, verified the same way,
    # that transformers still loads (the extra config key is kept as an attribute)
    assert main(["convert", str(q8), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["source_weights"] == "q8_0"
    capsys.readouterr()
    assert main(args[:2] + [str(tmp_path / "hf")] + args[3:]) == 0
    assert "(int8 tolerances)" in capsys.readouterr().out
    transformers = pytest.importorskip("transformers")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.source_weights == "q8_0"


def test_a_converted_gguf_keeps_its_weight_type_through_later_converts_and_exports(tmp_path, capsys):
    """The checkpoint `convert` made of a Q8_0 GGUF records source_weights, but converting it
    again (either layout) or exporting it to ONNX dropped the record: verify then held the
    dequantized Q8_0 weights to fp32's 1e-4 and failed."""
    pytest.importorskip("gguf")
    pytest.importorskip("onnxruntime")
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.export.onnx import export_onnx

    q8 = export_gguf(DEMO2, tmp_path / "m.q8_0.gguf", outtype="q8_0")
    assert main(["convert", str(q8), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ssm"), "--format", "mamba_ssm"]) == 0
    assert main(["convert", str(tmp_path / "ssm"), str(tmp_path / "hf2")]) == 0
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["source_weights"] == "q8_0"
    # mamba_ssm refuses config keys its MambaConfig lacks: the record is in a file of its own
    assert "source_weights" not in json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert json.loads((tmp_path / "ssm" / "mamba_deploy.json").read_text())["source_weights"] == "q8_0"
    capsys.readouterr()
    assert main(["verify", str(DEMO2), str(tmp_path / "ssm"), "--lengths", "1,7", "--batch", "1",
                 "--decode-steps", "2"]) == 0
    assert "(int8 tolerances)" in capsys.readouterr().out
    out = export_onnx(tmp_path / "hf2", tmp_path / "onnx")
    assert json.loads((out / "manifest.json").read_text())["source_weights"] == "q8_0"
    capsys.readouterr()
    assert main(["verify", str(DEMO2), str(out), "--lengths", "1,7", "--batch", "1", "--decode-steps", "2"]) == 0
    assert "(int8 tolerances)" in capsys.readouterr().out


def test_a_gguf_made_from_a_quantized_gguf_records_its_source_type(tmp_path, capsys):
    """An f32 GGUF exported from a Q8_0 GGUF (directly, or from the checkpoint `convert` made of
    it) holds Q8_0's rounding but said only F32: verify then held it to fp32's 1e-4 and failed.
    It now records mamba_deploy.source_weights, and verify takes the looser of that and its own
    type; a K-quant made from it keeps its own, looser, type."""
    gguf = pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    q8 = export_gguf(DEMO2, tmp_path / "m.q8_0.gguf", outtype="q8_0")
    assert main(["convert", str(q8), str(tmp_path / "hf")]) == 0
    f32s = [export_gguf(q8, tmp_path / "direct.f32.gguf", outtype="f32"),
            export_gguf(tmp_path / "hf", tmp_path / "via_hf.f32.gguf", outtype="f32")]
    for f32 in f32s:
        reader = gguf.GGUFReader(str(f32))
        assert reader.get_field("mamba_deploy.source_weights").contents() == "q8_0"
        assert gguf.LlamaFileType(int(reader.get_field("general.file_type").contents())).name == "ALL_F32"
        capsys.readouterr()
        args = ["verify", str(DEMO2), str(f32), "--backend", "torch", "--lengths", "1,7", "--batch", "1",
                "--decode-steps", "2"]
        assert main(args) == 0, capsys.readouterr().out
        assert "(int8 tolerances)" in capsys.readouterr().out
        assert main(args + ["--dtype", "fp32"]) != 0  # the rounding is real: fp32's limits fail it
    plain = export_gguf(DEMO2, tmp_path / "plain.f32.gguf", outtype="f32")
    assert gguf.GGUFReader(str(plain)).get_field("mamba_deploy.source_weights") is None
