"""Findings of the thirty-fifth session's review of the ONNX Runtime / OpenVINO runners and
`bench`; each test fails on the code before its fix."""

from __future__ import annotations

import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

from mamba_deploy.errors import ConfigError, RunnerClosedError, ShapeError


def test_a_backend_runtime_error_keeps_the_other_targets_and_the_rows_before_it(onnx_export, hf_checkpoint,
                                                                                 monkeypatch):
    """ONNX Runtime and OpenVINO raise their own errors (RuntimeError, ORT's Fail) when a run
    fails, e.g. out of memory at a large batch; bench caught only typed errors, so one target's
    failure ended the whole run and nothing was written."""
    from mamba_deploy.bench import run_bench
    from mamba_deploy.runners.onnx_runner import OnnxRunner

    out = onnx_export("mamba")[0]
    real = OnnxRunner._run

    def fails_at_batch_2(self, ids, state, *a, **k):
        if ids.shape[0] == 2:
            raise RuntimeError("Error in execution: Failed to allocate memory for requested buffer")
        return real(self, ids, state, *a, **k)

    monkeypatch.setattr(OnnxRunner, "_run", fails_at_batch_2)
    data = run_bench([(str(out), "onnx"), (str(hf_checkpoint("mamba")[0]), "torch")], [1, 2], [4], gen_len=2,
                     warmup=0, repeats=1, progress=False)
    onnx_err = data["targets"][0]["error"]
    assert onnx_err and "Failed to allocate" in onnx_err and data["targets"][1]["error"] is None
    rows = [(r["backend"], r["batch"]) for r in data["results"]]
    assert rows == [("onnx", 1), ("torch", 1), ("torch", 2)]


def test_bench_passes_device_to_openvino(onnx_export, tmp_path):
    """--device was refused for an OpenVINO-only bench ("applies to the torch, openvino, tensorrt
    backends only; no target runs on the torch backend (openvino)"), and in a run with a torch
    target it was silently dropped for the OpenVINO one."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.cli import main

    out = onnx_export("mamba")[0]
    args = ["bench", str(out), "--backends", "openvino", "--device", "CPU", "--batch", "1", "--prompt-len", "3",
            "--gen-len", "1", "--warmup", "0", "--repeats", "1", "--quiet", "--out", str(tmp_path / "b")]
    assert main(args) == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["targets"][0]["device"] == "CPU" and data["targets"][0]["error"] is None
    # a flag OpenVINO does not take is still refused when no target runs on torch
    assert main(args[:-2] + ["--dtype", "bf16", "--out", str(tmp_path / "c")]) == 2


def test_targets_of_the_same_name_are_told_apart_in_the_table(onnx_export, tmp_path):
    """Two exports in folders of one name (a/model, b/model) were both labelled `model`, and
    their plot lines merged into one."""
    from mamba_deploy.bench import markdown_table, run_bench

    out = onnx_export("mamba")[0]
    for d in ("a", "b"):
        shutil.copytree(out, tmp_path / d / "model")
    data = run_bench([(str(tmp_path / d / "model"), "onnx") for d in ("a", "b")], [1], [3], gen_len=1, warmup=0,
                     repeats=1, progress=False)
    table = markdown_table(data)
    assert "| a/model (onnx) |" in table and "| b/model (onnx) |" in table


def _state_feeds(runner, ids, **extra):
    from mamba_deploy.export.onnx_meta import state_names
    from mamba_deploy.state import State

    arrays = [np.zeros(s, np.float32) for s in State.layer_shapes(runner.config, ids.shape[0])]
    return {"input_ids": ids, **dict(zip(state_names(runner.n_layer), arrays)), **extra}


@pytest.mark.parametrize("ids, extra, says", [
    (np.array([[1.0, 2.0]]), {}, "is float64, the graph takes int64"),
    (np.array([[1, 2]], np.int32), {}, "is int32, the graph takes int64"),
    (np.array([[-5]]), {}, "token id -5 outside the vocabulary"),  # Gather wrapped it to another token
    (np.array([[1, 2, 3]]), {"attention_mask": np.array([[1, 0, 1]])}, "rows must be left padding"),
    (torch.tensor([[1, 2]]), {}, "run() takes numpy arrays"),
])
def test_onnx_run_checks_its_feeds_as_prefill_does(onnx_export, ids, extra, says):
    """OnnxRunner.run checked only shapes: other dtypes came back as ORT's InvalidArgument, a
    negative id ran as another token, a mask with a hole ran."""
    from mamba_deploy.runners.onnx_runner import open_onnx

    runner = open_onnx(onnx_export("mamba")[0])
    with pytest.raises(ShapeError, match=says.replace("(", r"\(").replace(")", r"\)")):
        runner.run(_state_feeds(runner, ids, **extra))
    good = runner.run(_state_feeds(runner, np.array([[1, 2, 3]])))
    assert good["logits"].shape[:2] == (1, 3)


def test_closing_an_openvino_runner_while_a_call_waits_says_it_is_closed(onnx_export):
    """A call waiting for the infer request's lock when close() ran found the request gone
    (AttributeError: 'NoneType' object has no attribute 'infer')."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.runners.openvino_runner import open_openvino

    runner = open_openvino(onnx_export("mamba")[0])
    state = runner.new_state(1)
    got = []

    def call():
        try:
            runner.prefill(torch.tensor([[1, 2]]), state)
            got.append("ran")
        except Exception as e:  # noqa: BLE001
            got.append(type(e))

    with runner.call_lock:  # another call is running
        t = threading.Thread(target=call)
        t.start()
        t.join(0.5)  # now waiting for the lock, past the closed check at the method's entry
        runner.close()
    t.join(30)
    assert got == [RunnerClosedError]


