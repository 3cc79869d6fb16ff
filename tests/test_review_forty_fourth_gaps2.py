"""Gaps a mutation-testing review found (forty-fourth review, second part): plausible bugs no test
caught, one test each.

Each test compares against a reference independent of the code under test: transformers' own
forward and greedy generate, gguf-py's GGUFReader, the `tokenizers` library's own encoding of the
whole text, float64 quantization math written here, or a contract the docs state (README's seeded
sampling, gguf_vocab's EOS guess order, the Runner's padded-vocabulary and fresh-state rules).
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import warnings

import pytest
import torch

from conftest import build_hf_model, rel_err
from test_batching import _hf_greedy  # transformers' greedy generate, no EOS, a mask of ones

FP32_TOL = 1e-4


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.as_tensor(ids), use_cache=False).logits.float()



# ----------------------------------------------------------------------------- R5: llama.cpp load_torch_state

def test_llamacpp_load_torch_state_keeps_the_rows_position_and_continues_to_n_ctx(ckpt, tiny_gguf):
    """Guards LlamaCppRunner.load_torch_state writing the loaded cell at `pos - 1` (the position of
    the row's last token): written at `pos`, the row's next token went one position later, so a
    sequence that filled n_ctx after a state round trip was refused one token early. Reference:
    transformers' forward over the whole 8-token sequence (n_ctx = 8, so all 8 positions are
    needed); the position is checked as the count of tokens the row holds (4)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    from mamba_deploy.runners import open_runner

    hf = ckpt("mamba")[1]
    ids = torch.tensor([[5, 17, 3, 9, 22, 41, 7, 13]])
    want = _hf_logits(hf, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = open_runner(tiny_gguf, "llama.cpp", threads=1, n_ctx=8)
    try:
        st = r.new_state(1)
        first, st = r.prefill(ids[:, :4], st)
        r.load_torch_state(st, r.to_torch_state(st))
        assert st.pos == [4], f"after a state round trip the row's next position is {st.pos}, it holds 4 tokens"
        second, st = r.prefill(ids[:, 4:], st)  # positions 4..7: the last one n_ctx allows
    finally:
        r.close()
    assert rel_err(first, want[:, :4]) <= FP32_TOL
    assert rel_err(second, want[:, 4:]) <= FP32_TOL


# ----------------------------------------------------------------------------- V2: the EOS guess order

def test_gguf_eos_guess_takes_endoftext_before_s(hf_checkpoint, tmp_path):
    """Guards gguf_vocab._special_ids' guess of the EOS when neither tokenizer_config.json nor
    config.json (nor generation_config.json) names one: EOS_GUESSES = ("<|endoftext|>", "</s>",
    "<eos>") lists the names in priority order, so a vocabulary holding both <|endoftext|> and
    </s> must get <|endoftext|> (the order reversed gave </s>). Reference: that documented
    order, and the exported file read back with gguf-py's own GGUFReader (the concrete id of
    <|endoftext|> in tokenizer.json)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import BPE_TEXTS
    from mamba_deploy.export.gguf import export_gguf

    src, _ = hf_checkpoint("mamba")
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no id from config.json either
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").unlink()  # (which load_model also reads the token ids from)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # </s> first: its id (0) is below <|endoftext|>'s, so neither id order nor "the first id" picks the right one
    tok.train_from_iterator(BPE_TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=["</s>", "<|endoftext|>"],
                                                           show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({}))
    want = tok.token_to_id("<|endoftext|>")
    assert want is not None and tok.token_to_id("</s>") is not None and want != tok.token_to_id("</s>")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(folder, tmp_path / "m.gguf")
    got = gguf.GGUFReader(str(out)).fields["tokenizer.ggml.eos_token_id"].contents()
    assert got == want, f"EOS is id {got}, not <|endoftext|>'s {want} (</s> is {tok.token_to_id('</s>')})"


# ----------------------------------------------------------------------------- P3: rules build on earlier rules

def test_a_later_rule_keeps_the_keys_an_earlier_rule_set(hf_checkpoint):
    """Guards quant.plan.build_plan building each rule on the spec earlier rules left (later
    entries override the keys they set, not the whole spec): a rule that restarted from the
    method's default forgot the earlier rule's int4 / group 32, so {"symmetric": false} after
    {"format": "int4", "group_size": 32} gave per-row int8 (or was refused). Reference: the
    asymmetric group-32 int4 round trip written here in float64 (scale = (max(w, 0) - min(w, 0)) /
    15 rounded to the stored float16, zero = round(-min / scale) clamped to [0, 15], codes =
    clamp(round(w / scale) + zero, 0, 15), w' = (codes - zero) * scale)."""
    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize

    folder, _ = hf_checkpoint("mamba")
    model = load_model(folder)
    w = model.backbone.layers[0].mixer.in_proj.weight.detach().clone()
    rules = {"quant_cfg": {"*.in_proj": {"format": "int4", "group_size": 32},
                           "backbone.layers.0.mixer.in_proj": {"symmetric": False}}}
    q = quantize(model, "int8", rules=rules, progress=False)
    mods = q.quantization_config["modules"]
    spec = mods["backbone.layers.0.mixer.in_proj"]
    assert (spec["format"], spec["group_size"], spec["symmetric"]) == ("int4", 32, False), spec
    assert (mods["backbone.layers.1.mixer.in_proj"]["format"], mods["backbone.layers.1.mixer.in_proj"]["symmetric"]) \
        == ("int4", True)
    assert mods["backbone.layers.0.mixer.out_proj"]["format"] == "int8"

    w64 = w.double().reshape(w.shape[0], -1, 32)
    lo, hi = w64.amin(-1).clamp_max(0), w64.amax(-1).clamp_min(0)
    scale = ((hi - lo) / 15).clamp_min(2.0**-24).to(torch.float16).double()
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = (torch.round(w64 / scale[..., None]) + zero[..., None]).clamp(0, 15)
    want = ((codes - zero[..., None]) * scale[..., None]).reshape(w.shape)
    got = q.backbone.layers[0].mixer.in_proj.weight.double()
    assert (codes != torch.round(w64 / scale[..., None]).clamp(-7, 7)).any()  # asymmetric really differs here
    assert float((got - want).abs().max()) <= 1e-6


# ----------------------------------------------------------------------------- Q1: GPTQ keeps biases

def test_gptq_keeps_the_in_and_out_proj_biases(tmp_path):
    """Guards quantizer._quant_linear's GPTQ branch copying the source Linear's bias into the
    QuantLinear it builds (the other methods go through from_linear): dropped, every biased
    in_proj / out_proj of a use_bias=True model lost its bias. Reference: the transformers
    checkpoint's biases (equal exactly), and transformers' Mamba2 in float64 with the decoded
    int4 weights put in and the original biases kept (logits within 1e-5 relative)."""
    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize
    from mamba_deploy.quant.modules import QuantLinear

    hf = build_hf_model("mamba2", use_bias=True)
    hf.save_pretrained(tmp_path / "hf")
    q = quantize(load_model(tmp_path / "hf"), "gptq", group_size=32, calib_ids=torch.arange(512) * 7919 % 128,
                 n_calib=2, calib_len=64, progress=False)
    ref = build_hf_model("mamba2", use_bias=True).double()
    n = 0
    for i, layer in enumerate(q.backbone.layers):
        for name in ("in_proj", "out_proj"):
            mod, src = getattr(layer.mixer, name), getattr(hf.backbone.layers[i].mixer, name)
            assert isinstance(mod, QuantLinear) and mod.fmt == "int4"
            assert q.quantization_config["modules"][f"backbone.layers.{i}.mixer.{name}"]["algo"] == "gptq"
            assert src.bias is not None and bool(src.bias.abs().gt(0).any())
            assert mod.bias is not None and torch.equal(mod.bias.detach(), src.bias.detach()), \
                f"layer {i} {name}: the bias was not kept"
            with torch.no_grad():
                getattr(ref.backbone.layers[i].mixer, name).weight.copy_(mod.weight.double())
            n += 1
    assert n == 2 * len(q.backbone.layers)
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = q(ids).logits
        want = ref(ids, use_cache=False).logits
    assert rel_err(got, want) <= 1e-5


# ----------------------------------------------------------------------------- Gen1 / Gen4: seeds and steps

@pytest.fixture(scope="module")
def torch_runner(hf_checkpoint):
    from mamba_deploy.runners import open_runner

    return open_runner(hf_checkpoint("mamba")[0], "torch")


def test_a_seeded_prompt_samples_the_same_alone_or_twice_in_a_batch(torch_runner):
    """Guards generation.row_generators seeding every row with the request's seed: seeded with
    seed + row, a prompt listed twice sampled two texts and differed from itself alone.
    Reference: README's contract ("each prompt samples from a generator of its own seeded with
    it, so a prompt gives the same text alone or listed beside other prompts, and identical
    prompts with one seed give identical texts")."""
    from mamba_deploy.generation import generate

    p, q = [5, 17, 3, 9, 22], [70, 6, 12, 44, 2]  # equal lengths: no padding in the batch
    kw = dict(max_new_tokens=16, temperature=1.0, seed=5, stop_token_ids=[])
    batch = generate(torch_runner, [p, q, p], **kw).tokens
    alone = generate(torch_runner, [p], **kw).tokens[0]
    assert batch[0] == batch[2], "one prompt listed twice with one seed sampled two texts"
    assert batch[0] == alone
    assert batch[1] != batch[0]  # the draws are not degenerate (a different prompt differs)


def test_generate_steps_once_per_token_after_the_first(torch_runner):
    """Guards the end of generate's loop: after the last token is sampled there is nothing to step
    for, so N new tokens take the prefill and N - 1 steps (a missing break ran one more step,
    a full decode step of wasted work per request). Reference: that count, from the loop's
    definition (each step produces the logits of one next token)."""
    from mamba_deploy.generation import generate

    calls = []

    class Counting:
        vocab_size = torch_runner.vocab_size

        def new_state(self, b):
            return torch_runner.new_state(b)

        def prefill(self, ids, state, **kw):
            calls.append("prefill")
            return torch_runner.prefill(ids, state, **kw)

        def step(self, ids, state):
            calls.append("step")
            return torch_runner.step(ids, state)

    for n in (1, 2, 7):
        calls.clear()
        res = generate(Counting(), [[5, 17, 3], [9, 22, 41]], max_new_tokens=n, stop_token_ids=[])
        assert [len(t) for t in res.tokens] == [n, n]
        assert calls == ["prefill"] + ["step"] * (n - 1), f"max_new_tokens={n}: {calls}"


# ----------------------------------------------------------------------------- Gen3: the padded vocabulary

def test_logit_columns_past_the_vocabulary_are_never_chosen():
    """Guards generation._mask_padded_vocab masking every column from vocab_size on (the embedding
    rows added only to pad the vocabulary): masked from vocab_size + 1, the first padded column
    stayed selectable. Reference: the Runner contract that ids are < vocab_size; the padded
    column vocab_size holds a logit far above every real one, so greedy and sampling would take
    it if it were not masked."""
    from mamba_deploy.generation import generate

    vocab, padded = 10, 16

    class Padded:
        vocab_size = vocab

        def new_state(self, b):
            return torch.zeros(b)

        def _logits(self, b):
            g = torch.Generator().manual_seed(0)
            out = torch.randn(b, padded, generator=g)
            out[:, vocab] = 1e4
            out[:, vocab + 1:] = 1e3
            return out

        def prefill(self, ids, state, attention_mask=None, last_only=False):
            return self._logits(ids.shape[0])[:, None], state

        def step(self, ids, state):
            return self._logits(ids.shape[0]), state

    for kw in (dict(), dict(temperature=1.0, seed=3), dict(temperature=1.0, top_k=3, seed=4)):
        res = generate(Padded(), [[1, 2], [3]], max_new_tokens=6, stop_token_ids=[], **kw)
        ids = [t for row in res.tokens for t in row]
        assert len(ids) == 12 and max(ids) < vocab, (kw, res.tokens)


# ----------------------------------------------------------------------------- B1: rows of a join

def test_a_request_joining_beside_one_of_no_tokens_gets_its_own_rows(hf_checkpoint, scheduler_for):
    """Guards batching.Scheduler._join counting the rows of every request of the prefill group,
    including one that finishes at once (max_new_tokens 0): counted only for joining requests,
    the next request's row offset pointed at the finished request's row, so it decoded from
    another prompt's logits and state. Reference: transformers' greedy generate of B's prompt
    alone."""
    from mamba_deploy import load_model
    from mamba_deploy.runners.torch_runner import TorchRunner

    folder, hf = hf_checkpoint("mamba")
    prefills = []

    class Recording(TorchRunner):
        def prefill(self, ids, state, **kw):
            prefills.append(tuple(ids.shape))
            return super().prefill(ids, state, **kw)

    sched = scheduler_for(Recording(load_model(folder)), max_rows=4, thread=False)
    a, b = [11, 4, 90, 33, 1, 25], [70, 6, 12, 44, 2, 9]
    job_a = sched.submit([a], max_new_tokens=0, stop_token_ids=[])
    job_b = sched.submit([b], max_new_tokens=8, stop_token_ids=[])
    threading.Thread(target=sched.run, daemon=True).start()  # both queued first: admitted in one group
    assert job_a.follow().tokens == [[]]
    got = job_b.follow().tokens[0]
    assert prefills[0] == (2, 6), f"the two requests were not prefilled together: {prefills}"
    assert got == _hf_greedy(hf, b, 8)


# ----------------------------------------------------------------------------- T1: encode_prefix's margin

def test_encode_prefix_equals_the_whole_texts_first_tokens_when_a_prefix_cuts_a_word():
    """Guards tokenizer.encode_prefix's PREFIX_MARGIN: a prefix of the text is only trusted once it
    holds the limit plus a margin of tokens, since the word it cuts tokenizes differently (a
    9-letter word that is one token becomes several). Without the margin, a limit whose last
    token falls in the cut word returned those pieces. The limits tried are around where
    the first prefixes encode_prefix tries (4096 characters, 8 characters per token) end inside a
    word: 10 characters per token here, so 8 * (m + 512) characters hold ~m tokens near
    m = 2048, and 4096 characters near m = 410. Reference: the `tokenizers` library's own
    encoding of the whole text, cut to m."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from mamba_deploy import tokenizer as tokmod

    rng = random.Random(8)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(9)) for _ in range(20)]
    text = " ".join(rng.choice(words) for _ in range(20000))
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert all(len(raw.encode(" " + w).ids) == 1 for w in words)  # a space + 9-letter word is one token
    assert len(raw.encode(" " + words[0][:5]).ids) > 1  # and a cut one is not that token
    full = raw.encode(text).ids
    assert len(full) == 20000
    tok = tokmod.Tokenizer(raw)
    for m in [*range(400, 420), *range(2040, 2070)]:
        got = tokmod.encode_prefix(tok, text, m)
        first_diff = next((i for i, (x, y) in enumerate(zip(got, full)) if x != y), None)
        assert got == full[:m], f"m={m}: first difference at token {first_diff}"


# ----------------------------------------------------------------------------- IN1: padding over fresh rows only

@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_padding_a_fresh_row_beside_a_row_that_holds_tokens_is_accepted(backend, hf_checkpoint, onnx_export):
    """Guards inputs.check_padding_fresh checking only the padded rows' states: checked over every
    row, a batch whose unpadded row continues its tokens and whose padded row is still fresh (it
    held padding only) was refused. Reference: transformers on row 0's whole prompt (both
    pieces), and on row 1's own tokens alone."""
    from mamba_deploy.runners import open_runner

    folder, hf = hf_checkpoint("mamba")
    runner = open_runner(folder if backend == "torch" else onnx_export("mamba")[0], backend)
    a1, a2 = [5, 17, 3, 9, 22, 41, 7], [13, 2, 64, 8, 30]
    d = [70, 6, 12]
    st = runner.new_state(2)
    ids = torch.tensor([a1, [0] * len(a1)])
    mask = torch.tensor([[1] * len(a1), [0] * len(a1)])  # row 1: padding only, its state stays zero
    first, st = runner.prefill(ids, st, attention_mask=mask)
    ids2 = torch.tensor([a2, [0] * (len(a2) - len(d)) + d])
    mask2 = torch.tensor([[1] * len(a2), [0] * (len(a2) - len(d)) + [1] * len(d)])
    second, st = runner.prefill(ids2, st, attention_mask=mask2)
    want0 = _hf_logits(hf, [a1 + a2])[0]
    want1 = _hf_logits(hf, [d])[0]
    assert rel_err(first[0], want0[:len(a1)]) <= FP32_TOL
    assert rel_err(second[0], want0[len(a1):]) <= FP32_TOL
    assert rel_err(second[1, len(a2) - len(d):], want1) <= FP32_TOL


# ----------------------------------------------------------------------------- O1: validation reads the SSM state

def test_onnx_validation_fails_an_export_whose_ssm_state_is_off(hf_checkpoint, tmp_path, monkeypatch):
    """Guards export_onnx's validation comparing the graph's final SSM state with PyTorch's (it
    compared PyTorch's with itself, so a wrong state passed whenever the logits agreed). The
    ONNX runner's state read-back, which validation uses, is made to return the SSM state x 1.01.
    Reference: the contract of test_onnx.py's validation failure (ExportError, no output folder
    left), here with the error naming ssm_state."""
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners.onnx_runner import OnnxRunner
    from mamba_deploy.state import State

    real = OnnxRunner.to_torch_state

    def off(self, state):
        s = real(self, state)
        return State(s.conv, s.ssm * 1.01)

    monkeypatch.setattr(OnnxRunner, "to_torch_state", off)
    folder, _ = hf_checkpoint("mamba")
    with pytest.raises(ExportError, match="ssm_state"):
        export_onnx(folder, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.tmp*"))
