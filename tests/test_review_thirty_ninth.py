"""Fixes from the thirty-ninth session's reviews: a tokenizer.json that carries truncation or
padding settings, fp16 autocast training without loss scaling, a diverged training run saving
over its last good state, and verify's exit status."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from mamba_deploy import train
from mamba_deploy.cli import main
from mamba_deploy.errors import TrainingDivergedError

ROOT = Path(__file__).resolve().parents[1]
DEMO1, DEMO2 = ROOT / "models" / "demo-mamba1", ROOT / "models" / "demo-mamba2"


def test_a_tokenizer_json_with_truncation_and_padding_encodes_whole_texts(tmp_path):
    """tokenizers obeys a "truncation" / "padding" block saved in tokenizer.json; transformers
    turns both off per call unless asked. eval scored 128 of 2627 tokens of such a folder."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from mamba_deploy.tokenizer import load_tokenizer

    folder = tmp_path / "m"
    shutil.copytree(DEMO1, folder)
    t = Tokenizer.from_file(str(folder / "tokenizer.json"))
    t.enable_truncation(16)
    t.enable_padding(length=64)
    t.save(str(folder / "tokenizer.json"))
    text = (ROOT / "src" / "mamba_deploy" / "errors.py").read_text()
    hf = AutoTokenizer.from_pretrained(str(folder))
    want = hf(text)["input_ids"]
    assert len(want) > 200
    ours = load_tokenizer(folder)
    assert ours.encode(text) == want
    assert ours.encode_batch([text, "x = 1"]) == [want, hf("x = 1")["input_ids"]]


def _grads_after_one_step(model, batch, amp_dtype, device):
    """The gradients train_step hands to the optimizer (unscaled, unclipped)."""
    seen = {}

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            seen.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    opt = Recorder(model.parameters(), lr=0.0)
    args = argparse.Namespace(lr=1e-3, warmup=1, clip=1e9, micro_batch=4)
    scaler = train.make_scaler(amp_dtype, device)
    train.train_step(model, opt, batch, device, amp_dtype, args, 0, 10, scaler)
    return {n: g.cpu() for n, g in seen.items()}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp16_autocast_training_scales_the_loss(device):
    """The loss is divided by the batch's 8192 targets, so a softmax gradient (~1 / (4096 * 8192))
    is below float16's smallest subnormal: without loss scaling the lm_head rows of tokens that
    are never a target got no gradient at all. Reference: the same step in float32."""
    from mamba_deploy.model import MambaLM
    from mamba_deploy.ops import use_backend

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    torch.manual_seed(0)
    model = MambaLM(train.build_config("tiny-mamba2", 4096, 0, 1)).to(device)
    train.init_weights(model, 0)
    batch = torch.randint(0, 2048, (8, 1025), generator=torch.Generator().manual_seed(1))  # half the vocab unseen
    dev = torch.device(device)
    with use_backend("ref"):  # as train's loop runs it: the reference ops have autograd
        ref = _grads_after_one_step(model, batch, None, dev)
        got = _grads_after_one_step(model, batch, torch.float16, dev)
    head = "lm_head.weight"
    zero_rows = lambda g: int((g.abs().sum(1) == 0).sum())  # noqa: E731
    assert zero_rows(ref[head]) == 0
    assert zero_rows(got[head]) == 0, f"{zero_rows(got[head])} rows without gradient"
    assert rel_err(got[head], ref[head]) < 0.05
    for n in ref:
        assert rel_err(got[n], ref[n]) < 0.1, n


