"""Generation and sampling against transformers (the independent reference): its greedy
`generate` per prompt, and its logits processors for each sampling filter."""

from pathlib import Path

import pytest
import torch

from conftest import rel_err
from mamba_deploy import load_model
from mamba_deploy.errors import ShapeError
from mamba_deploy.generation import SamplingConfig, filtered_probs, generate, left_pad
from mamba_deploy.runners.torch_runner import TorchRunner


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_batched_mixed_lengths_equal_transformers_greedy_per_prompt(kind, hf_checkpoint):
    folder, hf = hf_checkpoint(kind)
    model = load_model(folder)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    res = generate(TorchRunner(model), prompts, max_new_tokens=12, stop_token_ids=[])
    for p, got in zip(prompts, res.tokens):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert got == ref[0, len(p):].tolist()


@pytest.mark.parametrize("kind, penalty", [("mamba2_g2", 1.3), ("mamba", 5.0)])
def test_greedy_repetition_penalty_equals_transformers_per_prompt(kind, penalty, hf_checkpoint):
    """generate()'s repetition penalty in the decode loop, batched with mixed lengths, against
    transformers' greedy generate per prompt. Both penalize every token seen so far, the prompt's
    included (transformers' documented default for decoder-only models), once per distinct token.
    The tiny Mamba1 model is so peaked that 1.3 never changes its greedy tokens, so it gets 5.0.
    (Plain "mamba2" is left out: transformers' cached decode of it disagrees with its own full
    forward on one of these prompts, penalty or not.)"""
    folder, hf = hf_checkpoint(kind)
    runner = TorchRunner(load_model(folder))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 11, 1, 7)]
    kw = dict(max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    res = generate(runner, prompts, repetition_penalty=penalty, **kw)
    plain = generate(runner, prompts, **kw)
    for p, got in zip(prompts, res.tokens):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              repetition_penalty=penalty)
        assert got == ref[0, len(p):].tolist(), p
    # the penalty really steers these runs, including rows whose unpenalized output repeats its own
    # generated tokens (where a history without them would give other tokens than transformers')
    changed = [a != b for a, b in zip(res.tokens, plain.tokens)]
    assert sum(changed) >= 2, (res.tokens, plain.tokens)
    assert any(c and len(set(b)) < len(b) for c, b in zip(changed, plain.tokens))


def test_left_pad_layout():
    ids, mask = left_pad([[5, 6, 7], [9]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1, 2], [3, 4]])[1] is None


def _hf_probs(logits, processors, ids=None):
    scores = logits.clone()
    for proc in processors:
        scores = proc(ids, scores)
    return torch.softmax(scores, -1)


@pytest.mark.parametrize("case", ["temperature", "top_k", "top_p", "min_p", "repetition"])
def test_filters_match_transformers_processors(case):
    from transformers.generation import logits_process as lp

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g) * 3
    history = torch.randint(0, 50, (3, 6), generator=g)
    cfg, procs, hist = {
        "temperature": (SamplingConfig(temperature=0.7), [lp.TemperatureLogitsWarper(0.7)], None),
        "top_k": (SamplingConfig(temperature=1.0, top_k=5), [lp.TopKLogitsWarper(5)], None),
        "top_p": (SamplingConfig(temperature=1.0, top_p=0.8), [lp.TopPLogitsWarper(0.8)], None),
        "min_p": (SamplingConfig(temperature=1.0, min_p=0.1), [lp.MinPLogitsWarper(0.1)], None),
        "repetition": (SamplingConfig(temperature=1.0, repetition_penalty=1.3),
                       [lp.RepetitionPenaltyLogitsProcessor(1.3)], history),
    }[case]
    ours = filtered_probs(logits, cfg, hist)
    ref = _hf_probs(logits, procs, history)
    assert rel_err(ours, ref) <= 1e-6
    assert torch.equal(ours > 0, ref > 0)  # the same tokens survive


