"""Coverage round (review 45, part B): user-facing behaviour that the whole suite's coverage run
left unexercised in verify, bench, serve, serve_http, generation, eval, chat, demo and the ONNX
runner. Each test names the lines it pins and checks against an independent reference
(transformers in float64, the HTTP RFCs' grammar, plain str arithmetic), never the code under
test against itself. CPU only, no network."""

from __future__ import annotations

import http.client
import io
import json
import math
import socket
import time

import pytest
import torch

from conftest import serving, tiny_mamba_with_bpe
from mamba_deploy.errors import ConfigError, ShapeError
from mamba_deploy.serve_http import read_chunked
from mamba_deploy.serve_request import RequestError


@pytest.fixture(scope="module")
def bpe_model(hf_checkpoint, tmp_path_factory):
    """The tiny Mamba1 with the tiny BPE beside it (a copy for this module)."""
    return tiny_mamba_with_bpe(hf_checkpoint, tmp_path_factory, "cov_b")


@pytest.fixture(scope="module")
def bare_runner(hf_checkpoint):
    """A torch runner over the tiny Mamba1 with NO tokenizer in its folder."""
    from mamba_deploy.runners import open_runner

    r = open_runner(hf_checkpoint("mamba")[0], "torch")
    yield r
    r.close()


def _get(server, path: str):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _raw(server, data: bytes, half_close: bool = True) -> bytes:
    """Send raw bytes on a fresh connection (closing its sending side) -> all bytes read back."""
    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


# ----------------------------------------------------------------------------- serve.py

def test_get_one_model_by_percent_encoded_name(bare_runner):
    """serve.py 407-409: GET /v1/models/{model} (OpenAI's models.retrieve). OpenAI's clients
    percent-encode the name (RFC 3986 2.1), so "org/tiny v1" arrives as org%2Ftiny%20v1 and must
    answer 200 with the model object whose id is the served name; another name is OpenAI's 404
    model_not_found."""
    with serving(bare_runner, model_name="org/tiny v1") as server:
        status, body = _get(server, "/v1/models/org%2Ftiny%20v1")
        assert status == 200, body
        obj = json.loads(body)
        assert obj["id"] == "org/tiny v1" and obj["object"] == "model"
        status, body = _get(server, "/v1/models/other-model")
        assert status == 404
        assert json.loads(body)["error"]["code"] == "model_not_found"


def test_chat_body_must_be_a_json_object(bare_runner):
    """serve.py 480: a chat request whose JSON body is an array (valid JSON, wrong type) is a 400
    naming the type it got, not a 500 from body.get()."""
    from conftest import post_json

    with serving(bare_runner) as server:
        status, _, body = post_json(server, [{"role": "user", "content": "hi"}], "/v1/chat/completions")
    assert status == 400
    assert "list" in json.loads(body)["error"]["message"]


def test_chat_without_a_tokenizer_is_a_400_on_messages(bare_runner):
    """serve.py 496-497: a model folder without a tokenizer can still serve token-id completions,
    but a chat request (which must render and tokenize the conversation) is the client's 400 with
    param "messages", not a 500 (and the server keeps serving)."""
    from conftest import post_json

    with serving(bare_runner) as server:
        status, _, body = post_json(server, {"messages": [{"role": "user", "content": "hi"}]},
                                    "/v1/chat/completions")
        assert status == 400, body
        err = json.loads(body)["error"]
        assert err["param"] == "messages" and "tokenizer" in err["message"]
        status, _, body = post_json(server, {"prompt": [1, 2, 3], "max_tokens": 2})
        assert status == 200 and len(json.loads(body)["choices"]) == 1


def test_body_shorter_than_content_length_is_a_400(bare_runner):
    """serve.py 541-542: RFC 9112 6.3 -- a body that ends (the client closes its sending side)
    before Content-Length bytes is incomplete; the server answers 400 naming both counts and
    closes the connection, rather than parsing the 7 bytes it got."""
    with serving(bare_runner) as server:
        got = _raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"a\": 1}")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), got[:200]
    msg = json.loads(body)["error"]["message"]
    assert "8 of its 50 bytes" in msg


# ----------------------------------------------------------------------------- serve_http.py