def _train_args(tmp_path, **kw):
    base = dict(preset="tiny-mamba2", tokenizer=str(DEMO2), out=str(tmp_path / "out"),
                work_dir=str(tmp_path / "work"), data_cache=None, steps=8, max_minutes=None, batch=2, seq_len=16,
                lr=3e-3, warmup=1, weight_decay=0.1, clip=1.0, amp=None, device="cpu", eval_every=2, eval_batch=2,
                eval_tokens=0, save_every=2, seed=0, resume=False, micro_batch=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_a_diverged_run_stops_and_keeps_its_last_good_state(tmp_path, fake_data, monkeypatch):
    """A NaN from step 5 on (as a too-high --lr gives): the run stops at step 5 with the fix named,
    and the state saved at step 4 is kept, finite; before, the run went on and saved NaN weights
    over it, and every --resume then failed."""
    real = train.lm_logits
    calls = {"n": 0}

    def poisoned(model, ids):
        calls["n"] += torch.is_grad_enabled()  # training steps, not evaluations
        out = real(model, ids)
        return out * float("nan") if calls["n"] > 4 and torch.is_grad_enabled() else out

    monkeypatch.setattr(train, "lm_logits", poisoned)
    with pytest.raises(TrainingDivergedError) as e:
        train.train(_train_args(tmp_path))
    msg = str(e.value)
    assert "training diverged at step 5: the loss is nan" in msg and "last save (step 4" in msg and "--lr" in msg
    state = torch.load(tmp_path / "work" / "train_state.pt", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    monkeypatch.setattr(train, "lm_logits", real)
    assert train.train(_train_args(tmp_path, resume=True))["steps"] == 8  # the kept state resumes


def test_non_finite_weights_are_never_saved(tmp_path, fake_data, monkeypatch):
    real_step = train.train_step

    def step_then_break(model, *a, **k):
        out = real_step(model, *a, **k)
        if a[5] == 2:  # the third step: an update that leaves an infinite weight
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("inf")
        return out

    monkeypatch.setattr(train, "train_step", step_then_break)
    with pytest.raises(TrainingDivergedError, match=r"step 4: .* holds NaN or infinite values; the last save \(step 2"):
        train.train(_train_args(tmp_path))
    state = torch.load(tmp_path / "work" / "train_state.pt", weights_only=False)
    assert state["step"] == 2


def test_fp16_training_saves_and_resumes_its_loss_scale(tmp_path, fake_data):
    train.train(_train_args(tmp_path, amp="fp16", steps=2))
    state = torch.load(tmp_path / "work" / "train_state.pt", weights_only=False)
    assert state["grad_scaler"]["scale"] > 0
    assert train.train(_train_args(tmp_path, amp="fp16", steps=4, resume=True))["steps"] == 4


def test_verify_exits_1_beyond_tolerance_and_2_on_errors(tmp_path, capsys):
    """As diff and cmp do: a script can tell "the artifact differs" from "the check did not run"."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(DEMO2, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("layers.1.mixer.out_proj.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    args = ["--lengths", "7", "--batch", "1", "--decode-steps", "2", "--quiet"]
    assert main(["verify", str(DEMO2), str(bad), *args]) == 1
    assert "beyond tolerance" in capsys.readouterr().err
    assert main(["verify", str(DEMO2), str(tmp_path / "missing"), *args]) == 2
    assert main(["verify", str(DEMO2), str(DEMO2), *args]) == 0


@pytest.mark.parametrize("name", ["demo-mamba1", "demo-mamba2"])
def test_model_card_writes_what_the_shipped_cards_say(tmp_path, name):
    """model_card (moved out of train.py) rebuilds the shipped cards from their train_log.json:
    every line it writes is in the shipped README.md, in order (the shipped ones add hand notes)."""
    import json
    import re

    from mamba_deploy.model_card import write_model_card

    folder = ROOT / "models" / name
    (tmp_path / name).mkdir()
    # the Python that made the token streams comes from the data cache's metadata, not this one
    python = re.search(r"Token streams were made with Python (\S+)", (folder / "README.md").read_text()).group(1)
    metrics = json.loads((folder / "train_log.json").read_text())
    card = write_model_card(tmp_path / name, metrics, {"python": python}).read_text()
    shipped = iter((folder / "README.md").read_text().splitlines())
    for line in card.splitlines():
        assert any(line == s for s in shipped), line


def test_seeds_differing_above_32_bits_sample_differently():
    """torch's CPU generator keeps 32 bits of its seed: seeds 1, 2**32 + 1 and 2**62 + 1 gave one
    text in generate, the CLI and the server."""
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    r = open_runner(DEMO1, "torch")
    try:
        texts = {s: generate(r, ["def main("], max_new_tokens=24, temperature=1.0, seed=s).tokens[0]
                 for s in (1, 2**32 + 1, 2**62 + 1, 2**64 - 1)}
        again = generate(r, ["def main("], max_new_tokens=24, temperature=1.0, seed=2**62 + 1).tokens[0]
    finally:
        r.close()
    assert len({tuple(t) for t in texts.values()}) == 4
    assert again == texts[2**62 + 1]


def test_seeded_draws_follow_the_distribution_and_never_pick_a_zero():
    """The seeded sampler (one uniform per row from PCG64, then the inverse CDF) against the
    distribution it samples: 40000 draws per row, every frequency within 5 standard errors, and
    no token of probability 0 (filtered, or the padded vocabulary's tail) ever drawn, including
    at u just below 1 and at u = 0."""
    from mamba_deploy.generation import inverse_cdf, row_generators

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0, 0.0],
                          [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9]], dtype=torch.float32)
    n = 40000
    gens = row_generators(7, 2)
    counts = torch.zeros_like(probs, dtype=torch.float64)
    for _ in range(n):
        ids = inverse_cdf(probs, [g.random() for g in gens])
        counts[0, ids[0]] += 1
        counts[1, ids[1]] += 1
    p = probs.double()
    se = torch.sqrt(p * (1 - p) / n)
    assert torch.all((counts / n - p).abs() <= 5 * se + 1e-12), counts / n
    assert torch.all(counts[p == 0] == 0)
    for u in (0.0, 1 - 2**-53, 0.5):
        ids = inverse_cdf(probs, [u, u])
        assert probs[0, ids[0]] > 0 and probs[1, ids[1]] > 0, (u, ids)


def test_byte_fallback_decode_through_a_transformers_sentencepiece_tokenizer(tmp_path):
    """A folder with tokenizer.model and tokenizer_config.json (LlamaTokenizer) but no
    tokenizer.json loads through transformers; decode's byte-fallback repair called methods only
    a `tokenizers` Tokenizer has, so any text with an unfinished character (every streamed
    multi-byte character) was an AttributeError. Reference: sentencepiece's own decode."""
    import io
    import json
    import random

    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    words = ["hello", "world", "mamba", "state", "café", "日本"]
    rng = random.Random(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)),
        model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
    cfg = transformers.Mamba2Config(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_heads=4, head_dim=32,
                                    state_size=16, n_groups=1, expand=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.Mamba2ForCausalLM(cfg).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    r = open_runner(tmp_path)
    try:
        for n_bytes in (4, 5, 6):  # inside 本, then whole, then past it
            cut = sp.encode("hello") + [sp.piece_to_id(f"<0x{b:02X}>") for b in "日本".encode()][:n_bytes]
            assert r.tokenizer.decode(cut) == sp.decode(cut)
        out = generate(r, "hello", max_new_tokens=20)
        known = [i for i in out.prompt_tokens[0] + out.tokens[0] if i < sp.vocab_size()]  # ids past it decode to ""
        whole, prompt = sp.decode(known), sp.decode(out.prompt_tokens[0])
        assert whole.startswith(prompt) and out.texts[0] == whole[len(prompt):]
    finally:
        r.close()


def test_an_export_folder_named_like_a_graph_file_opens(onnx_export, tmp_path):
    """export onnx MODEL x.onnx writes the folder x.onnx/; every reader took any path ending in
    .onnx for the graph file and looked in its parent. Reference: transformers' logits."""
    pytest.importorskip("onnxruntime")
    from mamba_deploy.runners import open_runner

    src, _, hf = onnx_export("mamba2")
    folder = tmp_path / "m2.onnx"
    shutil.copytree(src, folder)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    with torch.no_grad():
        want = hf(ids).logits
    for path in (folder, folder / "model.onnx"):
        r = open_runner(path)
        try:
            assert r.name == "onnx"
            logits, _ = r.prefill(ids, r.new_state(1))
            assert rel_err(logits, want) < 1e-4
        finally:
            r.close()


def test_a_killed_verify_leaves_no_reference_folder_behind(tmp_path, monkeypatch):
    """verify keeps a large model's reference answers in a folder of TMPDIR; a run killed outright
    (SIGKILL: the OOM killer) left it there for good. The next run removes a dead writer's."""
    import subprocess
    import sys
    import tempfile

    from mamba_deploy.atomic import _host
    from mamba_deploy.verify_replay import SPILL_BYTES, SPILL_NAME, _Spill

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f".{SPILL_NAME}.p{dead.pid}h{_host()}-abc123"
    stale.mkdir()
    (stale / "0.pt").write_bytes(b"x" * 100)
    live = tmp_path / f".{SPILL_NAME}.p{__import__('os').getpid()}h{_host()}-def456"  # a running verify's
    live.mkdir()
    spill = _Spill()
    with pytest.warns(UserWarning, match="removed .*killed before it finished"):
        kept = spill.keep(torch.zeros(SPILL_BYTES // 4 + 1))
    assert not stale.exists() and live.exists()
    assert Path(spill.folder).parent == tmp_path and Path(kept.path).exists()


def test_environment_switches_read_0_as_off_and_expand_the_home_folder(tmp_path, monkeypatch):
    from mamba_deploy.ops import cpu_kernels

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MAMBA_DEPLOY_CACHE", "~/mdcache")  # as a Dockerfile ENV passes it: no shell expanded it
    assert cpu_kernels._cache_dir() == tmp_path / "mdcache"
    monkeypatch.delenv("MAMBA_DEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert cpu_kernels._cache_dir() == tmp_path / "xdg" / "mamba_deploy"
    monkeypatch.delenv("MAMBA_DEPLOY_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME")
    on = cpu_kernels._lib() is not None  # this machine's answer, with the switch unset
    try:
        for value, want in (("0", on), ("1", False), ("", on)):
            monkeypatch.setenv("MAMBA_DEPLOY_NO_CPU_KERNELS", value)
            cpu_kernels._lib.cache_clear()
            assert (cpu_kernels._lib() is not None) == want, value
    finally:
        monkeypatch.delenv("MAMBA_DEPLOY_NO_CPU_KERNELS")
        cpu_kernels._lib.cache_clear()


def test_yes_no_options_refuse_strings(onnx_export):
    """Used as truth values, "false" or "no" switched the option on (tensor parallelism asked for
    torchrun's variables; check_hash hashed every file)."""
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.runners import open_runner

    with pytest.raises(ConfigError, match="tensor_parallel must be True or False, got 'false'"):
        open_runner(DEMO2, "torch", tensor_parallel="false")
    pytest.importorskip("onnxruntime")
    with pytest.raises(ConfigError, match="check_hash must be True or False, got 'no'"):
        open_runner(onnx_export("mamba2")[0], "onnx", check_hash="no")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_closed_torch_runner_lets_its_model_go(device):
    """The other backends free their handles on close; the torch runner kept its weights, so
    `for p in paths: with open_runner(p) as r:` held two models until r was rebound. On CUDA the
    graph runner, after a captured step (its decode plan held the model too)."""
    import gc
    import weakref

    from mamba_deploy.runners import open_runner

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    r = open_runner(DEMO2, "torch", device=device)
    st = r.new_state(1)
    r.prefill(torch.tensor([[1, 2, 3]]), st)
    r.step(torch.tensor([4]), st)
    del st
    model = weakref.ref(r.model)
    tok = r.tokenizer
    r.close()
    r.close()  # twice is fine
    gc.collect()
    assert model() is None
    assert r.tokenizer is tok and r.tokenizer.decode(tok.encode("def main():")) == "def main():"


@pytest.mark.parametrize("stream", [False, True])
def test_a_text_that_tokenizes_to_nothing_is_a_400_streamed_or_not(request, monkeypatch, stream):
    """A text prompt some tokenizers encode to no tokens (a SentencePiece model that drops extra
    spaces, given only spaces): a streamed request got its 200 headers and then an error event."""
    import json

    from conftest import post_json, start_server
    from mamba_deploy import tokenizer
    from mamba_deploy.runners import open_runner

    real = tokenizer.encode_prefix
    monkeypatch.setattr(tokenizer, "encode_prefix", lambda tok, text, *a, **k: [] if not text.strip()
                        else real(tok, text, *a, **k))
    r = open_runner(DEMO2, "torch")
    request.addfinalizer(r.close)
    server = start_server(r, request)
    status, _, body = post_json(server, {"prompt": "   ", "max_tokens": 4, "stream": stream})
    assert status == 400, body
    err = json.loads(body)["error"]
    assert "tokenizes to no tokens" in err["message"] and err["param"] == "prompt"
    status, _, body = post_json(server, {"prompt": ["def main(", "  "], "max_tokens": 2, "stream": stream})
    assert status == 400 and "prompt 1 tokenizes to no tokens" in json.loads(body)["error"]["message"]


def test_fp16_gradients_that_are_never_finite_stop_the_run():
    """With loss scaling a NaN gradient only skips the step and halves the scale: a gradient that
    is NaN at every scale skipped every step of the run, which learned nothing and never said so."""
    from mamba_deploy.model import MambaLM

    torch.manual_seed(0)
    model = MambaLM(train.build_config("tiny-mamba2", 256, 0, 1))
    train.init_weights(model, 0)
    next(model.parameters()).register_hook(lambda g: g * float("nan"))
    opt = train.make_optimizer(model, 1e-3, 0.0)
    scaler = train.make_scaler(torch.float16, torch.device("cpu"))
    args = argparse.Namespace(lr=1e-3, warmup=1, clip=1.0, micro_batch=None)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TrainingDivergedError, match="the gradients overflow at every loss scale") as e:
        for step in range(100):
            train.train_step(model, opt, batch, torch.device("cpu"), torch.float16, args, step, 100, scaler)
    assert 30 <= step <= 40, step
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no step was taken
    assert "training diverged" not in str(e.value)  # the loop adds the step and the last save


def test_seeded_sampling_refuses_nan_logits_as_unseeded_sampling_does():
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.generation import SamplingConfig, inverse_cdf, row_generators, sample

    logits = torch.tensor([[0.0, 1.0, float("nan"), 0.5, 0.0, 0.0, -float("inf"), -float("inf")]])
    # one typed error for both (the forty-third session's; before: torch.multinomial's RuntimeError
    # unseeded, a FloatingPointError seeded)
    with pytest.raises(ShapeError, match="row 0's logits are not finite"):
        sample(logits, SamplingConfig(temperature=1.0))
    with pytest.raises(ShapeError, match="row 0's logits are not finite"):
        sample(logits, SamplingConfig(temperature=1.0), generator=row_generators(1, 1))
    with pytest.raises(ShapeError, match="row 1's"):
        inverse_cdf(torch.tensor([[0.5, 0.5], [0.0, 0.0]]), [0.3, 0.3])


def test_set_tokenizer_after_close_keeps_working():
    from mamba_deploy.runners import open_runner
    from mamba_deploy.tokenizer import load_tokenizer

    r = open_runner(DEMO2, "torch")
    r.close()
    r.set_tokenizer(load_tokenizer(DEMO1))
    assert r.tokenizer.encode("def") == load_tokenizer(DEMO1).encode("def")


def test_four_bit_flags_with_another_method_are_refused_before_the_load(tmp_path, capsys, monkeypatch):
    """--group-size / --asymmetric with int8, fp8 or smoothquant loaded the whole model before the
    refusal (--act-order, --alpha, --fp8-scaling were refused first already)."""
    from mamba_deploy import checkpoint

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(checkpoint, "load_model", no_load)
    for method, flag in [("int8", ["--group-size", "64"]), ("fp8", ["--asymmetric"]),
                         ("smoothquant", ["--group-size", "32"])]:
        assert main(["quantize", str(DEMO1), str(tmp_path / method), "--method", method, *flag]) == 2
        err = capsys.readouterr().err
        assert f"{flag[0]} does not apply to --method {method}; it applies to int4, gptq, awq: drop {flag[0]}" in err, err
        assert not (tmp_path / method).exists()


def test_tied_head_and_embeddings_with_different_rules_are_refused_before_calibration(tmp_path, capsys, monkeypatch):
    import json

    from mamba_deploy.quant import quantizer

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran before the plan was checked")

    monkeypatch.setattr(quantizer, "calibration_ids", no_calibration)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"quant_cfg": {"lm_head": {"format": "int8"}}}))
    assert main(["quantize", str(DEMO1), str(tmp_path / "q"), "--method", "gptq", "--include", "lm_head",
                 "--config", str(rules)]) == 2
    err = capsys.readouterr().err
    assert "lm_head and backbone.embeddings share one tensor (tied)" in err and "give both the same rule" in err


def test_onnx_export_of_a_quantized_checkpoint_records_what_verify_needs(tmp_path):
    """(1) A tied model with a quantized lm_head: the export's codes digest counted the shared codes
    twice, never matched its checkpoint's, and verify CHECKPOINT EXPORT fell back to int4's loose
    row (an export with one layer's scales x1.5 passed). (2) A checkpoint quantized from a Q4_0
    GGUF: its export dropped the GGUF's type, and verify held a good export to int8's limits."""
    import json

    pytest.importorskip("onnxruntime")
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.quant.formats import folder_codes_digest
    from mamba_deploy.verify import infer_artifact_dtype

    assert main(["quantize", str(DEMO1), str(tmp_path / "q"), "--method", "int4", "--include", "lm_head"]) == 0
    assert main(["export", "onnx", str(tmp_path / "q"), str(tmp_path / "q-onnx"), "--no-validate"]) == 0
    manifest = json.loads((tmp_path / "q-onnx" / "manifest.json").read_text())
    assert manifest["quantization"]["codes_sha256"] == folder_codes_digest(tmp_path / "q")
    assert infer_artifact_dtype(tmp_path / "q-onnx", tmp_path / "q") == "int8"  # the export's compute row

    q4 = export_gguf(DEMO2, tmp_path / "m.q4_0.gguf", outtype="q4_0")
    assert main(["quantize", str(q4), str(tmp_path / "g"), "--method", "int8"]) == 0
    assert main(["export", "onnx", str(tmp_path / "g"), str(tmp_path / "g-onnx"), "--no-validate"]) == 0
    assert json.loads((tmp_path / "g-onnx" / "manifest.json").read_text())["source_weights"] == "q4_0"
    assert infer_artifact_dtype(tmp_path / "g-onnx", DEMO2) == infer_artifact_dtype(tmp_path / "g", DEMO2) == "q4_0"


def test_verify_and_bench_inputs_differ_for_seeds_above_32_bits():
    """torch's CPU generator keeps a seed's low 32 bits: verify --seed 1 and --seed 2**32 + 1 drew
    the same token ids. Seeds below 2**32 draw what they drew before."""
    from mamba_deploy.argtypes import torch_generator

    draw = lambda s: torch.randint(0, 1000, (64,), generator=torch_generator(s))  # noqa: E731
    assert torch.equal(draw(1), torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(draw(1), draw(2**32 + 1))
    assert not torch.equal(draw(2**62 + 1), draw(2**63 + 1))
    assert torch.equal(draw(2**64 - 1), draw(2**64 - 1))


def test_tensorrt_checks_that_need_no_tensorrt(tmp_path, onnx_export, monkeypatch):
    """What a static review of the TensorRT path found and can be checked without TensorRT (it
    is not installable here; the engine tests skip): the device is resolved to cuda:N or refused
    with a typed error, and verify's preflight refuses an engine of another size than its sidecar
    says, or one built by another TensorRT, before minutes of reference pass."""
    import json
    from importlib import metadata

    from mamba_deploy.errors import ConfigError, ExportError
    from mamba_deploy.export.tensorrt import SIDECAR_FORMAT, sidecar_path
    from mamba_deploy.runners import preflight
    from mamba_deploy.runners.tensorrt_runner import cuda_device

    for bad in ("cpu", "CPU", "npu:0", True):
        with pytest.raises(ConfigError, match="runs on a CUDA GPU"):
            cuda_device(bad)
    if torch.cuda.is_available():
        assert cuda_device("cuda") == torch.device("cuda", torch.cuda.current_device())
        with pytest.raises(ConfigError, match="CUDA device\\(s\\) are visible"):
            cuda_device(f"cuda:{torch.cuda.device_count()}")

    onnx_dir = onnx_export("mamba2")[0]
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 100)

    def sidecar(**build):
        sidecar_path(engine).write_text(json.dumps({"format": SIDECAR_FORMAT, "onnx_dir": str(onnx_dir),
                                                   "manifest": manifest, "defaults": {}, "build": build}))

    sidecar(engine_bytes=120, tensorrt="10.0.1")
    with pytest.raises(ExportError, match="has 100 bytes but its sidecar"):
        preflight._tensorrt_config(engine)
    sidecar(engine_bytes=100, tensorrt="10.0.1")
    monkeypatch.setattr(metadata, "version", lambda name: "10.9.0" if name == "tensorrt" else "0")
    with pytest.raises(ExportError, match=r"built by TensorRT 10.0.1, and this is TensorRT 10.9.0"):
        preflight._tensorrt_config(engine)
    monkeypatch.setattr(metadata, "version", lambda name: "10.0.1")
    assert preflight._tensorrt_config(engine).d_model == manifest["config"]["d_model"]


def test_convert_keeps_the_copied_generation_config_stop_tokens(hf_checkpoint, tmp_path):
    """A chat fine-tune's generation_config.json names its end-of-turn token where config.json
    keeps the base EOS; convert wrote config.json's over it (a single id lost, a list grown).
    Reference: transformers' GenerationConfig of the source folder."""
    import json

    from transformers import GenerationConfig

    src = tmp_path / "src"
    shutil.copytree(hf_checkpoint("mamba")[0], src)
    for i, eos in enumerate((5, [4, 5])):
        (src / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": 0}))
        want = GenerationConfig.from_pretrained(src).eos_token_id
        ssm, back = tmp_path / f"ssm{i}", tmp_path / f"back{i}"
        assert main(["convert", str(src), str(ssm), "--format", "mamba_ssm"]) == 0
        assert main(["convert", str(ssm), str(back)]) == 0
        for folder in (ssm, back):
            assert GenerationConfig.from_pretrained(folder).eos_token_id == want, (folder, eos)


def test_config_json_with_non_ascii_text_loads_in_a_c_locale(tmp_path):
    """read_raw_config and read_json_object read in the locale's encoding: under LC_ALL=C a config
    naming "модель-mamba" was a UnicodeDecodeError traceback in every verb (transformers loads it)."""
    import json
    import os
    import subprocess
    import sys

    folder = tmp_path / "uni"
    shutil.copytree(DEMO2, folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg["_name_or_path"] = "модель-mamba"
    (folder / "config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(ROOT / "src")}
    code = ("from mamba_deploy import load_model; from mamba_deploy.checkpoint import stored_dtype; "
            f"m = load_model({str(folder)!r}); print(m.config.d_model, stored_dtype({str(folder)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == [str(cfg["hidden_size"]), "torch.float16"]


def test_a_quoted_home_path_reads_the_stored_dtype(tmp_path, monkeypatch):
    from mamba_deploy.checkpoint import stored_dtype

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(DEMO2, tmp_path / "m")
    assert stored_dtype("~/m") == stored_dtype(tmp_path / "m") == torch.float16


def test_an_untied_config_over_tied_weights_names_the_fix(hf_checkpoint, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from mamba_deploy import load_model
    from mamba_deploy.errors import CheckpointError

    folder = tmp_path / "m"
    shutil.copytree(hf_checkpoint("mamba2")[0], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("lm_head.weight", None)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="set tie_word_embeddings to true"):
        load_model(folder)


def test_bench_reports_what_each_target_used(hf_checkpoint, onnx_export, tmp_path):
    """A review of bench's numbers: the CUDA peak was the process's, whatever the backend (an ONNX
    row after a torch-on-CUDA row showed the torch model's memory); the RSS peak holds what earlier
    targets left, now recorded beside the RSS before each target opened; system.torch_threads was
    read before --threads took effect. On a CPU machine every CUDA peak is null; on a GPU the
    CUDA-graph target has one and the ONNX Runtime (CPU) target after it has none."""
    import json

    m1 = hf_checkpoint("mamba")[0]
    onnx_dir = onnx_export("mamba")[0]
    out = tmp_path / "bench"
    device = ["--device", "cuda"] if torch.cuda.is_available() else []
    assert main(["bench", str(m1), str(onnx_dir), "--backends", "torch,onnx", "--batch", "1", "--prompt-len", "3",
                 "--gen-len", "2", "--repeats", "1", "--threads", "1", "--quiet", "--out", str(out), *device]) == 0
    data = json.loads((out / "results.json").read_text())
    assert "torch_threads" not in data["system"] and data["targets"][0]["torch_threads"] == 1
    torch_row, onnx_row = data["results"]
    for r in (torch_row, onnx_row):  # the peak is the measuring runs'; the open's own peak may be past
        assert r["rss_at_open_bytes"] > 0 and r["peak_rss_bytes"] > 0
    assert onnx_row["peak_cuda_bytes"] is None
    assert (torch_row["peak_cuda_bytes"] is not None) == torch.cuda.is_available()
    assert "(+" in (out / "results.md").read_text()


def test_sizes_are_binary_units_named_as_such_and_weights_only(onnx_export, capsys):
    from mamba_deploy.demo import _size

    onnx_dir = onnx_export("mamba")[0]
    weights = sum(p.stat().st_size for p in onnx_dir.iterdir() if p.name.startswith("model.onnx"))
    assert _size(onnx_dir) == weights  # the reference row counts only its weight files too
    assert main(["inspect", str(DEMO1)]) == 0
    out = capsys.readouterr().out
    assert "MiB)" in out and " MB)" not in out


def test_encoding_a_long_text_lets_other_threads_run():
    """tokenizers' encode holds the GIL for the whole call: a server handler tokenizing an 8 MB
    prompt stopped every running stream and GET /health for 5 s. Long texts go through
    encode_batch, which lets go of it; the ids are the same."""
    import threading
    import time

    from mamba_deploy.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO2)
    text = (ROOT / "src" / "mamba_deploy" / "serve.py").read_text() * 20
    ticks, stop = [0], [False]

    def sleeper():
        while not stop[0]:
            time.sleep(0.001)
            ticks[0] += 1

    th = threading.Thread(target=sleeper)
    th.start()
    try:
        t = time.monotonic()
        ids = tok.encode(text)
        took = time.monotonic() - t
    finally:
        stop[0] = True
        th.join()
    assert ids == tok._tok.encode(text).ids
    assert ticks[0] >= min(10, took * 100), (ticks[0], took)  # held throughout, it ticked 0-3 times


def test_a_request_that_would_pass_llamacpp_n_ctx_is_refused_alone(tmp_path, request):
    """Its prompt fitted, its max_tokens carried it past n_ctx while decoding: the batched step
    raised, and every request decoding beside it got a 400 halfway through its stream. Now it is
    refused when it arrives; the other request gets what it gets alone (reference: generate)."""
    import json

    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python")
    from conftest import post_json, start_server
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    g = export_gguf(DEMO2, tmp_path / "m.gguf")
    r = open_runner(g, "llama.cpp", n_ctx=64)
    request.addfinalizer(r.close)
    alone = generate(r, [[5, 6, 7]], max_new_tokens=20).tokens[0]
    server = start_server(r, request, max_num_seqs=4)
    status, _, body = post_json(server, {"prompt": list(range(3, 63)), "max_tokens": 30, "temperature": 0})
    assert status == 400 and "would pass the llama.cpp context size n_ctx=64" in json.loads(body)["error"]["message"]
    status, _, body = post_json(server, {"prompt": [5, 6, 7], "max_tokens": 20, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["token_ids"] == alone
