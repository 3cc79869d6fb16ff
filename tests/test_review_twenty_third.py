"""Review (twenty-third session): user-level findings, each a test that failed before its fix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from mamba_deploy.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO2 = REPO / "models" / "demo-mamba2"
EOS_FIRST = "if __name__ == '__main__':\n    main()\n"  # demo-mamba2 answers this with its EOS at once


def _generate_json(capsys, *extra):
    assert main(["generate", str(DEMO2), "--prompt", EOS_FIRST, "--max-new-tokens", "12", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)[0]


def test_a_stop_id_does_not_turn_the_eos_stop_off(capsys):
    """`--stop ID` replaced the tokenizer's EOS as the stop set: generation ran past the end of
    text (an invisible token) to --max-new-tokens. An unrelated stop id now changes nothing."""
    plain = _generate_json(capsys)
    assert plain["stop"] == "stop" and plain["tokens"] == []  # the reference: EOS ends it at once
    assert _generate_json(capsys, "--stop", "99") == plain


def test_server_stop_token_ids_keep_the_eos_stop_for_text_prompts():
    """The server's `stop_token_ids` extension replaced EOS the same way for text prompts. Since
    the thirty-fifth session token-id prompts keep the EOS too (as vLLM; transformers' generate
    stops at it whatever the prompt), and `ignore_eos` leaves it out."""
    import http.client
    import threading

    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    runner = open_runner(DEMO2, "torch")
    server = make_server(runner, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        def post(body):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({"max_tokens": 12, "temperature": 0, **body}),
                         {"Content-Type": "application/json"})
            out = json.loads(conn.getresponse().read())
            conn.close()
            return out["choices"][0]

        plain = post({"prompt": EOS_FIRST})
        assert plain["finish_reason"] == "stop" and plain["token_ids"] == []
        assert post({"prompt": EOS_FIRST, "stop_token_ids": [99]}) == plain
        ids = runner.tokenizer.encode(EOS_FIRST)
        assert post({"prompt": ids, "stop_token_ids": [99]})["token_ids"] == []  # the EOS stops it
        free = post({"prompt": ids, "stop_token_ids": [99], "ignore_eos": True})
        assert free["token_ids"][:1] == [runner.tokenizer.eos_token_id]  # ids alone: EOS does not stop it
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def test_a_huge_temperature_samples_without_a_numpy_warning():
    """--temperature 1e39 (finite, accepted) printed numpy's "overflow encountered in cast"."""
    from mamba_deploy.generation import SamplingConfig, filtered_probs

    logits = torch.randn(2, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = filtered_probs(logits, SamplingConfig(temperature=1e39))
        tiny = filtered_probs(logits, SamplingConfig(temperature=1e-46))  # below float32: float64 division
    assert torch.allclose(probs, torch.full_like(probs, 1 / 50))  # T -> inf: uniform, as float64 math says
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1)) and torch.allclose(tiny.max(-1).values, torch.ones(2))


# ----------------------------------------------------------------------------- convert / verify


def test_mamba_ssm_layout_refuses_an_intermediate_size_it_cannot_hold(tmp_path, capsys):
    """A Mamba1 whose intermediate_size is not expand * hidden_size was written with expand alone
    (exit 0), and the output then failed to load on every tensor's shape. A whole multiple of
    hidden_size is written as that expand (forty-second session); any other is refused."""
    import torch

    from conftest import build_hf_model
    from mamba_deploy import load_model
    from mamba_deploy.state import State

    build_hf_model("mamba", intermediate_size=80).save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ssm"), "--format", "mamba_ssm"]) == 2
    assert "intermediate size" in capsys.readouterr().err and not (tmp_path / "ssm").exists()

    hf = build_hf_model("mamba", intermediate_size=96)  # 3 * hidden_size 32
    hf.save_pretrained(tmp_path / "hf3")
    assert main(["convert", str(tmp_path / "hf3"), str(tmp_path / "ssm3"), "--format", "mamba_ssm"]) == 0
    model = load_model(tmp_path / "ssm3")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits.double()
        got = model(ids, State.zeros(model.config, 2)).logits.double()
    assert model.config.d_inner == 96 and (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_a_padded_vocabulary_survives_the_hf_layout(tmp_path):
    """A mamba_ssm model of 90 tokens padded to 96 rows became a 96-token model in the hf layout:
    the padding rows turned into tokens (another perplexity) and verify refused the pair as "not
    the same model". transformers still loads the 96 rows; the real count rides beside them."""
    import transformers

    from conftest import random_lm
    from mamba_deploy import MambaConfig, load_model, save_checkpoint
    from mamba_deploy.errors import ConfigError

    cfg = MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=90, pad_vocab_size_multiple=8, d_state=16,
                      headdim=16, chunk_size=16)
    save_checkpoint(random_lm(cfg), tmp_path / "ssm", fmt="mamba_ssm")
    assert main(["convert", str(tmp_path / "ssm"), str(tmp_path / "hf")]) == 0
    src, hf = load_model(tmp_path / "ssm"), load_model(tmp_path / "hf")
    assert hf.config.vocab_size == 90 and hf.config.padded_vocab_size == 96
    ids = torch.randint(0, 90, (2, 19))
    with torch.no_grad():
        a, b = src(ids).logits, hf(ids).logits
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits  # 96 rows
    assert torch.equal(a, b)
    assert torch.allclose(b[..., :90], ref[..., :90], rtol=1e-4, atol=1e-5)
    assert main(["verify", str(tmp_path / "ssm"), str(tmp_path / "hf"), "--lengths", "1,7", "--batch", "1",
                 "--decode-steps", "2"]) == 0
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**raw, "unpadded_vocab_size": 80}))
    with pytest.raises(ConfigError, match="unpadded_vocab_size=80"):
        load_model(tmp_path / "hf")