def test_chunked_body_that_ends_early_is_refused():
    """serve_http.py 128-129: a chunked body cut off before its chunk-size line's CRLF (RFC 9112
    7.1: chunk-size CRLF) is a framing error that closes the connection, as is a chunk-size line
    longer than the server reads."""
    from mamba_deploy.serve_http import MAX_CHUNK_LINE

    with pytest.raises(RequestError) as e:
        read_chunked(io.BytesIO(b"5\r\nabcde\r\n3"), 100)  # the second size line never ends
    assert e.value.status == 400 and e.value.headers.get("Connection") == "close"
    assert "ended early" in str(e.value)
    with pytest.raises(RequestError) as e:
        read_chunked(io.BytesIO(b"0" * (MAX_CHUNK_LINE + 5) + b"\r\n"), 100)
    assert "over" in str(e.value) and "ended early" not in str(e.value)


def test_chunked_body_with_too_many_trailers_is_refused():
    """serve_http.py 161: trailer fields are ignored but bounded: MAX_TRAILERS of them are read,
    one more is a 400 closing the connection (not an unbounded loop)."""
    from mamba_deploy.serve_http import MAX_TRAILERS

    ok = b"0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_TRAILERS)) + b"\r\n"
    assert read_chunked(io.BytesIO(ok), 100) == b""
    over = b"0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_TRAILERS + 1)) + b"\r\n"
    with pytest.raises(RequestError) as e:
        read_chunked(io.BytesIO(over), 100)
    assert e.value.headers.get("Connection") == "close"


# ----------------------------------------------------------------------------- generation.py

def test_stop_token_id_given_as_one_int(bare_runner):
    """generation.py 591: stop_token_ids=<one int> is one stop id (as numpy scalars are). The
    reference: transformers' greedy decode of the same prompt in float64; generation stops right
    before the first occurrence of the chosen id, which is excluded from the tokens."""
    from mamba_deploy.generation import generate

    hf = __import__("conftest").build_hf_model("mamba").double()
    prompt = [3, 17, 42, 5]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    stop = ref[3]
    first = ref.index(stop)
    out = generate(bare_runner, [prompt], max_new_tokens=8, stop_token_ids=stop)
    assert out.tokens[0] == ref[:first]
    assert out.stop_reasons[0] == "stop"


def test_prompts_mixing_text_and_ids_are_refused(bare_runner):
    """generation.py 626: a batch holding both a string and a token-id list is a ShapeError
    saying so (not a tokenizer error, nor ids encoded as text)."""
    from mamba_deploy.generation import generate

    with pytest.raises(ShapeError, match="mix"):
        generate(bare_runner, [[1, 2, 3], "hello"], max_new_tokens=1)


class _Tok:
    """A tokenizer whose ids decode to fixed pieces (id 0: nothing, as a chat template's control
    tokens); decode joins the pieces, optionally stripping a leading space like SentencePiece."""

    def __init__(self, pieces, strip=False):
        self.pieces, self.strip = pieces, strip

    def decode(self, ids):
        s = "".join(self.pieces[i] for i in ids)
        return s.lstrip(" ") if self.strip else s


def test_context_ids_reach_back_past_silent_tokens():
    """generation.py 209: when the last CONTEXT_TOKENS prompt tokens decode to nothing, the
    context doubles back (5, 10, ...) until it holds text, capped at the prompt's length."""
    from mamba_deploy.generation import CONTEXT_TOKENS, context_ids

    tok = _Tok({0: "", 1: "a"})
    prompt = [1] * 3 + [0] * (CONTEXT_TOKENS + 2)  # 7 silent tokens after the text
    assert context_ids(tok, prompt) == prompt[-2 * CONTEXT_TOKENS:]
    assert context_ids(tok, [0] * 7) == [0] * 7  # never text: the whole prompt, no further


