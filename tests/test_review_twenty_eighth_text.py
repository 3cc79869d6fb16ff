"""Review 28, the text-in / text-out path: a SentencePiece completion's leading space, stop
strings at the start of a reply, max_completion_tokens beside "max_tokens": null, per-row seeds,
and CLI output on a stdout whose encoding cannot write the text.

References: sentencepiece's decode of the whole sequence (prompt + completion) and llama.cpp's
own `create_completion` through llama-cpp-python (skipped where it is not installed) for the
completion text; the `tokenizers` library's decode of the whole sequence for byte-level BPE; the
same prompt generated alone for seeded sampling; the OpenAI rule that a null field is not sent.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import random
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from conftest import HAVE_LLAMA, build_hf_model, needs_llama

spm = pytest.importorskip("sentencepiece", reason="SentencePiece vocabularies need sentencepiece")
pytest.importorskip("google.protobuf", reason="sentencepiece's model file is read through protobuf")

WORDS = ["def", "main", "return", "print", "hello", "world", "mamba", "state", "space", "model", "code", "café"]
CONTROL = ["[INST]", "[/INST]"]
DEMO = Path(__file__).parents[1] / "models" / "demo-mamba1"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def blob():
    """A Llama-style SentencePiece BPE (word starts marked with '▁', byte fallback, <s> / </s>)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300, model_type="bpe",
                                   byte_fallback=True, control_symbols=CONTROL, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp(blob):
    return spm.SentencePieceProcessor(model_proto=blob)


@pytest.fixture(scope="module")
def spm_folder(blob, sp, tmp_path_factory):
    """A transformers Mamba2 checkpoint with the SentencePiece model beside it, whose output rows
    are zero except those of word-start pieces ("▁mamba"): every greedy token then opens a word,
    the case at issue (a random model mostly samples byte pieces)."""
    hf = build_hf_model("mamba2", seed=1, vocab_size=320, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id())
    with torch.no_grad():
        head = hf.get_output_embeddings().weight
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        keep = [i for i, p in enumerate(pieces) if p.startswith("▁") and len(p) > 1]
        mask = torch.zeros(head.shape[0], 1)
        mask[keep] = 1.0
        head.mul_(mask)
    folder = tmp_path_factory.mktemp("spm_m2") / "model"
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(blob)
    return folder


@pytest.fixture(scope="module")
def spm_gguf(spm_folder, tmp_path_factory):
    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_gguf(spm_folder, tmp_path_factory.mktemp("spm_gguf") / "m.gguf")


class Scripted:
    """A runner (duck-typed) whose logits write a script: row i emits scripts[i], then the EOS."""

    def __init__(self, tokenizer, vocab_size: int, scripts, eos: int):
        self.tokenizer, self.vocab_size, self.scripts, self.eos = tokenizer, vocab_size, scripts, eos

    def new_state(self, batch: int):
        return {"k": 0}

    def _logits(self, k: int):
        out = torch.full((len(self.scripts), self.vocab_size), -30.0)
        for i, s in enumerate(self.scripts):
            out[i, s[k] if k < len(s) else self.eos] = 30.0
        return out

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return self._logits(0)[:, None], state

    def step(self, ids, state):
        state["k"] += 1
        return self._logits(state["k"]), state


def _run(tok, prompt, completion_ids, eos, stops=None, vocab=320):
    """generate()'s text and the streamed text (TextStream) of a scripted completion."""
    from mamba_deploy.generation import TextStream, generate

    runner = Scripted(tok, vocab, [completion_ids], eos)
    stream = TextStream(tok, stops, prompt=prompt)
    chunks = []
    res = generate(runner, [prompt], max_new_tokens=len(completion_ids) + 1, stop_strings=stops,
                   on_token=lambda i, t: chunks.append(stream.push(t)))
    chunks.append(stream.finish())
    return res, chunks


def _spm_tokenizers(spm_folder, spm_gguf):
    """Each tokenizer a backend decodes this vocabulary with: the folder's (torch and ONNX load it
    with load_tokenizer), the GGUF's own on the torch backend, and llama.cpp's."""
    from mamba_deploy.runners import open_runner
    from mamba_deploy.tokenizer import load_tokenizer

    toks = [("folder", load_tokenizer(spm_folder)), ("gguf torch", open_runner(spm_gguf, "torch").tokenizer)]
    if HAVE_LLAMA:
        toks.append(("llama.cpp", open_runner(spm_gguf, "llama.cpp", threads=1).tokenizer))
    return toks