def test_a_recorded_gguf_type_does_not_tighten_a_later_16_bit_save(tmp_path):
    """A checkpoint converted from an F16 GGUF records f16; converted again with --dtype bf16 it
    kept saying f16, so verify held bf16 weights to fp16's limits."""
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.verify import infer_artifact_dtype

    f16 = export_gguf(DEMO2, tmp_path / "m.f16.gguf", outtype="f16")
    assert main(["convert", str(f16), str(tmp_path / "a")]) == 0
    assert infer_artifact_dtype(tmp_path / "a") == "f16"
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--dtype", "bf16"]) == 0
    assert infer_artifact_dtype(tmp_path / "b") == "bf16"
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "c"), "--dtype", "fp32"]) == 0
    assert infer_artifact_dtype(tmp_path / "c") == "f16"  # fp32 does not undo the rounding


def test_a_folder_with_safetensors_and_bin_loads_the_safetensors_as_transformers_does(hf_checkpoint, tmp_path):
    """model.safetensors beside a pytorch_model.bin shard index: the .bin shards were loaded
    (any index came before any single file) where transformers loads the safetensors."""
    import shutil

    import transformers

    from conftest import build_hf_model
    from mamba_deploy import load_model

    src, _ = hf_checkpoint("mamba")
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    other = build_hf_model("mamba", seed=7)
    torch.save(other.state_dict(), folder / "pytorch_model-00001-of-00001.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: "pytorch_model-00001-of-00001.bin" for k in other.state_dict()}}))
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        got = load_model(folder)(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_convert_of_a_config_json_path_keeps_the_stored_dtype(tmp_path):
    """`convert FOLDER/config.json OUT` (accepted, as by load_model) wrote fp32 where
    `convert FOLDER OUT` keeps the folder's fp16."""
    from mamba_deploy.checkpoint import stored_dtype

    assert stored_dtype(DEMO2 / "config.json") == stored_dtype(DEMO2) == torch.float16
    assert main(["convert", str(DEMO2 / "config.json"), str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "float16"


def test_verify_json_is_written_when_stdout_is_closed(tmp_path):
    """`verify ... --json FILE | head -n 0`: the table's print hit the closed pipe first and the
    requested file was never written."""
    import os
    import subprocess
    import sys

    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mamba_deploy", "verify", str(DEMO2), str(DEMO2), "--lengths",
                             "1", "--batch", "1", "--decode-steps", "1", "--json", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    proc.stdout.close()  # as `| head -n 0` does
    proc.wait(timeout=300)
    assert json.loads(out.read_text())["passed"] is True


def test_verify_names_a_gguf_reference_by_its_file(tmp_path, capsys):
    """A .gguf reference was named by its folder ("vs reference /dir (torch float32)")."""
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    ref = export_gguf(DEMO2, tmp_path / "ref.gguf")
    report = tmp_path / "r.json"
    assert main(["verify", str(ref), str(DEMO2), "--lengths", "1", "--batch", "1", "--decode-steps", "1",
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["reference"].startswith(str(ref))
    assert f"reference {ref} " in capsys.readouterr().out


# ----------------------------------------------------------------------------- quantize / train / serve


def test_rules_that_quantize_nothing_are_refused(tmp_path, capsys):
    """A --config whose rules disable every module wrote a checkpoint (exit 0) that every loader
    then refused, with advice to re-create it with quantize."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"quant_cfg": {"*": {"enable": False}}}))
    out = tmp_path / "q"
    assert main(["quantize", str(DEMO2), str(out), "--method", "int8", "--config", str(rules)]) == 2
    assert "no module to quantize" in capsys.readouterr().err and not out.exists()


def test_quantizing_a_quantized_gguf_records_its_type(tmp_path):
    """int8 of a Q4_0 GGUF dropped the GGUF's type: verify held it to int8's limits, which Q4_0's
    own rounding exceeds. The type is recorded and the looser of the two rows applies."""
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.verify import infer_artifact_dtype

    q4 = export_gguf(DEMO2, tmp_path / "m.q4_0.gguf", outtype="q4_0")
    assert main(["quantize", str(q4), str(tmp_path / "q"), "--method", "int8"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["source_weights"] == "q4_0"
    assert infer_artifact_dtype(tmp_path / "q") == "q4_0"


def test_train_eval_tokens_one_is_refused_by_the_parser():
    """--eval-tokens 1 was accepted and failed after every training step had run."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--tokenizer", str(DEMO2), "--out", "unused", "--eval-tokens", "1"])
    assert e.value.code == 2


def test_resume_with_no_steps_left_is_refused_and_keeps_the_log(tmp_path, capsys):
    """--resume with --steps at or below the steps done trained nothing, exited 0 and overwrote
    train_log.json (train_seconds 0, the new command)."""
    common = ["--preset", "tiny-mamba2", "--tokenizer", str(DEMO2), "--data-cache", str(tmp_path / "cache"),
              "--batch", "2", "--seq-len", "32", "--eval-batch", "2", "--warmup", "1", "--save-every", "2",
              "--eval-every", "2", "--out", str(tmp_path / "m")]
    assert main(["train", *common, "--steps", "4"]) == 0
    log = (tmp_path / "m" / "train_log.json").read_text()
    capsys.readouterr()
    assert main(["train", *common, "--steps", "2", "--resume"]) == 2
    assert "already done 4 steps" in capsys.readouterr().err
    assert (tmp_path / "m" / "train_log.json").read_text() == log


def test_chat_accepts_openais_developer_role_and_a_null_assistant_content():
    """OpenAI clients send role "developer" (the newer "system") and content null on an assistant
    turn that only called tools: both were 400s."""
    from mamba_deploy.chat import check_messages, render_chat

    msgs = check_messages([{"role": "developer", "content": "be brief"},
                           {"role": "assistant", "content": None, "tool_calls": []},
                           {"role": "user", "content": "hi"}])
    assert [m["role"] for m in msgs] == ["system", "assistant", "user"] and msgs[1]["content"] == ""
    tmpl = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}"
    assert render_chat(tmpl, msgs) == "system:be brief;assistant:;user:hi;"


def test_chat_max_completion_tokens_null_is_the_default(tmp_path):
    """`"max_completion_tokens": null` was a 400 "must be in [1, LIMIT], got 16", a value never
    sent; null max_tokens and a missing field already meant the default capped at the limit."""
    import http.client
    import shutil
    import threading

    from mamba_deploy.runners import open_runner
    from mamba_deploy.serve import make_server

    shutil.copytree(DEMO2, tmp_path / "m")
    tcfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({**tcfg, "chat_template": template}))
    server = make_server(open_runner(tmp_path / "m", "torch"), "127.0.0.1", 0, quiet=True, max_tokens_limit=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for extra in ({}, {"max_completion_tokens": None}, {"max_tokens": None}):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": "def"}], "temperature": 0, **extra}),
                {"Content-Type": "application/json"})
            resp = conn.getresponse()
            reply = json.loads(resp.read())
            conn.close()
            assert resp.status == 200, reply
            assert reply["usage"]["completion_tokens"] <= 5
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def test_quantized_onnx_export_names_only_the_flag_at_fault(tmp_path):
    """`export onnx QUANTIZED OUT --dtype fp16` said "(got --dtype fp16, --opset 17); drop those
    flags", naming an --opset that was never given."""
    pytest.importorskip("onnx")
    from mamba_deploy import load_model
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.quant import quantize

    q = quantize(load_model(DEMO2), "int8", progress=False)
    with pytest.raises(ExportError, match=r"\(got --dtype fp16\); drop that flag") as e:
        export_onnx(q, tmp_path / "o", dtype="fp16")
    assert "--opset" not in str(e.value).split("(got")[1]