def test_decode_after_falls_back_when_the_context_is_rewritten():
    """generation.py 226: when decoding the whole sequence rewrites the context's own text, the
    completion is its own tokens decoded alone, not a slice of the full text at the context's
    length. The case: a decoder that NFC-normalizes (unicodedata, the reference) and a completion
    that starts with a combining accent, so "e" + U+0301 decodes as the single "\u00e9"."""
    import unicodedata

    from mamba_deploy.generation import decode_after

    class NfcTok(_Tok):
        def decode(self, ids):
            return unicodedata.normalize("NFC", super().decode(ids))

    tok = NfcTok({0: "caf", 1: "e", 2: "\u0301", 3: "s"})
    full = tok.decode([0, 1, 2, 3])
    assert full == "caf\u00e9s" and not full.startswith(tok.decode([0, 1]))  # the context was rewritten
    assert decode_after(tok, [0, 1, 2, 3], 2) == unicodedata.normalize("NFC", "\u0301s")
    assert decode_after(tok, [0, 1, 3], 2) == "s"  # the plain case: the full text less the context's


# ----------------------------------------------------------------------------- verify.py

def test_verify_refuses_empty_or_zero_cases(bare_runner):
    """verify.py 522: lengths/batches of 0 (or negative decode_steps) are a ConfigError naming the
    values, before any case runs."""
    from mamba_deploy.verify import verify

    with pytest.raises(ConfigError, match=">= 1"):
        verify(bare_runner, bare_runner, lengths=[0], batches=[1])
    with pytest.raises(ConfigError, match=">= 0"):
        verify(bare_runner, bare_runner, lengths=[1], batches=[1], decode_steps=-1)


def test_verify_text_of_one_token_is_refused(bare_runner):
    """verify.py 562: perplexity over text_ids needs at least 2 tokens (one prediction); a
    one-token text is a ConfigError, not a NaN perplexity."""
    from mamba_deploy.verify import verify

    with pytest.raises(ConfigError, match="at least 2"):
        verify(bare_runner, bare_runner, lengths=[1], batches=[1], decode_steps=0, text_ids=[5])


def test_verify_reference_dtype_must_be_float32_or_64(hf_checkpoint):
    """verify.py 628: open_reference(reference_dtype="bfloat16") is refused (a bf16 reference
    would be looser than the artifacts it judges)."""
    from mamba_deploy.verify import open_reference

    with pytest.raises(ConfigError, match="float32 or float64"):
        open_reference(hf_checkpoint("mamba")[0], reference_dtype="bfloat16")


# ----------------------------------------------------------------------------- eval.py (via the CLI)

def test_eval_text_output_matches_transformers_float64(bpe_model, tmp_path, capsys):
    """eval.py 125-126: the human-readable line of `eval --text FILE`. Its perplexity must equal
    exp(mean NLL) of transformers' float64 forward over the tokenizer.json tokens of the file
    (tokenized by the `tokenizers` library directly)."""
    from tokenizers import Tokenizer

    from conftest import build_hf_model
    from mamba_deploy import cli

    text = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine"
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert cli.main(["eval", str(bpe_model), "--text", str(f)]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("perplexity ")
    got = float(out.split()[1])
    ids = Tokenizer.from_file(str(bpe_model / "tokenizer.json")).encode(text).ids
    hf = build_hf_model("mamba").double()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], -1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert got == pytest.approx(math.exp(nll), rel=2e-3)
    assert f"over {len(ids) - 1} tokens" in out


