"""Twenty-seventh session: the ids that end generation besides the EOS (a chat model's end-of-turn
token) as transformers reads them (generation_config.json's eos_token_id list) and as a GGUF names
them (tokenizer.ggml.eot_token_id), carried through every conversion between the two."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

from test_gguf import HAVE_LLAMA

gguf = pytest.importorskip("gguf")

PROMPT = "the quick brown"


def _with_end_list(folder, dst, ids):
    """A copy of the checkpoint folder whose generation_config.json lists `ids` as its eos_token_id."""
    shutil.copytree(folder, dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": list(ids)}))
    return dst


def _greedy_hf(folder, ids, n):
    """transformers' own greedy generation from the folder (its generation_config.json included):
    the new tokens, up to and including the one it stopped at."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_folder_generation_stops_at_every_listed_eos_as_transformers_does(ckpt, tmp_path):
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    folder, _ = ckpt("mamba")
    runner = open_runner(folder, backend="torch")
    tok = runner.tokenizer
    ids, eos, n = tok.encode(PROMPT), tok.eos_token_id, 12
    free = generate(runner, [ids], max_new_tokens=n).tokens[0]
    stop = next(t for t in free if t != eos)  # a token greedy decoding reaches
    listed = _with_end_list(folder, tmp_path / "listed", [eos, stop])
    theirs = _greedy_hf(listed, ids, n)
    assert stop in theirs and len(theirs) < n  # transformers stopped early, at the listed id
    ended = open_runner(listed, backend="torch")
    assert ended.tokenizer.end_token_ids == (stop,)
    ours = generate(ended, PROMPT, max_new_tokens=n).tokens[0]
    assert ours == theirs[:theirs.index(stop)]  # our output leaves the stop token out


def test_listed_end_ids_survive_gguf_export_and_conversion_back(ckpt, tmp_path):
    from mamba_deploy import load_model, save_checkpoint
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.runners import open_runner

    folder, _ = ckpt("mamba2")
    eos = open_runner(folder, backend="torch").tokenizer.eos_token_id
    end = next(i for i in range(5, 128) if i != eos)
    listed = _with_end_list(folder, tmp_path / "listed", [eos, end])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(listed, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))  # gguf-py's reader, not ours
    assert reader.get_field("tokenizer.ggml.eot_token_id").contents() == end
    assert open_runner(out, backend="torch").tokenizer.end_token_ids == (end,)
    if HAVE_LLAMA:  # llama.cpp's own end-of-generation set for the file
        assert end in open_runner(out, backend="llama.cpp").tokenizer.end_token_ids
    for fmt in ("hf", "mamba_ssm"):
        back = save_checkpoint(load_model(out), tmp_path / f"back_{fmt}", fmt=fmt)
        # the mamba_ssm layout also lists the config's own eos_token_id first (2 here: transformers'
        # default, which the tiny tokenizer's <|endoftext|> = 0 does not match), as its from_pretrained reads it
        listed = json.loads((back / "generation_config.json").read_text())["eos_token_id"]
        assert listed[-2:] == [eos, end]
        assert end in open_runner(back, backend="torch").tokenizer.end_token_ids


def test_end_ids_gguf_cannot_name_are_warned_about(ckpt, tmp_path):
    """GGUF has two keys for end ids besides the EOS (eot, eom): a checkpoint listing four gets a
    warning naming the two the file loses, and gguf-py reads the first two back; a lost id whose
    text llama.cpp recognises as an end (EOG_TOKEN_TEXTS) is not named."""
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.runners import open_runner

    folder, _ = ckpt("mamba2")
    tok = open_runner(folder, backend="torch").tokenizer
    eos = tok.eos_token_id
    ends = [i for i in range(5, 128) if i != eos][:4]
    listed = _with_end_list(folder, tmp_path / "listed", [eos, *ends])
    with pytest.warns(UserWarning, match="GGUF names 2") as caught:
        out = export_gguf(listed, tmp_path / "m.gguf")
    msg = next(str(w.message) for w in caught if "GGUF names 2" in str(w.message))
    assert f"stop at {ends[2]} (" in msg and f", {ends[3]} (" in msg and "--stop" in msg
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("tokenizer.ggml.eot_token_id").contents() == ends[0]
    assert reader.get_field("tokenizer.ggml.eom_token_id").contents() == ends[1]
    two = _with_end_list(folder, tmp_path / "two", [eos, *ends[:2]])
    with warnings.catch_warnings(record=True) as seen:  # two fit: nothing to say
        warnings.simplefilter("always")
        export_gguf(two, tmp_path / "two.gguf")
    assert not [w for w in seen if "GGUF names" in str(w.message)]