@pytest.mark.parametrize("settings", [
    dict(top_k=8, top_p=0.75, min_p=0.2), dict(top_p=0.75, min_p=0.2), dict(top_k=5, min_p=0.3),
    dict(top_k=12, top_p=0.6), dict(temperature=0.6, top_p=0.9, min_p=0.05),
])
def test_combined_filters_match_transformers_order(settings):
    """Several filters at once, in transformers' order (temperature, top-k, top-p, min-p)."""
    from transformers.generation import logits_process as lp

    cfg = SamplingConfig(**{"temperature": 1.0, **settings})
    procs = [lp.TemperatureLogitsWarper(cfg.temperature)]
    procs += [lp.TopKLogitsWarper(cfg.top_k)] if cfg.top_k else []
    procs += [lp.TopPLogitsWarper(cfg.top_p)] if cfg.top_p < 1 else []
    procs += [lp.MinPLogitsWarper(cfg.min_p)] if cfg.min_p else []
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 2.5
    ours, ref = filtered_probs(logits, cfg), _hf_probs(logits, procs, None)
    assert torch.equal(ours > 0, ref > 0) and rel_err(ours, ref) <= 1e-6


def test_top_p_reaching_the_mass_exactly_keeps_no_extra_token():
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    kept = filtered_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5)) > 0
    assert kept.tolist() == [[True, False, False]]  # transformers keeps 1 too; 2 before
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]])
    kept = filtered_probs(probs.log(), SamplingConfig(temperature=1.0, top_p=0.75, min_p=0.2)) > 0
    assert kept.sum().item() == 3  # top-p (0.4 + 0.3 < 0.75) keeps 3; min-p 0.08 keeps them


def test_prompts_as_numpy_and_tensor_scalars_equal_int_lists(hf_checkpoint):
    import numpy as np

    runner = TorchRunner(load_model(hf_checkpoint("mamba2")[0]))
    kw = dict(max_new_tokens=4, stop_token_ids=[])
    want = generate(runner, [[5, 6, 7], [8, 9, 10]], **kw).tokens
    for prompts in (np.array([[5, 6, 7], [8, 9, 10]], np.int32), [np.array([5, 6, 7]), np.array([8, 9, 10])],
                    [[np.int64(5), np.int64(6), np.int64(7)], [8, 9, 10]],
                    [[torch.tensor(5), torch.tensor(6), torch.tensor(7)], [8, 9, 10]]):
        assert generate(runner, prompts, **kw).tokens == want
    assert generate(runner, np.array([5, 6, 7]), **kw).tokens == want[:1]
    for bad in (np.array([5.0, 6.0]), [[5, 6.5]], [[5, True]], [["a", 1]]):
        with pytest.raises(ShapeError):
            generate(runner, bad, **kw)


def test_seeded_sampling_is_reproducible_and_respects_top_k(hf_checkpoint):
    model = load_model(hf_checkpoint("mamba2")[0])
    runner = TorchRunner(model)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=3, seed=123, stop_token_ids=[])
    a = generate(runner, [[1, 2, 3], [4]], **kw).tokens
    b = generate(runner, [[1, 2, 3], [4]], **kw).tokens
    c = generate(runner, [[1, 2, 3], [4]], **{**kw, "seed": 124}).tokens
    assert a == b and a != c
    # every sampled token is among the 3 most likely given the true prefix
    seq = [1, 2, 3] + a[0]
    logits = model(torch.tensor([seq])).logits[0]
    for i, tok in enumerate(a[0]):
        assert tok in torch.topk(logits[2 + i], 3).indices.tolist()


def test_stop_tokens_and_streaming(hf_checkpoint):
    model = load_model(hf_checkpoint("mamba")[0])
    runner = TorchRunner(model)
    free = generate(runner, [[5, 6]], max_new_tokens=10, stop_token_ids=[]).tokens[0]
    stop = free[3]
    streamed = []
    res = generate(runner, [[5, 6]], max_new_tokens=10, stop_token_ids=[stop],
                   on_token=lambda i, t: streamed.append((i, t)))
    first = free.index(stop)
    assert res.tokens[0] == free[:first] and res.stop_reasons == ["stop"]
    assert streamed == [(0, t) for t in free[:first]]


