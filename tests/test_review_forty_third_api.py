"""Fixes from the forty-third review's fuzzing of the public Python API: non-finite logits in
generation, make_server's empty host and model name, the tokenizer's and chat's argument types,
verify's artifact_options, and a tokenizer folder that does not exist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_deploy.errors import ConfigError, MambaDeployError, ModelNotFoundError, ShapeError

ROOT = Path(__file__).resolve().parents[1]
DEMO1, DEMO2 = ROOT / "models" / "demo-mamba1", ROOT / "models" / "demo-mamba2"


@pytest.fixture(scope="module")
def nan_model():
    """A demo model whose final norm holds a NaN: every logit is NaN."""
    from mamba_deploy import load_model

    m = load_model(DEMO1)
    with torch.no_grad():
        m.backbone.norm_f.weight[0] = float("nan")
    return m


@pytest.fixture(scope="module")
def demo2_runner():
    from mamba_deploy.runners import open_runner

    r = open_runner(DEMO2, "torch")
    yield r
    r.close()


@pytest.fixture(scope="module")
def tok():
    from mamba_deploy.tokenizer import load_tokenizer

    return load_tokenizer(DEMO2)


# ------------------------------------------------------------------ A2: non-finite logits

@pytest.mark.parametrize("stops", [[], None])
def test_greedy_generation_on_nan_logits_raises_instead_of_emitting_token_0(nan_model, stops):
    """Before: argmax over NaN logits gave id 0 at every step ([[0, 0, 0]]), or, with id 0 the
    EOS, an empty completion that "stopped"."""
    with pytest.raises(ShapeError, match=r"row 0's logits are not finite \(largest nan\).*mamba-deploy verify"):
        nan_model.generate([[1, 2]], max_new_tokens=3, stop_token_ids=stops)


@pytest.mark.parametrize("seed", [None, 7])
def test_sampling_on_nan_logits_raises_the_same_typed_error(nan_model, seed):
    """Before: FloatingPointError with a seed, torch.multinomial's RuntimeError without one."""
    with pytest.raises(ShapeError, match="row 0's logits are not finite"):
        nan_model.generate([[1, 2]], max_new_tokens=3, temperature=0.8, seed=seed)


def test_sample_names_the_row_whose_logits_are_not_finite():
    from mamba_deploy.generation import SamplingConfig, inverse_cdf, row_generators, sample

    good = [0.0, 1.0, 0.5, -float("inf")]  # some -inf (a padded vocabulary) is fine
    for bad, shown in ((float("inf"), "inf"), (float("nan"), "nan")):
        logits = torch.tensor([good, [0.0, bad, 0.5, 1.0]])
        for cfg, gen in ((SamplingConfig(), None), (SamplingConfig(temperature=1.0), None),
                         (SamplingConfig(temperature=1.0), row_generators(3, 2))):
            with pytest.raises(ShapeError, match=rf"row 1's logits are not finite \(largest {shown}\)"):
                sample(logits, cfg, generator=gen)
    every_token_ruled_out = torch.tensor([good, [-float("inf")] * 4])
    with pytest.raises(ShapeError, match=r"row 1's logits are not finite \(largest -inf\)"):
        sample(every_token_ruled_out, SamplingConfig())
    assert sample(torch.tensor([good, good]), SamplingConfig()).tolist() == [1, 1]
    with pytest.raises(MambaDeployError, match="row 1's probabilities are NaN"):  # was a FloatingPointError
        inverse_cdf(torch.tensor([[0.5, 0.5], [0.0, 0.0]]), [0.3, 0.3])


# ------------------------------------------------------------------ A4, A9, B8: make_server

def test_make_server_refuses_an_empty_host(demo2_runner):
    """Before: "" bound every interface (0.0.0.0) with allowed_hosts ("*",), Host checks off."""
    from mamba_deploy.serve import make_server

    for host in ("", "  "):
        with pytest.raises(ConfigError, match=r"empty, which would listen on every interface; use \"127.0.0.1\""):
            make_server(demo2_runner, host=host, port=0)


@pytest.mark.parametrize("name", [5, "", " ", b"m"])
def test_make_server_refuses_a_model_name_that_is_not_a_non_empty_str(demo2_runner, name):
    """Before: model_name=5 served "id": 5 in /v1/models and 404'd a request naming "5"."""
    from mamba_deploy.serve import make_server

    with pytest.raises(ConfigError, match="model_name must be a non-empty str"):
        make_server(demo2_runner, port=0, model_name=name)


def test_make_server_refuses_allowed_hosts_that_are_not_strings(demo2_runner):
    """Before: AttributeError: 'int' object has no attribute 'strip'."""
    from mamba_deploy.serve import make_server
    from mamba_deploy.serve_http import check_allowed_hosts

    with pytest.raises(ConfigError, match=r"allowed_hosts must be host name strings .* got int 1"):
        make_server(demo2_runner, port=0, allowed_hosts=[1, 2])
    with pytest.raises(ConfigError, match="got NoneType None"):
        check_allowed_hosts(["localhost", None])
    assert check_allowed_hosts(["LocalHost", "[::1]"]) == ("localhost", "::1")


# ------------------------------------------------------------------ A5, B10: Tokenizer argument types