def test_openvino_says_when_it_runs_another_precision(onnx_export):
    """precision='f16' on a CPU without fp16 arithmetic compiled to bf16 without a word."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.runners.openvino_runner import open_openvino

    out = onnx_export("mamba")[0]
    for precision in ("f32", "bf16", "f16"):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            runner = open_openvino(out, precision=precision)
        ran = runner.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # OpenVINO's own report
        said = [str(x.message) for x in w if "runs precision" in str(x.message)]
        assert bool(said) == (ran != precision), (precision, ran, said)
        assert not said or f"as {ran}" in said[0]
        runner.close()


def test_openvino_properties_it_cannot_take_are_a_config_error_naming_them(onnx_export):
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy.runners.openvino_runner import open_openvino

    out = onnx_export("mamba")[0]
    with pytest.raises(ConfigError, match="properties must be a dict"):
        open_openvino(out, properties=["INFERENCE_NUM_THREADS"])
    with pytest.raises(ConfigError, match=r"(?s)with properties \{'NOT_A_PROPERTY': 1\}.*leave them out"):
        open_openvino(out, properties={"NOT_A_PROPERTY": 1})


def test_load_torch_state_names_the_source_rows(onnx_export):
    """A source state of another batch was reported as 'ids have batch 3', with no ids in the call."""
    from mamba_deploy.runners.onnx_runner import open_onnx
    from mamba_deploy.state import State

    runner = open_onnx(onnx_export("mamba")[0])
    src = State.from_layers([torch.zeros(s) for s in State.layer_shapes(runner.config, 3)])
    with pytest.raises(ShapeError, match="the source state's rows have batch 3 but the state was made for batch 2"):
        runner.load_torch_state(runner.new_state(2), src)


# ------------------------------------------------------------------ train / data / eval (a second review)

def _run_args(tmp_path, **kw):
    import argparse
    from pathlib import Path

    models = Path(__file__).resolve().parents[1] / "models"
    base = dict(preset="tiny-mamba2", tokenizer=str(models / "demo-mamba2"), out=str(tmp_path / "out"),
                work_dir=str(tmp_path / "work"), data_cache=str(tmp_path.parent / "stdlib-cache"), steps=6,
                max_minutes=None, batch=2, seq_len=16, lr=3e-3, warmup=1, weight_decay=0.1, clip=1.0, amp=None,
                device="cpu", eval_every=2, eval_batch=2, eval_tokens=0, save_every=100, seed=0, resume=False)
    return argparse.Namespace(**{**base, **kw})


def _interrupt_at(monkeypatch, call: int, inside_update: bool = False):
    """The `call`-th train_step raises KeyboardInterrupt: in its forward pass, or once AdamW's update
    has begun."""
    from mamba_deploy import train

    calls, real = [], train.train_step

    def step(model, opt, *a, **k):
        calls.append(1)
        if len(calls) == call:
            if inside_update:  # the update has begun (the weights moved), the step is not counted yet
                opt.step()
            raise KeyboardInterrupt
        return real(model, opt, *a, **k)

    monkeypatch.setattr(train, "train_step", step)


def test_an_interrupted_run_is_saved_and_resumes_to_the_uninterrupted_model(tmp_path, monkeypatch):
    """Ctrl-C kept nothing since the last --save-every (before the first, nothing at all). Now the
    steps done are saved, with the data RNG from before the interrupted step's batch, so --resume
    ends with the model an uninterrupted run writes, byte for byte."""
    from mamba_deploy import train

    full = train.train(_run_args(tmp_path / "a"))
    _interrupt_at(monkeypatch, 4)  # steps 1-3 done, the 4th interrupted in its forward pass
    with pytest.raises(KeyboardInterrupt):
        train.train(_run_args(tmp_path / "b"))
    monkeypatch.undo()
    assert json.loads((tmp_path / "b" / "out" / "train_log.json").read_text())["steps"] == 3
    again = train.train(_run_args(tmp_path / "b", resume=True))
    strip = lambda log: [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log]  # noqa: E731
    assert strip(again["log"]) == strip(full["log"]) and again["tokens_seen"] == full["tokens_seen"]
    assert (tmp_path / "b" / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "out" / "model.safetensors").read_bytes()


def test_an_interrupt_inside_the_optimizer_update_keeps_the_last_save(tmp_path, monkeypatch, capsys):
    """Weights part-way through AdamW's update are no step's: the last save stands."""
    from mamba_deploy import train

    _interrupt_at(monkeypatch, 4, inside_update=True)
    with pytest.raises(KeyboardInterrupt):
        train.train(_run_args(tmp_path, save_every=2))
    monkeypatch.undo()
    assert "interrupted inside an optimizer update: the last save (step 2) stands" in capsys.readouterr().err
    assert torch.load(tmp_path / "work" / "train_state.pt", weights_only=False)["step"] == 2


def test_resume_keeps_the_schedule_max_minutes_fitted(tmp_path, monkeypatch):
    """--max-minutes fits the schedule to the time after 12 steps; a resumed run fitted it again
    to a fresh budget (the rate jumped back up, the run ended elsewhere), and a finished run
    resumed trained on at the peak rate."""
    from mamba_deploy import train

    monkeypatch.setattr(train, "resolve_total_steps", lambda *a: 16)  # the first run's budget: 16 steps
    _interrupt_at(monkeypatch, 14)
    args = dict(steps=40, max_minutes=1.0, eval_every=1)
    with pytest.raises(KeyboardInterrupt):
        train.train(_run_args(tmp_path, **args))
    monkeypatch.undo()
    assert torch.load(tmp_path / "work" / "train_state.pt", weights_only=False)["schedule_steps"] == 16
    monkeypatch.setattr(train, "resolve_total_steps", lambda *a: 30)  # another budget: not applied
    again = train.train(_run_args(tmp_path, resume=True, **args))
    # as uninterrupted: 12 steps timed against --steps 40, then the fitted 16 (re-fitted: 30)
    assert again["steps"] == 16 and [e["lr"] for e in again["log"]] == \
        [train.lr_at(s, 40 if s < 12 else 16, 3e-3, 1) for s in range(16)]
    with pytest.raises(ConfigError, match="has done all 16 steps that its --max-minutes fitted"):
        train.train(_run_args(tmp_path, resume=True, **args))


def test_resume_refuses_other_settings(tmp_path):
    """--resume took a new --batch / --seq-len / --lr silently (and logged them as the whole
    run's), ignored --seed, and counted tokens_seen from the new settings."""
    from mamba_deploy import train

    train.train(_run_args(tmp_path, steps=2, save_every=1))
    with pytest.raises(ConfigError, match="started with --batch 2 --seq-len 16, this command has --batch 4 --seq-len 32"):
        train.train(_run_args(tmp_path, steps=4, batch=4, seq_len=32, resume=True))
    with pytest.raises(ConfigError, match="started with --seed 0, this command has --seed 9"):
        train.train(_run_args(tmp_path, steps=4, seed=9, resume=True))
    assert train.train(_run_args(tmp_path, steps=4, resume=True))["tokens_seen"] == 4 * 2 * 16


def test_resume_redoes_an_interrupted_final_evaluation(tmp_path, monkeypatch):
    """The last step's state and snapshot were saved, then the final --eval-tokens evaluation was
    interrupted: --resume refused ("already done"), and the model card's validation never came."""
    from mamba_deploy import train

    real = train.final_eval
    monkeypatch.setattr(train, "final_eval", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train.train(_run_args(tmp_path, steps=2, eval_tokens=64))
    monkeypatch.setattr(train, "final_eval", real)
    done = train.train(_run_args(tmp_path, steps=2, eval_tokens=64, resume=True))
    assert "validation" in done and "validation" in json.loads((tmp_path / "out" / "train_log.json").read_text())


def test_a_truncated_token_cache_is_encoded_again(tmp_path):
    """A cache cut short (an interrupted copy to the training machine) was a numpy traceback."""
    from pathlib import Path

    from mamba_deploy import data

    tok = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    want = data.load_split(tok, "train", tmp_path / "cache", root=corpus)
    arr = tmp_path / "cache" / "train.npy"
    arr.write_bytes(arr.read_bytes()[:200])
    with pytest.warns(UserWarning, match="cannot be read.*encoding it again"):
        got = data.load_split(tok, "train", tmp_path / "cache", root=corpus)
    assert np.array_equal(got, want) and np.array_equal(np.load(arr), want)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="--data-cache .*afile is a file"):
        data.load_split(tok, "train", tmp_path / "afile", root=corpus)


def test_eval_text_scores_the_files_own_line_endings(tmp_path, capsys):
    """--text read through read_text turned "\\r\\n" into "\\n": a CRLF file was scored as the LF text
    (the same token count and perplexity)."""
    from pathlib import Path

    from tokenizers import Tokenizer

    from mamba_deploy.cli import main

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    tok = Tokenizer.from_file(str(demo / "tokenizer.json"))
    lf = "def f(x):\n    return x + 1\n" * 20
    scored = {}
    for name, text in (("lf", lf), ("crlf", lf.replace("\n", "\r\n"))):
        (tmp_path / name).write_bytes(text.encode())
        assert main(["eval", str(demo), "--text", str(tmp_path / name), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        scored[name] = got["tokens"]
        assert got["tokens"] == len(tok.encode(text).ids) - 1, (name, got)  # every token after the first
    assert scored["crlf"] > scored["lf"]


def test_seq_len_error_names_the_split(tmp_path):
    from mamba_deploy.train import sample_batch

    with pytest.raises(ConfigError, match="the validation split has 10 tokens, fewer than --seq-len 64 .*--seq-len 9"):
        sample_batch(np.arange(10), 2, 64, np.random.default_rng(0), "validation split")


# ------------------------------------------------------------------ generation / serve / chat (a third review)

DEMO1 = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "demo-mamba1"
ENDS_AT_ONCE = 'if __name__ == "__main__":\n    main()\n'  # demo-mamba1's greedy continuation is its EOS


@pytest.fixture(scope="module")
def demo_server():
    import threading as th

    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    srv = make_server(open_runner(DEMO1, "torch"), "127.0.0.1", 0, quiet=True, max_tokens_limit=40)
    t = th.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _call(srv, path, body):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_token_id_prompts_stop_at_the_eos_as_transformers_does(demo_server):
    """generate() and the server ran a token-id prompt past the EOS to max_tokens (gluing the next
    document's text on, finish_reason "length"); transformers' generate stops there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    tok = AutoTokenizer.from_pretrained(DEMO1)
    hf = AutoModelForCausalLM.from_pretrained(DEMO1, dtype=torch.float32).eval()
    ids = tok(ENDS_AT_ONCE, return_tensors="pt").input_ids
    want = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert want[-1] == tok.eos_token_id and len(want) < 10  # the reference stops at its EOS
    res = generate(open_runner(DEMO1, "torch"), [ids[0].tolist()], max_new_tokens=10)
    assert res.tokens[0] == want[:-1] and res.stop_reasons == ["stop"]  # the stop token is not returned
    status, got = _call(demo_server, "/v1/completions", {"prompt": ids[0].tolist(), "max_tokens": 10,
                                                         "temperature": 0})
    assert status == 200 and got["choices"][0]["finish_reason"] == "stop"
    assert got["choices"][0]["token_ids"] == want[:-1]
    status, got = _call(demo_server, "/v1/completions", {"prompt": ids[0].tolist(), "max_tokens": 10,
                                                         "temperature": 0, "ignore_eos": True})
    assert status == 200 and got["choices"][0]["finish_reason"] == "length"


def test_chat_without_max_tokens_is_not_cut_at_16(demo_server, tmp_path):
    """/v1/chat/completions took the completions endpoint's 16-token default; OpenAI's chat has
    none (the SDK sends no max_tokens), so every reply was cut short."""
    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    srv = make_server(open_runner(DEMO1, "torch"), "127.0.0.1", 0, quiet=True, max_tokens_limit=40,
                      chat_template=template)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        body = {"messages": [{"role": "user", "content": "import os\nimport sys\n"}], "temperature": 0}
        status, got = _call(srv, "/v1/chat/completions", body)
        assert status == 200
        used = got["usage"]["completion_tokens"]
        assert 16 < used <= 40, got  # demo-mamba1's greedy reply to this runs past 16 tokens
    finally:
        srv.shutdown()
        srv.server_close()


def test_chat_request_faults_are_named_before_the_missing_template(demo_server):
    """On a model without a chat template, `n: 2` and empty `messages` were both answered with
    "has no chat template", not with the field at fault."""
    status, got = _call(demo_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                              "n": 2})
    assert status == 400 and got["error"]["param"] == "n"
    status, got = _call(demo_server, "/v1/chat/completions", {"messages": []})
    assert status == 400 and "`messages` must be a non-empty list" in got["error"]["message"]


def test_a_template_with_generation_blocks_renders_as_transformers_does():
    """{% generation %} (transformers' assistant-token marks; SmolLM3, TRL templates) was a
    TemplateSyntaxError: every chat request a 400."""
    from transformers import AutoTokenizer

    from mamba_deploy.chat import chat_ids
    from mamba_deploy.tokenizer import load_tokenizer

    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    hf = AutoTokenizer.from_pretrained(DEMO1)
    want = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    assert chat_ids(load_tokenizer(DEMO1), messages, template) == hf.encode(want, add_special_tokens=False)


def test_vllm_top_k_minus_one_is_off_and_min_p_one_is_accepted(demo_server):
    base = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0.8, "seed": 3, "ignore_eos": True}
    status, off = _call(demo_server, "/v1/completions", {**base, "top_k": 0})
    status2, minus = _call(demo_server, "/v1/completions", {**base, "top_k": -1})
    assert status == status2 == 200 and minus["choices"][0]["token_ids"] == off["choices"][0]["token_ids"]
    status, one = _call(demo_server, "/v1/completions", {**base, "min_p": 1})
    greedy = _call(demo_server, "/v1/completions", {**base, "temperature": 0})[1]
    assert status == 200 and one["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]


def test_a_lone_sentencepiece_space_keeps_its_place_in_streamed_and_stopped_text():
    """With SentencePiece's default remove_extra_whitespaces, decode(["▁", "▁state"]) is "state":
    a window starting at a sampled lone "▁" lost a space, the stream's finish() repeated a
    character, and generate's stop cut landed a character early. The reference: the whole
    completion decoded at once."""
    import io

    sentencepiece = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")

    from mamba_deploy.generation import Rows, TextStream
    from mamba_deploy.tokenizer import sentencepiece_tokenizer

    rng = __import__("random").Random(0)
    words = "the mamba state model stop here hello world it's".split()
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)),
        model_writer=buf, vocab_size=320, model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = sentencepiece_tokenizer(buf.getvalue())
    prompt = tok.encode("the model")
    comp = [tok.token_to_id(p) for p in ("▁", "▁state", "▁hello", "▁world")]
    whole = tok.decode(prompt + comp)[len(tok.decode(prompt)):]  # the completion's text
    stream = TextStream(tok, None, prompt=prompt)
    assert "".join([stream.push(t) for t in comp] + [stream.finish()]) == whole
    rows = Rows([prompt], tok, torch.tensor([], dtype=torch.long), ["world"])
    for t in comp:
        rows.push(torch.tensor([t]))
    assert rows.result(True).texts[0] == whole[:whole.index("world")]


def test_an_interrupt_during_an_evaluation_keeps_its_log_entry(tmp_path, monkeypatch):
    """An interrupt inside a step's validation loss saved the step without its log entry, and
    --resume (starting after it) never wrote it: the log had a hole."""
    from mamba_deploy import train

    full = train.train(_run_args(tmp_path / "a"))
    calls, real = [], train.quick_val_loss

    def cut(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the step-4 evaluation
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "quick_val_loss", cut)
    with pytest.raises(KeyboardInterrupt):
        train.train(_run_args(tmp_path / "b"))
    monkeypatch.undo()
    again = train.train(_run_args(tmp_path / "b", resume=True))
    strip = lambda log: [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log]  # noqa: E731
    assert [e["step"] for e in again["log"]] == [2, 4, 6] and strip(again["log"]) == strip(full["log"])


def test_bench_keeps_device_for_the_torch_targets_and_raises_its_own_bugs(onnx_export, hf_checkpoint, tmp_path,
                                                                           monkeypatch):
    """--device beside a torch target is the torch target's (OpenVINO was handed 'cuda' and
    failed); an error that is neither a typed one nor a runtime's (a bug) is raised, not filed as
    the target's error."""
    pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
    from mamba_deploy import bench
    from mamba_deploy.cli import main

    out = onnx_export("mamba")[0]
    ck = hf_checkpoint("mamba")[0]
    assert main(["bench", f"{ck},{out}", "--backends", "torch,openvino", "--device", "meta", "--batch", "1",
                 "--prompt-len", "3", "--gen-len", "1", "--warmup", "0", "--repeats", "1", "--quiet", "--out",
                 str(tmp_path / "b")]) == 1
    targets = json.loads((tmp_path / "b" / "results.json").read_text())["targets"]
    assert targets[0]["error"] and targets[1]["error"] is None and "device" not in targets[1], targets

    def bug(*a, **k):
        raise AttributeError("a bug in bench_config")

    monkeypatch.setattr(bench, "bench_config", bug)
    with pytest.raises(AttributeError, match="a bug in bench_config"):
        bench.run_bench([(str(out), "onnx")], [1], [3], gen_len=1, warmup=0, repeats=1, progress=False)


def test_a_run_of_whitespace_tokens_does_not_keep_the_decode_window_open():
    """Holding the window start behind whitespace-only text (for SentencePiece's lone '▁') made
    each push decode the whole run again: quadratic in blank lines or indentation."""
    from pathlib import Path

    from mamba_deploy.generation import WINDOW_HOLD, IncrementalText
    from mamba_deploy.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "models" / "demo-mamba2")
    blank = tok.encode("\n\n")
    assert len(blank) == 1 and tok.decode(blank).strip() == ""
    inc = IncrementalText(tok)
    for _ in range(4 * WINDOW_HOLD):
        inc.push(blank[0])
    assert len(inc.ids) - inc.p <= WINDOW_HOLD + 1
    assert inc.text == tok.decode(blank * (4 * WINDOW_HOLD))