@pytest.mark.parametrize("prompt, completion", [
    ("hello", " world mamba"),
    ("[INST] print code [/INST]", " café model"),   # the prompt ends in a text-less control token
    ("state", " € space"),                        # '€' is three byte-fallback pieces
])
def test_spm_completion_keeps_its_leading_space(spm_folder, spm_gguf, sp, prompt, completion):
    """decode(prompt + completion) less decode(prompt), as sentencepiece decodes the whole
    sequence: the completion's first word keeps its space (it used to lose it: "world mamba")."""
    for name, tok in _spm_tokenizers(spm_folder, spm_gguf):
        pids, full = tok.encode(prompt), tok.encode(prompt + completion)
        assert full[:len(pids)] == pids, name
        ref = sp.decode(full)[len(sp.decode(pids)):]
        # the reference is the text the ids were made from (llama.cpp-style encoding gives a segment after a
        # control token a space of its own, so the GGUF's tokenizers may add one)
        assert ref.startswith(" ") and ref.lstrip() == completion.lstrip(), (name, ref)
        res, chunks = _run(tok, prompt, full[len(pids):], sp.eos_id())
        assert res.texts == [ref] and "".join(chunks) == ref, (name, res.texts, chunks)
        assert all("\ufffd" not in c for c in chunks), (name, chunks)
        # given as token ids (a chat prompt), with its text decoded by the caller
        from mamba_deploy.generation import completion_texts, generate

        ids_res = generate(Scripted(tok, 320, [full[len(pids):]], sp.eos_id()), [pids], max_new_tokens=len(full))
        assert ids_res.texts is None and completion_texts(tok, ids_res) == [ref], name


def test_spm_stop_string_at_the_start_of_the_reply(spm_folder, spm_gguf, sp):
    """A stop string that opens the reply as written (" world", its space included) ends it
    with nothing before it, in generate's text and in the stream."""
    for name, tok in _spm_tokenizers(spm_folder, spm_gguf):
        pids, full = tok.encode("hello"), tok.encode("hello world mamba state")
        for stops, want in ([" world"], ""), ([" mamba"], " world"), (["d m"], " worl"):
            assert sp.decode(full)[len(sp.decode(pids)):].startswith(want + stops[0])
            res, chunks = _run(tok, "hello", full[len(pids):], sp.eos_id(), stops)
            assert res.texts == [want] and res.stop_reasons == ["stop"], (name, stops, res.texts)
            assert "".join(chunks) == want, (name, stops, chunks)


