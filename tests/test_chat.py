"""Chat templates: `generate --chat`, the server's /v1/chat/completions, and the template's way
through GGUF (tokenizer.chat_template) and back.

The reference is transformers' own `apply_chat_template` (text and token ids) on the same
tokenizer files, and llama.cpp's reading of the GGUF (skipped with the reason where
llama-cpp-python is not installed). Generation is compared token for token (greedy, fp32).
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
from pathlib import Path

import pytest

from conftest import HAVE_LLAMA
from mamba_deploy.chat import ChatTemplateError, chat_ids, read_chat_template, render_chat
from mamba_deploy.errors import ConfigError
from mamba_deploy.generation import generate
from mamba_deploy.runners import open_runner
from mamba_deploy.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo-mamba2"

# ChatML with a system default (Falcon-Mamba-7B-instruct's family), and a Mistral-style [INST]
# template that refuses non-alternating roles, writes bos_token itself and closes turns with eos
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
INST = ("{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ message['content'] | trim + eos_token }}{% endif %}{% endfor %}")
CONVERSATIONS = [
    [{"role": "user", "content": "def main():"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "import os"},
     {"role": "user", "content": "  print(x)  "}],
]


def _folder(tmp_path, template, name="chat") -> Path:
    """The shipped demo-mamba2 with a chat template in its tokenizer_config.json."""
    dst = tmp_path / name
    shutil.copytree(DEMO, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return dst


def _hf_chat(folder, messages, tokenize):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = tok.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=True)
    if tokenize and not isinstance(out, list):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return out


@pytest.mark.parametrize("template", [CHATML, INST], ids=["chatml", "inst"])
def test_rendered_text_and_ids_match_transformers(template, tmp_path):
    folder = _folder(tmp_path, template)
    tok = load_tokenizer(folder)
    assert tok.chat_template == template
    for messages in CONVERSATIONS:
        text = render_chat(template, messages, tok.id_to_token(tok.bos_token_id), tok.id_to_token(tok.eos_token_id))
        assert text == _hf_chat(folder, messages, tokenize=False)
        ids = chat_ids(tok, messages)
        assert ids == _hf_chat(folder, messages, tokenize=True)
        if template == INST:  # the template's BOS once, not once more from the tokenizer
            assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_template_sources(tmp_path):
    folder = _folder(tmp_path, [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}])
    assert read_chat_template(folder) == CHATML  # a list of named templates: "default"
    plain = tmp_path / "plain"
    shutil.copytree(DEMO, plain)
    assert read_chat_template(plain) is None and load_tokenizer(plain).chat_template is None
    (plain / "chat_template.jinja").write_text(INST)  # transformers >= 4.49 saves it beside the config
    assert load_tokenizer(plain).chat_template == INST


def test_template_and_message_errors(tmp_path):
    tok = load_tokenizer(_folder(tmp_path, INST))
    with pytest.raises(ChatTemplateError, match="refused the conversation: Conversation roles must alternate"):
        chat_ids(tok, [{"role": "assistant", "content": "x"}])
    with pytest.raises(ConfigError, match="message 0 must be an object with a role"):
        chat_ids(tok, [{"role": "robot", "content": "x"}])
    with pytest.raises(ConfigError, match="message 1 content must be a string"):
        chat_ids(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}])
    with pytest.raises(ConfigError, match="`messages` must be a non-empty list"):
        chat_ids(tok, [])
    with pytest.raises(ChatTemplateError, match="the chat template failed: TemplateSyntaxError"):
        render_chat("{% for %}", CONVERSATIONS[0])
    # a template bug at render time is the template's error too, not a bare TypeError
    with pytest.raises(ChatTemplateError, match="the chat template failed: TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", CONVERSATIONS[0])
    with pytest.raises(ConfigError, match="message 0 content must be a string, got \"b'x'\""):
        chat_ids(tok, [{"role": "user", "content": b"x"}])  # Python callers: named, not a json TypeError
    no_template = load_tokenizer(DEMO)
    with pytest.raises(ConfigError, match="has no chat template.*--chat-template FILE"):
        chat_ids(no_template, CONVERSATIONS[0])
    # OpenAI text content parts are joined; other parts are refused by name
    parts = [{"role": "user", "content": [{"type": "text", "text": "def "}, {"type": "text", "text": "main():"}]}]
    assert chat_ids(tok, parts) == chat_ids(tok, CONVERSATIONS[0])
    with pytest.raises(ConfigError, match="only text content parts"):
        chat_ids(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_generate_chat_cli(tmp_path, capsys):
    from mamba_deploy.cli import main

    folder = _folder(tmp_path, CHATML)
    argv = ["generate", str(folder), "--chat", "--system", "be brief", "--prompt", "def main():", "--prompt", "hi",
            "--max-new-tokens", "8", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    runner = open_runner(folder, "torch")
    ref = [_hf_chat(folder, [{"role": "system", "content": "be brief"}, {"role": "user", "content": p}], True)
           for p in ("def main():", "hi")]
    want = generate(runner, ref, max_new_tokens=8, stop_token_ids=[runner.tokenizer.eos_token_id])
    assert [r["tokens"] for r in rows] == want.tokens
    assert [r["completion"] for r in rows] == [runner.tokenizer.decode(t) for t in want.tokens]
    template = tmp_path / "t.jinja"  # --chat-template overrides the model's own
    template.write_text(INST)
    assert main(["generate", str(DEMO), "--chat", "--chat-template", str(template), "--prompt", "x",
                 "--max-new-tokens", "3", "--json"]) == 0
    ref = _hf_chat(_folder(tmp_path, INST, "inst"), [{"role": "user", "content": "x"}], True)
    want = generate(open_runner(DEMO, "torch"), [ref], max_new_tokens=3, stop_token_ids=[runner.tokenizer.eos_token_id])
    assert json.loads(capsys.readouterr().out)[0]["tokens"] == want.tokens[0]
    assert main(["generate", str(DEMO), "--system", "x", "--prompt", "y"]) == 2  # --system without --chat
    assert "add --chat" in capsys.readouterr().err
    assert main(["generate", str(DEMO), "--chat", "--prompt", "y"]) == 2  # no template anywhere
    assert "no chat template" in capsys.readouterr().err


# ----------------------------------------------------------------------------- server

@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    from mamba_deploy.serve import make_server

    folder = _folder(tmp_path_factory.mktemp("srv"), CHATML)
    runner = open_runner(folder, "torch")
    srv = make_server(runner, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, folder, runner
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def _post(srv, body, path="/v1/chat/completions"):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_chat_completions_match_generate(chat_server):
    srv, folder, runner = chat_server
    messages = CONVERSATIONS[1]
    want = generate(runner, [_hf_chat(folder, messages, True)], max_new_tokens=10,
                    stop_token_ids=[runner.tokenizer.eos_token_id])
    status, data = _post(srv, {"messages": messages, "max_tokens": 10, "temperature": 0})
    assert status == 200, data
    res = json.loads(data)
    assert res["object"] == "chat.completion" and res["id"].startswith("chatcmpl-")
    choice = res["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": runner.tokenizer.decode(want.tokens[0])}
    assert choice["token_ids"] == want.tokens[0] and choice["finish_reason"] == want.stop_reasons[0]
    assert res["usage"]["prompt_tokens"] == len(_hf_chat(folder, messages, True))
    # streamed: a role delta first, content deltas that add up to the same text, a finish reason
    status, data = _post(srv, {"messages": messages, "max_completion_tokens": 10, "temperature": 0, "stream": True})
    assert status == 200
    events = [json.loads(e[len("data: "):]) for e in data.decode().split("\n\n") if e and e != "data: [DONE]"]
    assert data.decode().endswith("data: [DONE]\n\n")
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:])
    assert text == choice["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == want.stop_reasons[0]
    assert [t for e in events[1:] for t in e["choices"][0]["token_ids"]] == want.tokens[0]


@pytest.mark.parametrize("body,match", [
    ({"messages": [{"role": "user", "content": 1}]}, "message 0 content must be a string"),
    ({"messages": "hello"}, "`messages` must be a non-empty list"),
    ({"prompt": "x", "messages": CONVERSATIONS[0]}, "takes `messages`, not `prompt`"),
    ({"messages": CONVERSATIONS[0], "n": 2}, "only n=1"),
])
def test_chat_request_errors_are_400s(chat_server, body, match):
    status, data = _post(chat_server[0], body)
    assert status == 400
    assert match in json.loads(data)["error"]["message"]


def test_chat_without_a_template_is_a_400_naming_the_fix(tmp_path):
    from mamba_deploy.serve import make_server

    srv = make_server(open_runner(DEMO, "torch"), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        status, data = _post(srv, {"messages": CONVERSATIONS[0]})
        err = json.loads(data)["error"]
        assert status == 400 and err["param"] == "messages" and "no chat template" in err["message"]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


# ----------------------------------------------------------------------------- GGUF

def test_gguf_carries_the_template_to_every_backend(tmp_path):
    gguf = pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    folder = _folder(tmp_path, INST)
    (tmp_path / "lone").mkdir()
    out = export_gguf(folder, tmp_path / "lone" / "m.gguf")
    assert gguf.GGUFReader(str(out)).get_field("tokenizer.chat_template").contents() == INST
    want = [_hf_chat(folder, m, True) for m in CONVERSATIONS]
    torch_tok = open_runner(out, "torch").tokenizer  # the GGUF alone: its own vocabulary and template
    assert torch_tok.chat_template == INST
    assert [chat_ids(torch_tok, m) for m in CONVERSATIONS] == want
    re_out = export_gguf(out, tmp_path / "re.gguf", outtype="q8_0")  # re-quantization keeps it
    assert gguf.GGUFReader(str(re_out)).get_field("tokenizer.chat_template").contents() == INST
    if HAVE_LLAMA:
        with open_runner(out, "llama.cpp", n_threads=2) as lr:
            assert lr.tokenizer.chat_template == INST  # what llama.cpp itself reads from the file
            assert [chat_ids(lr.tokenizer, m) for m in CONVERSATIONS] == want
    pytest.importorskip("onnx")
    from mamba_deploy.export.onnx import export_onnx

    onnx_dir = export_onnx(out, tmp_path / "onnx", validate=False)  # the GGUF's tokenizer written beside it
    assert load_tokenizer(onnx_dir).chat_template == INST


# every special-token name transformers' apply_chat_template passes; the demo tokenizer defines pad
SPECIALS = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ':' + m['content'] + (pad_token or '?') }}"
            "{% endfor %}[{{ pad_token }}|{{ unk_token }}|{{ sep_token }}|{{ cls_token }}|{{ mask_token }}]")


def test_template_gets_the_other_special_token_names_on_every_backend(tmp_path):
    """Templates were given bos_token / eos_token only: one writing `pad_token` (or unk_token, ...)
    rendered it as empty where transformers renders the token."""
    folder = _folder(tmp_path, SPECIALS)
    want = [_hf_chat(folder, m, True) for m in CONVERSATIONS]
    assert "<|pad|>" in _hf_chat(folder, CONVERSATIONS[0], False)  # the reference does write it
    assert [chat_ids(load_tokenizer(folder), m) for m in CONVERSATIONS] == want
    # the same BPE as vocab.json + merges.txt: the path where transformers builds the tokenizer
    slow = tmp_path / "slow"
    slow.mkdir()
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (slow / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (slow / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    (slow / "tokenizer_config.json").write_text(json.dumps({**tcfg, "tokenizer_class": "GPT2Tokenizer"}))
    shutil.copy(folder / "special_tokens_map.json", slow)
    slow_tok = load_tokenizer(slow)
    assert type(slow_tok._tok).__module__.startswith("transformers")
    assert [chat_ids(slow_tok, m) for m in CONVERSATIONS] == want
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    (tmp_path / "lone").mkdir()
    out = export_gguf(folder, tmp_path / "lone" / "m.gguf")
    assert [chat_ids(open_runner(out, "torch").tokenizer, m) for m in CONVERSATIONS] == want
    if HAVE_LLAMA:
        with open_runner(out, "llama.cpp", n_threads=2) as lr:
            assert [chat_ids(lr.tokenizer, m) for m in CONVERSATIONS] == want