def test_a_copied_end_list_is_kept_by_a_mamba_ssm_convert(ckpt, tmp_path):
    """convert --format mamba_ssm merges the config's token ids into a copied generation_config.json:
    its eos list stays a list, with the config's EOS first."""
    from mamba_deploy import load_model, save_checkpoint

    folder, _ = ckpt("mamba")
    eos = load_model(folder).config.eos_token_id
    listed = _with_end_list(folder, tmp_path / "listed", [eos, 9, 11])
    back = save_checkpoint(load_model(listed), tmp_path / "ssm", fmt="mamba_ssm")
    gen = json.loads((back / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [eos, 9, 11]


def test_gguf_add_eos_follows_a_tokenizer_that_appends_its_eos(tmp_path):
    """A tokenizer.json whose post-processor appends the EOS (as some encoder-style and Llama-style
    tokenizers do) encodes every text with it; the GGUF now says so (tokenizer.ggml.add_eos_token),
    so llama.cpp appends it too. Before, the key was not written and llama.cpp's ids lacked the
    EOS that the checkpoint's, and its ONNX export's, had. Reference: transformers on the folder."""
    transformers = pytest.importorskip("transformers")
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.runners import open_runner
    from test_review_gaps_gguf_llamacpp import REPO, open_llama

    folder = tmp_path / "m"
    shutil.copytree(REPO / "models" / "demo-mamba2", folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    seq, eos = {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tj["post_processor"] = {"type": "TemplateProcessing", "single": [seq, eos], "pair": [seq, eos],
                            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                                 "tokens": ["<|endoftext|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    text = "def main(x):\n    return x"
    want = transformers.AutoTokenizer.from_pretrained(str(folder))(text).input_ids
    assert want[-1] == 0 and want[0] != 0
    (tmp_path / "g").mkdir()
    out = export_gguf(folder, tmp_path / "g" / "m.gguf")  # alone: the GGUF's own vocabulary everywhere
    reader = gguf.GGUFReader(str(out))
    assert bool(reader.get_field("tokenizer.ggml.add_eos_token").contents()) is True
    assert bool(reader.get_field("tokenizer.ggml.add_bos_token").contents()) is False
    if HAVE_LLAMA:
        with open_llama(out) as r:
            assert r.tokenizer.encode(text) == want
    assert open_runner(out, "torch").tokenizer.encode(text) == want
    assert open_runner(folder, "torch").tokenizer.encode(text) == want


# ----------------------------------------------------------------------------- configs read by their dialect

def _hf_with_legacy_keys(kind, tmp_path, **overrides):
    """A transformers checkpoint whose config.json also holds mamba_ssm's keys, as state-spaces'
    *-hf configs do (and every fine-tune transformers saves from them keeps)."""
    from conftest import build_hf_model

    hf = build_hf_model(kind, **overrides)
    folder = tmp_path / kind
    hf.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], ssm_cfg={}, pad_vocab_size_multiple=8)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, hf


@pytest.mark.parametrize("kind,overrides", [("mamba", dict(layer_norm_epsilon=0.5)),
                                            ("mamba", dict(tie_word_embeddings=False, state_size=4)),
                                            ("falcon_mamba", {})])
def test_an_hf_config_with_mamba_ssm_keys_is_read_as_hf(kind, overrides, tmp_path):
    """It was read by the mamba_ssm reader, which ignored layer_norm_epsilon, tie_word_embeddings,
    state_size and Falcon-Mamba's dt/B/C norm: wrong logits, or a refusal. Reference: transformers."""
    from conftest import rel_err
    from mamba_deploy import load_model

    folder, hf = _hf_with_legacy_keys(kind, tmp_path, **overrides)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = load_model(folder)
    assert ours.config.source == "hf"
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) < 1e-4


def test_other_architectures_and_activations_are_refused_by_name(tmp_path):
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import UnsupportedArchitectureError

    hyena = {"model_type": "hyenadna", "d_model": 64, "n_layer": 2, "vocab_size": 12}  # d_model + n_layer too
    with pytest.raises(UnsupportedArchitectureError, match="hyenadna"):
        MambaConfig.from_dict(hyena)
    for kind in ("mamba", "mamba2"):  # transformers applies ACT2FN[hidden_act]; the mixers here SiLU
        hf = {"model_type": kind, "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, "hidden_act": "gelu",
              "head_dim": 16, "n_groups": 1}
        with pytest.raises(UnsupportedArchitectureError, match="hidden_act='gelu'"):
            MambaConfig.from_dict(hf)
        for silu in ("silu", "swish"):
            assert MambaConfig.from_dict({**hf, "hidden_act": silu}).arch == {"mamba": "mamba1"}.get(kind, kind)


def test_mamba_ssm_cfg_keys_its_constructor_refuses_are_refused(tmp_path):
    """mamba_ssm raises TypeError on a misspelt ssm_cfg key; it loaded here as the default
    (norm_befor_gate -> norm_before_gate False). D_has_hdim (D per channel) is named, not left
    to a weight-shape mismatch."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ConfigError, UnsupportedArchitectureError

    base = {"d_model": 64, "n_layer": 2, "vocab_size": 100}
    with pytest.raises(ConfigError, match="'norm_befor_gate'"):
        MambaConfig.from_dict({**base, "ssm_cfg": {"layer": "Mamba2", "norm_befor_gate": True}})
    with pytest.raises(ConfigError, match="'headdim'"):  # a Mamba2 key on a Mamba1 layer
        MambaConfig.from_dict({**base, "ssm_cfg": {"headdim": 32}})
    with pytest.raises(UnsupportedArchitectureError, match="D_has_hdim"):
        MambaConfig.from_dict({**base, "ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}})
    ok = MambaConfig.from_dict({**base, "ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True, "dt_min": 0.01,
                                                   "A_init_range": [1, 16], "D_has_hdim": False}})
    assert ok.norm_before_gate is True


@pytest.mark.parametrize("d,keys", [
    ({"model_type": "mamba2", "hidden_size": 36, "num_hidden_layers": 1, "vocab_size": 64, "head_dim": 16},
     "expand / head_dim / num_heads"),
    ({"d_model": 36, "n_layer": 1, "vocab_size": 64, "ssm_cfg": {"layer": "Mamba2", "headdim": 16}},
     "ssm_cfg.headdim"),
])
def test_a_headdim_that_does_not_divide_d_inner_names_the_dialect_keys(d, keys):
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(keys)):
        MambaConfig.from_dict(d)


# ----------------------------------------------------------------------------- llama.cpp's end-of-generation set

U32 = gguf.GGUFValueType.UINT32
FIRST = 120  # the tiny vocabulary's rows from 116 on are padding


def _with_tokens(src, dst, texts, **keys):
    """A copy of the GGUF with tokens 120.. (unused padding rows) renamed to `texts` (control type)
    and extra u32 keys."""
    from conftest import rewrite_gguf

    r = gguf.GGUFReader(str(src))
    toks, types = list(r.fields["tokenizer.ggml.tokens"].contents()), list(r.fields["tokenizer.ggml.token_type"].contents())
    for i, t in enumerate(texts):
        toks[FIRST + i], types[FIRST + i] = t, 3
    A, S, I = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32
    edit = {"tokenizer.ggml.tokens": (toks, A, S), "tokenizer.ggml.token_type": (types, A, I)}
    edit.update({f"tokenizer.ggml.{k}_token_id": (v, U32) for k, v in keys.items()})
    return rewrite_gguf(src, dst, edit=edit)


@pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python (the reference: llama.cpp's own set)")
@pytest.mark.parametrize("texts,keys", [
    (["<|im_end|>"], {}),  # a ChatML model's end of turn, which the GGUF names nowhere
    (["<|end|>"], {}),
    (["<|end|>", "<|return|>"], {}),
    (["<|end|>", "<|return|>", "<|call|>"], {}),  # gpt-oss: <|end|> ends a message, not the turn
    (["<PAD>"], {}),  # llama.cpp takes it for the FIM pad token, and ends there
    (["<PAD>", "<|fim_pad|>"], {"fim_pad": FIRST + 1}),  # the key names the FIM pad: <PAD> is no longer one
    (["</s>", "<|endofprompt|>", "<|im_start|>"], {"eot": FIRST + 3}),
])
def test_a_gguf_ends_generation_where_llamacpp_does_on_every_backend(tiny_gguf, tmp_path, texts, keys):
    """llama.cpp ends generation at tokens it recognises by their text (<|im_end|>...) besides the
    EOS, eot and eom; the torch backend on the same GGUF, and a checkpoint converted from it,
    stopped only at the EOS and eot / eom keys, so chat models ran past their end of turn there."""
    from mamba_deploy import load_model, save_checkpoint
    from mamba_deploy.runners import open_runner

    src = _with_tokens(tiny_gguf, tmp_path / "t.gguf", texts, **keys)
    with open_runner(src, "llama.cpp", n_threads=1) as r:
        want = set(r.tokenizer.end_token_ids)
    assert want  # every case has one
    assert set(open_runner(src, "torch").tokenizer.end_token_ids) == want
    back = save_checkpoint(load_model(src), tmp_path / "back")
    assert set(open_runner(back, "torch").tokenizer.end_token_ids) == want


# ----------------------------------------------------------------------------- the Runner contract, every backend

from conftest import rel_err  # noqa: E402
from mamba_deploy.errors import ShapeError  # noqa: E402
from mamba_deploy.runners import open_runner  # noqa: E402
from test_runners import BACKENDS, _open, export_artifacts  # noqa: E402


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return export_artifacts(tmp_path_factory.mktemp("runners27"))


def _prompt(n, seed=0):
    return torch.randint(3, 200, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clone_state_forks_two_independent_branches(artifacts, backend):
    """Reference: each branch run alone from a fresh prefill of the same prompt."""
    import copy

    r = _open(artifacts, backend)
    st = r.new_state(1)
    r.prefill(_prompt(9), st)
    fork = r.clone_state(st)
    a = [r.step(torch.tensor([t]), st)[0] for t in (5, 6)]
    b = [r.step(torch.tensor([t]), fork)[0] for t in (7, 8)]
    for tokens, got in (((5, 6), a), ((7, 8), b)):
        alone = r.new_state(1)
        r.prefill(_prompt(9), alone)
        want = [r.step(torch.tensor([t]), alone)[0] for t in tokens]
        for g, w in zip(got, want):
            assert rel_err(g, w) < 1e-5, backend
    if backend in ("onnx", "llama.cpp"):  # buffers or handles a copy would share
        for fn in (copy.copy, copy.deepcopy):
            with pytest.raises(ShapeError, match="clone_state"):
                fn(st)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_torch_state_refuses_another_models_shapes(artifacts, backend):
    """torch's copy_ and numpy broadcast a state with d_state 1 silently, ONNX loaded only the
    layers a shorter state had, OpenVINO stored anything and failed on the next call."""
    from mamba_deploy.state import State

    r = _open(artifacts, backend)
    st = r.new_state(1)
    good = State.zeros(r.config, 1)
    narrow = State(good.conv, good.ssm[..., :1].clone())  # broadcastable
    short = State(good.conv[:-1].clone(), good.ssm[:-1].clone())  # a layer fewer
    for bad in (narrow, short, State(torch.zeros(3), good.ssm), None):
        with pytest.raises(ShapeError):
            r.load_torch_state(st, bad)
    grad = State(good.conv.clone().requires_grad_(), good.ssm.clone())
    r.load_torch_state(st, grad)  # detached, not torch's "Can't call numpy() on a Tensor that requires grad"
    with pytest.raises(ShapeError, match="batch"):
        r.load_torch_state(st, State.zeros(r.config, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_refuses_a_missing_state_on_every_backend(artifacts, backend):
    r = _open(artifacts, backend)
    with pytest.raises(ShapeError, match="new_state"):
        r.prefill(_prompt(3), None)


def test_llamacpp_prefill_past_its_context_leaves_every_row_as_it_was(artifacts):
    pytest.importorskip("llama_cpp")
    r = open_runner(artifacts["llama.cpp"], "llama.cpp", n_ctx=8, n_seq_max=2)
    st = r.new_state(2)
    r.prefill(torch.tensor([[5, 6, 7, 8, 9]] * 2), st, attention_mask=torch.tensor([[0, 0, 0, 1, 1], [1] * 5]))
    before, pos = r.to_torch_state(st), list(st.pos)
    assert pos == [2, 5]
    with pytest.raises(ShapeError, match="n_ctx"):  # row 1 (not row 0, which runs first) would reach position 8
        r.prefill(torch.tensor([[9, 10, 11, 12]] * 2), st)
    after = r.to_torch_state(st)
    assert st.pos == pos and torch.equal(after.conv, before.conv) and torch.equal(after.ssm, before.ssm)


def test_onnx_state_of_a_same_shaped_model_with_another_vocabulary_decodes(tmp_path):
    """The state's preallocated decode logits were sized by the runner that made it: a one-token
    call leaked ONNX Runtime's bare RuntimeError. Reference: the torch backend of each model."""
    pytest.importorskip("onnxruntime")
    from conftest import build_hf_model
    from mamba_deploy.export.onnx import export_onnx

    runners = {}
    for vocab in (128, 136):
        hf = build_hf_model("mamba2", vocab_size=vocab)
        hf.save_pretrained(tmp_path / f"v{vocab}")
        runners[vocab] = (open_runner(export_onnx(tmp_path / f"v{vocab}", tmp_path / f"o{vocab}"), "onnx"),
                          open_runner(tmp_path / f"v{vocab}", "torch"))
    (small, _), (big, ref) = runners[128], runners[136]
    st, want = small.new_state(1), ref.new_state(1)
    got = big.prefill(_prompt(1, 2) % 128, st)[0]
    assert got.shape[-1] == 136
    assert rel_err(got, ref.prefill(_prompt(1, 2) % 128, want)[0]) < 1e-4
    assert rel_err(big.step(torch.tensor([4]), st)[0], ref.step(torch.tensor([4]), want)[0]) < 1e-4


def test_llamacpp_warns_of_what_it_computes_differently_when_opening(tmp_path):
    pytest.importorskip("llama_cpp")
    from conftest import DT_LIMIT_KIND, build_hf_model, write_tiny_bpe
    from mamba_deploy.export.gguf import export_gguf

    folder = tmp_path / "m"
    build_hf_model(DT_LIMIT_KIND).save_pretrained(folder)
    write_tiny_bpe(folder)
    with pytest.warns(UserWarning, match="dt_limit"):
        out = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    with pytest.warns(UserWarning, match="ignores Mamba2 dt_limit.*--backend torch"):
        open_runner(out, "llama.cpp", n_threads=1).close()


def test_onnx_run_after_close_is_a_typed_error(artifacts):
    pytest.importorskip("onnxruntime")
    from mamba_deploy.errors import RunnerClosedError

    r = open_runner(artifacts["onnx"], "onnx")
    feeds = {"input_ids": np.zeros((1, 2), np.int64)}
    feeds.update({n: np.zeros(s, np.float32) for n, s in zip(
        [f"past_{k}.{i}" for i in range(r.config.n_layer) for k in ("conv", "ssm")],
        [s for i in range(r.config.n_layer) for s in ((1, *r.config.conv_state_shape), (1, *r.config.ssm_state_shape))])})
    assert "logits" in r.run(feeds)
    r.close()
    with pytest.raises(RunnerClosedError):
        r.run(feeds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph runner needs a CUDA GPU")
def test_clone_state_on_the_cuda_graph_runner(hf_checkpoint):
    """A fork takes its own rows of a graph bucket; each branch equals its run alone (bf16: 1e-2)."""
    folder, _ = hf_checkpoint("mamba2")
    r = open_runner(folder, "torch", device="cuda", dtype=torch.bfloat16)
    st = r.new_state(1)
    r.prefill(_prompt(9) % 128, st)
    fork = r.clone_state(st)
    got = {(5, 6): [r.step(torch.tensor([t]), st)[0] for t in (5, 6)],
           (7, 8): [r.step(torch.tensor([t]), fork)[0] for t in (7, 8)]}
    for tokens, outs in got.items():
        alone = r.new_state(1)
        r.prefill(_prompt(9) % 128, alone)
        for t, g in zip(tokens, outs):
            assert rel_err(g, r.step(torch.tensor([t]), alone)[0]) < 1e-2


# ----------------------------------------------------------------------------- memory on large models

def test_export_refuses_the_float64_check_that_cannot_fit_before_building_it(onnx_export, hf_checkpoint, monkeypatch):
    """Linux's out-of-memory killer ends the process instead of raising MemoryError, which lost a
    complete export (a 727M model: 9.9 GB at the kill). The float64 twin is checked to fit first."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export import onnx as onnx_export_mod
    from mamba_deploy.runners import onnx_runner

    folder, _, _ = onnx_export("mamba2")
    model = load_model(hf_checkpoint("mamba2")[0])
    reference = onnx_export_mod.torch_reference(folder, model)
    monkeypatch.setitem(onnx_export_mod.TOLERANCE, "fp32", 0.0)  # every error is "beyond": the second opinion runs

    def twin():
        raise AssertionError("the float64 twin was built")

    monkeypatch.setattr(onnx_runner, "available_memory", lambda: 1024)  # the tiny graph is ~100 KB
    with pytest.raises(ExportError, match=r"float64 check .* needs ~.* GiB .* --no-validate"):
        onnx_export_mod.validate_against_reference(folder, reference, "fp32", twin, verbose=False)
    monkeypatch.setattr(onnx_runner, "available_memory", lambda: 1 << 40)  # fits: the twin is built
    with pytest.raises(AssertionError, match="twin was built"):
        onnx_export_mod.validate_against_reference(folder, reference, "fp32", twin, verbose=False)


def test_calibration_returns_freed_heap_after_every_block(hf_checkpoint, monkeypatch):
    """AWQ's per-block temporaries fragmented glibc's heap (1.4 -> 2.25 GB over 24 layers of a
    210M model); each block now hands freed pages back."""
    from mamba_deploy import load_model
    from mamba_deploy.quant import calib
    from mamba_deploy.runners import base

    calls = []
    monkeypatch.setattr(base, "release_freed_memory", lambda: calls.append(1))
    model = load_model(hf_checkpoint("mamba2")[0])
    seen = []
    calib.run_blockwise(model, torch.randint(0, 128, (2, 8)), {}, lambda i, stats: seen.append(i), progress=False)
    assert seen == list(range(model.config.n_layer)) and len(calls) == model.config.n_layer


@pytest.mark.parametrize("backend", ["onnx", "llama.cpp"])
def test_cli_verify_holds_one_model_at_a_time_and_reports_as_with_both_open(artifacts, backend, tmp_path, monkeypatch):
    """The CLI verify held the reference model, the artifact and both sides' logits at once (7.5x
    the weights against an ONNX export). It now records the reference's answers, frees the model,
    then opens the artifact. Reference: the report of verify() with both runners open."""
    import gc
    import weakref

    from mamba_deploy import verify as V
    from mamba_deploy.cli import main

    pytest.importorskip({"onnx": "onnxruntime", "llama.cpp": "llama_cpp"}[backend])
    path, demo = artifacts[backend], artifacts["torch"]
    alive = []
    real_ref, real_art = V.open_reference, V.open_artifact

    def open_reference(*a, **kw):
        r = real_ref(*a, **kw)
        alive.append(weakref.ref(r.model))
        return r

    def open_artifact(*a, **kw):
        gc.collect()
        assert alive and alive[0]() is None, "the reference model is still alive when the artifact opens"
        return real_art(*a, **kw)

    monkeypatch.setattr(V, "open_reference", open_reference)
    monkeypatch.setattr(V, "open_artifact", open_artifact)
    main(["verify", str(demo), str(path), "--lengths", "1,7", "--batch", "1,2", "--decode-steps", "3", "--quiet",
          "--json", str(tmp_path / "v.json")])
    monkeypatch.undo()
    ref, art, label = V.open_pair(demo, path)
    want = V.verify(ref, art, (1, 7), (1, 2), 3, label=label, progress=False).to_dict()
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["cases"] == json.loads(json.dumps(want["cases"])) and got["sequence"] == json.loads(
        json.dumps(want["sequence"]))
    assert got["reference"] == want["reference"] and got["passed"] is want["passed"] is True