@needs_llama
def test_generated_text_is_llama_cpps_create_completion(spm_gguf, capsys):
    """Greedy generation from a text prompt on the SentencePiece GGUF through the llama.cpp and
    torch backends, and the CLI's printed line, against llama-cpp-python's create_completion."""
    from mamba_deploy.cli import main
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    import llama_cpp

    llm = llama_cpp.Llama(str(spm_gguf), n_ctx=256, n_threads=1, verbose=False)
    want = llm.create_completion("hello", max_tokens=6, temperature=0)["choices"][0]["text"]
    del llm
    assert want.startswith(" ") and want.strip(), want  # the case at issue: a reply that opens a word
    for backend in ("llama.cpp", "torch"):
        with open_runner(spm_gguf, backend, threads=1) as r:
            assert generate(r, "hello", max_new_tokens=6).texts == [want], backend
    assert main(["generate", str(spm_gguf), "--backend", "llama.cpp", "--threads", "1", "--prompt", "hello",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == "hello" + want + "\n"


# ----------------------------------------------------------------------------- byte-level BPE


def test_byte_level_bpe_text_is_unchanged():
    """Byte-level BPE decodes token by token, so its text after the prompt is the tokens' own
    decode (as before); characters split over byte tokens never show U+FFFD in the stream, and
    a prompt that ends inside a character leaves the completion that character, whole."""
    from tokenizers import Tokenizer as HFTok

    from mamba_deploy.generation import TextStream, completion_texts
    from mamba_deploy.tokenizer import load_tokenizer

    tok, ref = load_tokenizer(DEMO), HFTok.from_file(str(DEMO / "tokenizer.json"))  # GPT-NeoX's byte-level BPE
    run = functools.partial(_run, tok, eos=tok.eos_token_id, vocab=tok.vocab_size)
    for prompt, completion in [("hello", " wörld 😀 fun"), ("the quick", " 日本語, brown"), ("a", "€")]:
        pids, full = tok.encode(prompt), tok.encode(prompt + completion)
        assert full[:len(pids)] == pids
        want = ref.decode(full[len(pids):])
        assert ref.decode(full) == ref.decode(pids) + want == prompt + completion
        res, chunks = run(prompt, full[len(pids):])
        assert res.texts == [want] and "".join(chunks) == want and not any("\ufffd" in c for c in chunks)
        assert len(full) - len(pids) > len(completion.split()) + 1  # characters split over byte tokens
        for stop in ("😀", "ö", "n"):
            if stop in want:
                res, chunks = run(prompt, full[len(pids):], stops=[stop])
                assert res.texts == [want[:want.index(stop)]] == ["".join(chunks)], stop
    # a prompt of ids that stops inside '€' (3 bytes, 3 tokens): the completion holds the character
    full = tok.encode("x €uro")
    cut = next(k for k in range(len(full)) if ref.decode(full[:k]).endswith("\ufffd"))
    res, chunks = run(full[:cut], full[cut:])
    text = completion_texts(tok, res)[0]
    assert ref.decode(full) == ref.decode(full[:cut]).rstrip("\ufffd") + text
    assert text.startswith("€") and "".join(chunks) == text
    # no prompt tokens at all: the stream decodes the tokens alone
    stream = TextStream(tok, prompt=[])
    assert "".join([stream.push(t) for t in full] + [stream.finish()]) == ref.decode(full)


# ----------------------------------------------------------------------------- seeds


def _complete(server, body, path="/v1/completions"):
    c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    c.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = c.getresponse()
    out = (r.status, json.loads(r.read()))
    c.close()
    return out


@pytest.fixture
def served(ckpt):
    """A server over the tiny Mamba1 with the tiny BPE and a chat template, in a thread."""
    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    s = make_server(open_runner(ckpt("mamba")[0], "torch"), port=0, quiet=True, chat_template=TEMPLATE)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s
    s.shutdown()
    s.server_close()


PROMPTS = ["hello world", "the quick brown fox jumps", "a"]


def test_seeded_prompt_samples_the_same_beside_other_prompts(ckpt):
    """generate([p, q, p], seed=s): each prompt gets the tokens it gets alone with seed s, so the
    two copies of p are identical (one generator per row, as concurrent requests have)."""
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    kw = dict(max_new_tokens=12, temperature=0.9, seed=7)
    with open_runner(ckpt("mamba")[0], "torch") as r:
        alone = [generate(r, [p], **kw).tokens[0] for p in PROMPTS]
        together = generate(r, PROMPTS + PROMPTS[:1], **kw).tokens
    assert together == alone + alone[:1]
    assert len(set(map(tuple, alone))) == len(alone)  # the prompts sampled different texts


def test_seeded_server_request_samples_each_prompt_as_alone(served):
    body = {"max_tokens": 12, "temperature": 0.8, "seed": 42}
    alone = [_complete(served, {**body, "prompt": p})[1]["choices"][0]["text"] for p in PROMPTS]
    st, out = _complete(served, {**body, "prompt": PROMPTS + PROMPTS[:1]})
    assert st == 200 and [c["text"] for c in out["choices"]] == alone + alone[:1]


# ----------------------------------------------------------------------------- max_completion_tokens


def test_max_completion_tokens_beside_a_null_max_tokens(served):
    """OpenAI's clients send every field, unset ones as null: "max_tokens": null is not sent, so
    max_completion_tokens applies (it was ignored: 16 tokens, the default)."""
    msgs = [{"role": "user", "content": "hello world"}]
    got = []
    for extra in ({}, {"max_tokens": None}):
        st, out = _complete(served, {"messages": msgs, "temperature": 0, "max_completion_tokens": 3, **extra},
                            "/v1/chat/completions")
        assert st == 200, out
        got.append((out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"],
                    out["choices"][0]["token_ids"]))
    assert got[0] == got[1] and got[0][:2] == (3, "length")


# ----------------------------------------------------------------------------- CLI output encoding


@pytest.mark.parametrize("prompts", [["x = '😀' é"], ["x = '😀' é", "hello ☃"]])
def test_generate_prints_to_a_cp1252_stdout(ckpt, capsys, monkeypatch, prompts):
    """A stdout in a legacy encoding (a Windows console or a file redirected from one) gets '?'
    for what it cannot write, not a UnicodeEncodeError traceback (exit 1): the UTF-8 output with
    those characters replaced, one prompt streamed or several printed at the end."""
    from mamba_deploy.cli import main

    argv = ["generate", str(ckpt("mamba")[0]), "--max-new-tokens", "4"] + [a for p in prompts for a in ("--prompt", p)]
    assert main(argv) == 0
    utf8 = capsys.readouterr().out
    raw = io.BytesIO()
    cp = io.TextIOWrapper(raw, encoding="cp1252", newline="\n", write_through=True)
    monkeypatch.setattr(sys, "stdout", cp)
    assert main(argv) == 0
    cp.flush()
    monkeypatch.undo()
    got = raw.getvalue().decode("cp1252")
    assert got == utf8.encode("cp1252", errors="replace").decode("cp1252")
    assert "x = '?' é" in got