def test_encode_batch_refuses_a_single_text(tok):
    """Before: encode_batch("def f") encoded each character as its own text; None: raw TypeError."""
    for texts in ("def f", b"def", None, 3):
        with pytest.raises(ConfigError, match="encode_batch takes a list of texts"):
            tok.encode_batch(texts)
    assert tok.encode_batch(("def f", "x")) == [tok.encode("def f"), tok.encode("x")]


def test_id_to_token_takes_integer_ids_only(tok):
    """Before: 1.7 silently gave id 1's token; "a" / None raised int()'s ValueError / TypeError."""
    for bad in (1.7, "a", None, True, torch.tensor(1.0)):
        with pytest.raises(ShapeError, match="a token id must be an integer"):
            tok.id_to_token(bad)
    one = tok.id_to_token(1)
    assert one is not None
    assert tok.id_to_token(np.int64(1)) == tok.id_to_token(torch.tensor(1)) == one
    assert tok.id_to_token(-1) is None and tok.id_to_token(10**12) is None


def test_token_to_id_and_add_special_tokens_are_checked(tok):
    with pytest.raises(ConfigError, match="token_to_id takes a token's text"):
        tok.token_to_id(5)
    with pytest.raises(ConfigError, match="add_special_tokens must be True or False, got str 'no'"):
        tok.encode("x", add_special_tokens="no")
    assert tok.token_to_id(tok.id_to_token(1)) == 1
    assert tok.encode("x", add_special_tokens=False) == tok.encode("x")  # no BOS for this tokenizer


# ------------------------------------------------------------------ A8, B9: TextStream and chat

def test_text_stream_refuses_bytes_as_a_prompt(tok):
    """Before: prompt=b"def" was taken as the ids [100, 101, 102]."""
    from mamba_deploy.generation import TextStream

    with pytest.raises(ShapeError, match=r"TextStream's prompt must be .* got bytes b'def'; decode the bytes"):
        TextStream(tok, prompt=b"def")
    with pytest.raises(ShapeError, match="TextStream's prompt must be integer token ids"):
        TextStream(tok, prompt=[1.5, 2.0])
    ids = tok.encode("def f(x):")
    for prompt in ("def f(x):", ids, np.array(ids), torch.tensor(ids)):  # each as before
        assert TextStream(tok, prompt=prompt).inc.ids == ids[-5:]


def test_text_stream_refuses_a_path_at_construction_not_first_push():
    """Before: AttributeError: 'str' object has no attribute 'decode', at the first push."""
    from mamba_deploy.generation import TextStream

    for bad in (str(DEMO2), DEMO2, 5):
        with pytest.raises(ConfigError, match="TextStream needs a loaded tokenizer"):
            TextStream(bad)
    assert TextStream(None).push(3) == ""  # no tokenizer: no text, as before


def test_chat_ids_and_template_readers_check_their_arguments(tok):
    """Before: chat_ids(None, ...) raised AttributeError on bos_token_id; read_template_file(5) and
    read_chat_template(5) raised pathlib's TypeError."""
    from mamba_deploy.chat import chat_ids, read_chat_template, read_template_file

    messages = [{"role": "user", "content": "hi"}]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for bad in (None, str(DEMO2)):
        with pytest.raises(ConfigError, match="chat_ids needs a loaded tokenizer"):
            chat_ids(bad, messages, template=template)
    assert chat_ids(tok, messages, template=template) == tok.encode("hi", add_special_tokens=False)
    with pytest.raises(ConfigError, match="--chat-template must be a path .* got int 5"):
        read_template_file(5)
    with pytest.raises(ConfigError, match="read_chat_template's folder must be a path .* got int 5"):
        read_chat_template(5)


# ------------------------------------------------------------------ B7: verify.open_pair

def test_open_pair_refuses_artifact_options_that_are_not_a_dict():
    """Before: TypeError: 'list' object is not a mapping, after the reference had loaded."""
    from mamba_deploy.verify import open_artifact, open_pair

    for opts in (["x"], "threads=2", {1: 2}):
        with pytest.raises(ConfigError, match="artifact_options must be a dict of open_runner keyword arguments"):
            open_pair(DEMO2, DEMO2, artifact_options=opts)
    with pytest.raises(ConfigError, match="got list"):
        open_artifact(DEMO2, "torch", artifact_options=["x"])


# ------------------------------------------------------------------ C3: a tokenizer folder that does not exist

def test_load_tokenizer_says_a_missing_folder_does_not_exist(tmp_path, monkeypatch):
    """Before: transformers took the path for a hub repo id and blamed its form ("Repo id must be
    in the form 'repo_name' or 'namespace/repo_name'")."""
    from mamba_deploy.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in (tmp_path / "x" / "missing", str(tmp_path / "missing"), "./missing", "../missing/tok",
                 "models/typo", "a/b/c"):
        with pytest.raises(ModelNotFoundError, match="the tokenizer folder .* does not exist; give the folder") as e:
            load_tokenizer(path)
        assert "Repo id" not in str(e.value)
    for bad in (5, ""):
        with pytest.raises(ConfigError, match="load_tokenizer takes a folder"):
            load_tokenizer(bad)
    assert load_tokenizer(DEMO2).encode("def") == load_tokenizer(str(DEMO2 / "tokenizer.json")).encode("def")