def test_bad_sampling_settings_raise():
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0)


def test_generate_cli_16bit_state(capsys):
    """`generate --state-dtype bf16` opens the torch runner with a bfloat16 SSM state and
    generates transformers' float32 greedy tokens; an unknown state dtype is refused by the
    argument parser. Equal tokens are the right expectation here: on this prompt transformers'
    top-1 leads the runner-up by >= 0.24 at each of the 6 steps, while a bfloat16 state moves
    the logits by <= 0.003 (measured against this runner's float32 state)."""
    import json
    from pathlib import Path

    from transformers import Mamba2ForCausalLM, PreTrainedTokenizerFast

    from mamba_deploy.cli import main
    from mamba_deploy.runners import open_runner

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    with open_runner(demo, "torch", state_dtype=torch.bfloat16) as runner:
        assert runner.new_state(2).ssm.dtype == torch.bfloat16
    prompt = "Once upon a time"
    assert main(["generate", str(demo), "--prompt", prompt, "--max-new-tokens", "6",
                 "--state-dtype", "bf16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(demo / "tokenizer.json"))
    ids = tok(prompt, return_tensors="pt").input_ids
    hf = Mamba2ForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    assert isinstance(out, list) and len(out) == 1 and out[0]["prompt"] == prompt
    assert out[0]["tokens"] == want and out[0]["stop"] == "length"
    assert out[0]["completion"] == tok.decode(want)
    with pytest.raises(SystemExit):
        main(["generate", str(demo), "--prompt", "x", "--state-dtype", "int8"])


def test_prompt_forms_and_bad_arguments(hf_checkpoint):
    from mamba_deploy.errors import ConfigError, ShapeError

    runner = TorchRunner(load_model(hf_checkpoint("mamba")[0]))
    rows = [[5, 9, 17], [3, 4, 8]]
    want = generate(runner, rows, max_new_tokens=4, stop_token_ids=[]).tokens
    assert generate(runner, torch.tensor(rows), max_new_tokens=4, stop_token_ids=[]).tokens == want
    assert generate(runner, torch.tensor(rows[1]), max_new_tokens=4, stop_token_ids=[]).tokens == want[1:]
    with pytest.raises(ShapeError, match="non-empty list"):
        generate(runner, [])
    with pytest.raises(ShapeError, match="integer ids"):
        generate(runner, torch.ones(2, 3))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(runner, rows, max_new_tokens=-1)
    with pytest.raises(ConfigError, match=r"stop token id\(s\) \[99999\]"):
        generate(runner, rows, stop_token_ids=[5, 99999])
    with pytest.raises(ShapeError, match="token id 500 outside"):
        generate(runner, [[1, 500]])
    with pytest.raises(ShapeError, match="token id 128 outside"):
        runner.step(torch.tensor([1, 128]), runner.new_state(2))


def test_numpy_numbers_are_accepted(hf_checkpoint):
    import numpy as np

    runner = TorchRunner(load_model(hf_checkpoint("mamba")[0]))
    assert SamplingConfig(temperature=np.float32(0.7), top_p=np.float64(0.9)).temperature == np.float32(0.7)
    got = generate(runner, [[5, 9]], max_new_tokens=np.int64(3), stop_token_ids=[]).tokens
    assert got == generate(runner, [[5, 9]], max_new_tokens=3, stop_token_ids=[]).tokens and len(got[0]) == 3


# ----------------------------------------------------------------------------- stop strings
# The reference is brute force on the unstopped greedy run: decode every prefix of its tokens;
# the run stops after the first prefix whose text holds a stop string, and its text ends at the
# earliest match there (str.find), the way OpenAI-style servers cut.

DEMO2 = str(Path(__file__).resolve().parents[1] / "models" / "demo-mamba2")


def _brute_force_stop(tok, tokens, stops):
    for n in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:n])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return tokens[:n], text[:min(hits)], "stop"
    return tokens, tok.decode(tokens), "length"