def test_eval_text_that_is_not_a_file(bpe_model, tmp_path, capsys):
    """eval.py 93: `eval --text` naming a folder (or a missing file) exits 2 with an error naming
    the flag, before any model work."""
    from mamba_deploy import cli

    assert cli.main(["eval", str(bpe_model), "--text", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--text" in err and "is not a file" in err
    assert cli.main(["eval", str(bpe_model), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "is not a file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- chat.py

def test_undecodable_chat_template_file_is_a_config_error(bpe_model, tmp_path):
    """chat.py 41-42: a chat_template.jinja that is not UTF-8 is a ConfigError naming the file
    (and how to fix it), not a UnicodeDecodeError traceback."""
    import shutil

    from mamba_deploy.chat import CHAT_TEMPLATE_FILE, read_chat_template

    folder = tmp_path / "m"
    shutil.copytree(bpe_model, folder)
    (folder / CHAT_TEMPLATE_FILE).write_bytes(b"{{ messages }}\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        read_chat_template(folder)


def test_runaway_chat_template_is_stopped():
    """chat.py 159: a template whose loop writes without end is stopped once it has written more
    than MAX_RENDERED_CHARS characters, with a ChatTemplateError, rather than taking all memory."""
    from mamba_deploy.chat import render_chat
    from mamba_deploy.chat_sandbox import ChatTemplateError

    from mamba_deploy.chat_sandbox import MAX_RENDERED_CHARS

    tmpl = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}"
    piece = "x" * 2**20  # 1 MiB a turn: past the bound after MAX_RENDERED_CHARS / 2**20 turns, in well under 5 s
    with pytest.raises(ChatTemplateError, match="more than"):
        render_chat(tmpl, [{"role": "user", "content": piece}])
    # just under the bound renders in full
    n = MAX_RENDERED_CHARS // 2**20
    assert len(render_chat(tmpl.replace("100000", str(n)), [{"role": "user", "content": piece}])) == n * 2**20


# ----------------------------------------------------------------------------- bench.py / demo.py

def test_bench_with_only_commas_names_no_model(capsys):
    """bench.py 167: `bench ,` (an empty comma-separated list) exits 2 saying no model was given."""
    from mamba_deploy import cli

    assert cli.main(["bench", ","]) == 2
    assert "no model or artifact given" in capsys.readouterr().err


def test_bench_out_under_a_file_is_refused(bpe_model, tmp_path, capsys):
    """bench.py 364: --out FILE/sub (its nearest existing parent is a file) exits 2 naming that
    file, before anything is measured or created."""
    from mamba_deploy import cli

    blocker = tmp_path / "f.txt"
    blocker.write_text("x")
    rc = cli.main(["bench", str(bpe_model), "--out", str(blocker / "sub"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file" in err and str(blocker) in err
    assert blocker.read_text() == "x" and blocker.is_file()


def test_demo_models_not_found(tmp_path, monkeypatch):
    """demo.py 293: find_models for names present nowhere is a ModelNotFoundError naming them."""
    from mamba_deploy.demo import find_models
    from mamba_deploy.errors import ModelNotFoundError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no-such-demo-model"):
        find_models(["no-such-demo-model"])


# ----------------------------------------------------------------------------- runners/onnx_runner.py

def _zero_feeds(manifest: dict) -> dict:
    """Zero numpy feeds for every input the manifest lists, every symbolic dim 1."""
    import numpy as np

    return {s["name"]: np.zeros([d if isinstance(d, int) else 1 for d in s["shape"]], s["dtype"])
            for s in manifest["inputs"]}


def test_onnx_run_refuses_unknown_inputs(onnx_export):
    """onnx_runner.py 230: OnnxRunner.run with a feed the graph does not take (a misspelt input
    name) is a ShapeError naming it and the graph's inputs: onnxruntime itself would refuse it
    with an opaque INVALID_ARGUMENT, and a misspelt optional input would otherwise be dropped."""
    from mamba_deploy.runners import open_runner

    folder, _, _ = onnx_export("mamba")
    r = open_runner(folder, "onnx")
    try:
        feeds = _zero_feeds(r.manifest)
        out = r.run(dict(feeds))  # the control: the same feeds without the stray one run
        assert out and all(v.shape[0] == 1 for v in out.values())
        with pytest.raises(ShapeError, match="unknown inputs") as e:
            r.run({**feeds, "input_idz": feeds[next(iter(feeds))]})
        assert "input_idz" in str(e.value)
    finally:
        r.close()


def test_onnx_missing_provider_is_backend_unavailable(onnx_export):
    """onnx_runner.py 394: asking for an execution provider this onnxruntime lacks is a
    BackendUnavailableError listing what is available, not onnxruntime's silent fall back to
    the CPU (a "GPU" benchmark that ran on the CPU)."""
    import onnxruntime as ort

    from mamba_deploy.errors import BackendUnavailableError
    from mamba_deploy.runners.onnx_runner import open_onnx

    absent = next(p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")
                  if p not in ort.get_available_providers())
    with pytest.raises(BackendUnavailableError, match=absent):
        open_onnx(onnx_export("mamba")[0], providers=[absent])


def test_onnx_manifest_that_disagrees_with_the_graph(onnx_export):
    """onnx_runner.py 247-249 and 253-254: a manifest.json whose inputs are not the graph's (a
    renamed input), or whose static dims differ, is an ExportError naming the mismatch from
    check_session (which open_onnx runs), rather than a failed run later."""
    import onnxruntime as ort

    from mamba_deploy.errors import ExportError
    from mamba_deploy.runners.onnx_runner import check_session

    folder = onnx_export("mamba")[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    check_session(manifest, sess, folder)  # the export as written agrees with itself
    renamed = json.loads(json.dumps(manifest))
    renamed["inputs"][0]["name"] += "_renamed"
    with pytest.raises(ExportError, match="inputs differ"):
        check_session(renamed, sess, folder)
    static = next((i, k) for i, s in enumerate(manifest["outputs"]) for k, d in enumerate(s["shape"])
                  if isinstance(d, int))
    resized = json.loads(json.dumps(manifest))
    resized["outputs"][static[0]]["shape"][static[1]] += 1
    with pytest.raises(ExportError, match="has shape"):
        check_session(resized, sess, folder)


# ----------------------------------------------------------------------------- batching.py

def test_failed_prefill_fails_only_its_requests(hf_checkpoint, scheduler_for):
    """batching.py 384-387: when a new prefill group cannot start (the runner cannot make a
    state for it: out of memory, a llama.cpp context without room), its requests get that error
    and the scheduler goes on: the next request still runs, and its tokens equal transformers'
    greedy decode."""
    from conftest import build_hf_model
    from mamba_deploy.runners import open_runner

    runner = open_runner(hf_checkpoint("mamba")[0], "torch")
    make = runner.new_state

    def new_state(batch):
        if batch == 3:
            raise MemoryError("no room for 3 rows")
        return make(batch)

    runner.new_state = new_state
    sched = scheduler_for(runner)
    deadline = time.monotonic() + 30

    def in_time():  # follow()'s check: a scheduler that lost the error would otherwise hang the test
        assert time.monotonic() < deadline, "the request neither finished nor failed within 30 s"

    bad = sched.submit([[1, 2], [3, 4, 5], [6]], max_new_tokens=4, stop_token_ids=[])
    with pytest.raises(MemoryError, match="3 rows"):
        bad.follow(check=in_time)
    prompt = [9, 8, 7, 6]
    got = sched.submit([prompt], max_new_tokens=6, stop_token_ids=[]).follow(check=in_time).tokens[0]
    hf = build_hf_model("mamba").double()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert got == ref


# ----------------------------------------------------------------------------- serve_http.py: Host

def test_server_on_all_interfaces_takes_any_host():
    """serve_http.py 172 and 179-183: a server bound to a non-loopback address (0.0.0.0, a LAN
    address) answers whatever names the network gives it (ANY_HOST); one bound to a loopback
    address only to loopback names, where "localhost" and any 127/8 or ::1 address are loopback
    (ipaddress, the reference) and a DNS name is not."""
    import ipaddress

    from mamba_deploy.serve_http import ANY_HOST, default_allowed_hosts, is_loopback

    assert default_allowed_hosts("0.0.0.0", "0.0.0.0") == (ANY_HOST,)
    assert default_allowed_hosts("10.1.2.3", "10.1.2.3") == (ANY_HOST,)
    assert ANY_HOST not in default_allowed_hosts("127.0.0.1", "localhost")
    for h in ("localhost", "127.0.0.2", "::1", "[::1]", "example.com", "10.0.0.1"):
        want = h == "localhost" or ipaddress.ip_address(h.strip("[]")).is_loopback if h != "example.com" else False
        assert is_loopback(h) is want, h


def test_malformed_host_header_is_refused_not_a_crash():
    """serve_http's Host check: a Host that is no host[:port] (an unbalanced IPv6 bracket, a
    port that is not a number or past 65535, text after the bracket) is a 400 closing the
    connection (RFC 9112 3.2: "a Host header field with an invalid field value"), whatever names
    the server takes; before, urlsplit read "127.0.0.1:80x" as 127.0.0.1 and let it through."""
    from mamba_deploy.serve_http import ANY_HOST, LOOPBACK_NAMES, check_host_and_origin

    def check(raw: bytes, allowed):
        check_host_and_origin(http.client.parse_headers(io.BytesIO(raw + b"\r\n\r\n")), allowed, "HTTP/1.1")

    for bad in (b"Host: [::1", b"Host: ::1]:80", b"Host: 127.0.0.1:80x", b"Host: [::1]x", b"Host: localhost:99999",
                b"Host: local host"):
        for allowed in (LOOPBACK_NAMES, (ANY_HOST,)):
            with pytest.raises(RequestError) as e:
                check(bad, allowed)
            assert e.value.status == 400 and e.value.headers.get("Connection") == "close", (bad, allowed)
            assert "is not a valid host[:port]" in str(e.value)
    for good in (b"Host: [::1]:80", b"Host: 127.0.0.1:8000", b"Host: LOCALHOST.:65535", b"Host: localhost:"):
        check(good, LOOPBACK_NAMES)  # the controls: the same hosts, well formed


# ----------------------------------------------------------------------------- demo.py: failures in the table

def test_demo_row_reports_a_failed_build_and_a_failed_run(tmp_path):
    """demo.py 223-226 and 232-234: an export that raises, or an artifact whose run raises, is a
    row with status "error" and a note naming the exception (the demo goes on to the next
    format and its exit code says FAILED), and the half-built runner is closed."""
    from mamba_deploy.demo import run_format

    def broken_build(model, model_dir, work, threads=None):
        raise RuntimeError("export exploded")

    row = run_format("fmt", "torch", broken_build, "fp32", None, tmp_path, tmp_path, None, None, {})
    assert row.status == "error" and row.notes == ["build failed: RuntimeError: export exploded"]

    closed = []

    class BadRunner:
        def prefill(self, *a, **k):
            raise ValueError("run exploded")

        def close(self):
            closed.append(True)

    (tmp_path / "art.bin").write_bytes(b"x" * 10)
    row = run_format("fmt", "torch", lambda *a, **k: (BadRunner(), tmp_path / "art.bin"), "fp32", None, tmp_path,
                     tmp_path, torch.tensor([1, 2, 3]), [1], {})
    assert row.status == "error" and len(row.notes) == 1 and row.notes[0].startswith("run failed: ")
    assert closed == [True]


# ----------------------------------------------------------------------------- verify.py: labels

@pytest.mark.parametrize("qc, want", [({"quant_method": "bitsandbytes", "load_in_4bit": True}, "int4"),
                                      ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "int8")])
def test_bitsandbytes_checkpoint_gets_its_quantized_tolerance_row(qc, want, hf_checkpoint, tmp_path):
    """verify.py 171-173: a checkpoint saved by transformers with a bitsandbytes
    quantization_config (BitsAndBytesConfig: load_in_4bit = 4-bit weights, load_in_8bit = int8)
    is judged on the int4 / int8 tolerance row, not fp32's (which every such artifact fails)."""
    from conftest import edited_copy
    from mamba_deploy.verify import infer_artifact_dtype

    folder = edited_copy(hf_checkpoint("mamba")[0], tmp_path / "bnb", "config.json", quantization_config=qc)
    assert infer_artifact_dtype(folder) == want
    plain = edited_copy(hf_checkpoint("mamba")[0], tmp_path / "plain", "config.json",
                        quantization_config={"quant_method": "bitsandbytes"})
    assert infer_artifact_dtype(plain) == "fp32"  # neither flag: nothing says the weights are quantized


# ----------------------------------------------------------------------------- runners/preflight.py

def test_tensorrt_release_of_a_version_without_numbers():
    """preflight.py 127: a TensorRT version string with no leading release numbers (a local or
    nightly build's "dev") is compared as the string itself, while numeric ones compare by
    release numbers with trailing zeros dropped (PEP 440's release-segment equality)."""
    from packaging.version import Version

    from mamba_deploy.runners.preflight import _release

    assert _release("dev-build") == "dev-build" and _release(" dev ") == "dev"
    assert _release("dev") != _release("10.1")
    assert (_release("10.1.0") == _release("10.1")) == (Version("10.1.0") == Version("10.1"))