@pytest.fixture(scope="module")
def demo_runner():
    from pathlib import Path

    return TorchRunner(load_model(Path(__file__).resolve().parents[1] / DEMO2))


@pytest.fixture(scope="module")
def free_run(demo_runner):
    prompts = ["def main(", "import os\n"]
    return prompts, generate(demo_runner, prompts, max_new_tokens=24, stop_token_ids=[])


def _token_boundary_stop(tok, tokens):
    """A 2-character stop string across the boundary between two tokens' texts."""
    for n in range(2, len(tokens)):
        a, b = tok.decode(tokens[:n - 1]), tok.decode(tokens[:n])
        if len(a) >= 1 and len(b) > len(a) and b.startswith(a):
            return b[len(a) - 1:len(a) + 1]
    pytest.skip("no token boundary found in the free run")


def test_stop_strings_cut_like_brute_force(demo_runner, free_run):
    from mamba_deploy.generation import TextStream

    prompts, free = free_run
    tok = demo_runner.tokenizer
    t0 = free.texts[0]
    cases = [[t0[4:7]], [t0[-3:]], [_token_boundary_stop(tok, free.tokens[0])], ["\x00never"],
             [t0[10:12], t0[2:4]], [free.texts[1][5:8]]]
    for stops in cases:
        res = generate(demo_runner, prompts, max_new_tokens=24, stop_token_ids=[], stop_strings=stops)
        for i in range(len(prompts)):
            toks, text, reason = _brute_force_stop(tok, free.tokens[i], stops)
            assert (res.tokens[i], res.texts[i], res.stop_reasons[i]) == (toks, text, reason), (stops, i)
            # the stream of the same tokens: its pieces add up to the text and never show a stop string
            stream, shown = TextStream(tok, stops), ""
            for t in res.tokens[i]:
                shown += stream.push(t)
                assert not any(s in shown for s in stops)
            assert shown + stream.finish() == res.texts[i]


def test_stop_strings_with_token_id_prompts(demo_runner, free_run):
    prompts, free = free_run
    tok = demo_runner.tokenizer
    ids = tok.encode(prompts[0])
    stop = free.texts[0][4:7]
    res = generate(demo_runner, [ids], max_new_tokens=24, stop_token_ids=[], stop_strings=stop)
    assert res.texts == [free.texts[0][:free.texts[0].index(stop)]] and res.stop_reasons == ["stop"]


@pytest.mark.parametrize("bad", [[""], [3], "", ["ok", None]])
def test_bad_stop_strings_are_typed_errors(demo_runner, bad):
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="stop strings must be non-empty strings"):
        generate(demo_runner, "x", max_new_tokens=2, stop_strings=bad)


def test_cli_stop_string_stream_and_json(free_run, capsys):
    import json

    from mamba_deploy.cli import main

    prompts, free = free_run
    stop = free.texts[0][4:7]
    want = free.texts[0][:free.texts[0].index(stop)]
    assert main(["generate", DEMO2, "--prompt", prompts[0], "--max-new-tokens", "24", "--stop-string", stop]) == 0
    assert capsys.readouterr().out == prompts[0] + want + "\n"
    assert main(["generate", DEMO2, "--prompt", prompts[0], "--max-new-tokens", "24", "--stop-string", stop,
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    assert got["completion"] == want and got["stop"] == "stop"


class _ScriptedTokenizer:
    """Byte pieces per id; decode joins them as UTF-8 (U+FFFD for incomplete characters) and then,
    like llama.cpp's and transformers' clean-up, turns " 's" into "'s": earlier text can change."""

    eos_token_id = 0

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace").replace(" 's", "'s")

    def encode(self, text):
        return [1]


def _scripted_runner(pieces, script):
    """A Runner whose greedy continuation is `script` (token ids), whatever the prompt."""
    from mamba_deploy.runners.base import Runner

    V = len(pieces)

    class Scripted(Runner):
        name = "scripted"
        vocab_size = V
        tokenizer = _ScriptedTokenizer(pieces)

        def new_state(self, batch):
            return [0]

        def _logits(self, state, b):
            logits = torch.zeros(b, V)
            logits[:, script[min(state[0], len(script) - 1)]] = 1.0
            state[0] += 1
            return logits

        def prefill(self, ids, state, attention_mask=None, last_only=False):
            return self._logits(state, ids.shape[0])[:, None], state

        def step(self, ids, state):
            return self._logits(state, ids.shape[0]), state

    return Scripted()


def test_stop_string_made_by_a_decoder_that_revises_earlier_text():
    # "it" + " '" decodes to "it '"; with "s" the clean-up gives "it's": the match "t's" starts
    # before the text seen one token earlier ended
    pieces = [b"<eos>", b"it", b" '", b"s", b" ok"]
    runner = _scripted_runner(pieces, [1, 2, 3, 4])
    res = generate(runner, [[1]], max_new_tokens=4, stop_strings=["t's"])
    assert (res.tokens, res.texts, res.stop_reasons) == ([[1, 2, 3]], ["i"], ["stop"])


def test_id_prompts_stop_at_the_eos_as_text_prompts_do():
    """As transformers' generate: the EOS ends a token-id prompt's generation too (it used to run
    on past it into the next document); stop_token_ids=[] is the way to run past it."""
    pieces = [b"<eos>", b"a", b"b"]
    runner = _scripted_runner(pieces, [1, 0, 2])
    res = generate(runner, [[1]], max_new_tokens=3, stop_strings=["never"])
    assert (res.tokens, res.stop_reasons) == ([[1]], ["stop"])  # the stop token is not returned
    assert generate(runner, [[1]], max_new_tokens=3).tokens == [[1]]
    assert generate(runner, [[1]], max_new_tokens=3, stop_token_ids=[]).tokens == [[1, 0, 2]]
    assert generate(runner, ["x"], max_new_tokens=3).tokens == [[1]]  # text prompts: eos stops


def test_stop_string_is_not_matched_by_an_incomplete_character():
    pieces = [b"<eos>", b"a", b"\xe4", b"\xb8", b"\xad", b"b"]  # "a" + the 3 bytes of U+4E2D + "b"
    runner = _scripted_runner(pieces, [1, 2, 3, 4, 5])
    res = generate(runner, [[1]], max_new_tokens=5, stop_strings=["\ufffd"], stop_token_ids=[])
    assert (res.texts, res.stop_reasons) == (["a\u4e2db"], ["length"])


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace: "▁" word starts, the text's first space dropped)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "héllo wörld, it's 日本 ✓"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False))
    return tok


@pytest.mark.parametrize("kind", ["byte-level BPE", "metaspace", "llama.cpp pieces"])
def test_incremental_text_equals_decoding_everything_after_every_token(kind, tmp_path):
    """IncrementalText decodes a small window per token; the reference is the tokenizer's decode
    of all ids so far, after every token, on random id sequences (incomplete UTF-8 included)."""
    from pathlib import Path

    from mamba_deploy.generation import IncrementalText
    from mamba_deploy.tokenizer import load_tokenizer

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    if kind == "byte-level BPE":
        tok = load_tokenizer(demo)
    elif kind == "metaspace":
        tok = _metaspace_tokenizer()
    else:
        pytest.importorskip("llama_cpp")
        from mamba_deploy.export.gguf import export_gguf
        from mamba_deploy.runners import open_runner

        tok = open_runner(export_gguf(demo, tmp_path / "m.gguf"), "llama.cpp").tokenizer
    vocab = tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else 4096
    g = torch.Generator().manual_seed(0)
    text = "the quick brown fox, héllo wörld 日本 ✓ it's"
    enc = tok.encode(text)
    seqs = [enc.ids if hasattr(enc, "ids") else enc]
    seqs += [torch.randint(0, vocab, (60,), generator=g).tolist() for _ in range(150)]
    for ids in seqs:
        inc = IncrementalText(tok)
        for k, t in enumerate(ids):
            assert inc.push(t) == tok.decode(ids[:k + 1]), (kind, ids[:k + 1])
