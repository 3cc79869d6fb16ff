"""mistral_inference checkpoints (Mamba-Codestral's layout: params.json, consolidated.safetensors
with "model."-prefixed mamba_ssm names, a SentencePiece tokenizer.model.v3), and the hub download
that fetches one set of weights from a repo holding two.

The reference is transformers' Mamba2 on the same weights (what its Codestral conversion script
builds: params.json's values at mamba_ssm's Mamba2 defaults, "model." stripped) and sentencepiece
itself for the tokenizer."""

from __future__ import annotations

import fnmatch
import io
import json
import random
import sys

import pytest
import torch

from mamba_deploy.checkpoint import load_model, read_config, stored_dtype
from mamba_deploy.hub import hub_patterns
from mamba_deploy.config import MambaConfig
from mamba_deploy.errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError

from conftest import build_hf_model, rel_err

# a Mamba-Codestral-shaped params.json at toy size: d_state 128 and headdim 64 are fixed by
# mamba_ssm's Mamba2 defaults, so dim 64 gives 2 heads, which 2 groups divide
PARAMS = {"dim": 64, "n_layers": 2, "vocab_size": 90, "n_groups": 2, "rms_norm": True, "residual_in_fp32": True,
          "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": False, "model_type": "mamba"}
HF_SHAPE = dict(hidden_size=64, state_size=128, head_dim=64, num_heads=2, n_groups=2, chunk_size=256,
                vocab_size=96, num_hidden_layers=2, tie_word_embeddings=False)
TOL_FP32 = 1e-5  # same math in float32 (measured ~3e-7)


def _mistral_folder(path, hf_model, dtype=torch.float32, params=PARAMS):
    """hf_model's weights written the way mistral_inference stores them."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    sd = {"model." + k.replace("backbone.embeddings.", "backbone.embedding."): v.to(dtype).contiguous()
          for k, v in hf_model.state_dict().items()}
    save_file(sd, str(path / "consolidated.safetensors"))
    return path


@pytest.fixture(scope="module")
def codestral(tmp_path_factory):
    hf = build_hf_model("mamba2_g2", seed=3, **HF_SHAPE)
    return _mistral_folder(tmp_path_factory.mktemp("codestral"), hf), hf


# ----------------------------------------------------------------------------- config

def test_params_json_reads_as_mamba_ssm_mamba2_defaults(codestral):
    folder, hf = codestral
    cfg = read_config(folder)
    assert (cfg.arch, cfg.d_model, cfg.n_layer, cfg.ngroups, cfg.source) == ("mamba2", 64, 2, 2, "mistral")
    assert (cfg.d_state, cfg.headdim, cfg.nheads, cfg.d_conv, cfg.chunk_size) == (128, 64, 2, 4, 256)
    assert cfg.padded_vocab_size == hf.config.vocab_size == 96
    assert not cfg.tie_embeddings and not cfg.norm_before_gate and cfg.rmsnorm


def test_transformer_params_json_is_refused_by_name():
    mistral_7b = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
                  "n_kv_heads": 8, "norm_eps": 1e-5, "vocab_size": 32000}
    with pytest.raises(UnsupportedArchitectureError, match="'transformer'.*model_type 'mamba'"):
        MambaConfig.from_dict(mistral_7b)


def test_params_json_missing_a_required_key_names_it():
    with pytest.raises(ConfigError, match="'n_groups'"):
        MambaConfig.from_dict({k: v for k, v in PARAMS.items() if k != "n_groups"})
    with pytest.raises(ConfigError, match="n_layers"):
        MambaConfig.from_dict({**PARAMS, "n_layers": 0})


@pytest.mark.parametrize("dialect", ["mistral", "mamba_ssm"])
def test_layernorm_blocks_are_refused_not_loaded_as_rmsnorm(dialect):
    d = {**PARAMS} if dialect == "mistral" else {"d_model": 64, "n_layer": 2, "vocab_size": 90,
                                                  "ssm_cfg": {"layer": "Mamba2"}}
    with pytest.raises(UnsupportedArchitectureError, match="rms_norm=false.*LayerNorm"):
        MambaConfig.from_dict({**d, "rms_norm": False})
    with pytest.raises(ConfigError, match="rms_norm='yes' must be true or false"):
        MambaConfig.from_dict({**d, "rms_norm": "yes"})


# ----------------------------------------------------------------------------- weights

def test_consolidated_checkpoint_matches_transformers(codestral):
    folder, hf = codestral
    model = load_model(folder)
    torch.manual_seed(0)
    for b, length in ((1, 1), (3, 7), (2, 40)):
        ids = torch.randint(0, PARAMS["vocab_size"], (b, length))
        with torch.no_grad():
            ref = hf(ids).logits
        assert rel_err(model(ids).logits, ref) < TOL_FP32


def test_bf16_consolidated_file_keeps_its_dtype(tmp_path, codestral):
    from mamba_deploy.verify import infer_artifact_dtype

    folder = _mistral_folder(tmp_path / "bf16", codestral[1], dtype=torch.bfloat16)
    assert stored_dtype(folder) == torch.bfloat16  # params.json has no torch_dtype: read from the file
    assert infer_artifact_dtype(folder) == "bf16"  # verify then uses the bf16 limits
    assert stored_dtype(codestral[0]) == torch.float32


def test_cli_inspect_and_onnx_export_take_the_mistral_folder(codestral, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the ONNX export validates itself with onnxruntime")
    from mamba_deploy.cli import main

    folder, hf = codestral
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["architecture"], info["ngroups"], info["padded_vocab_size"]) == ("mamba2", 2, 96)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(folder), str(out)]) == 0  # validates against PyTorch itself
    from mamba_deploy.runners import open_runner

    runner = open_runner(out, backend="onnx")
    ids = torch.randint(0, 90, (2, 9))
    logits, _ = runner.prefill(ids, runner.new_state(2))
    with torch.no_grad():
        assert rel_err(logits, hf(ids).logits) < 1e-4


# ----------------------------------------------------------------------------- tokenizer

def _sentencepiece_model(vocab_size=PARAMS["vocab_size"]) -> bytes:
    spm = pytest.importorskip("sentencepiece", reason="Mistral's tokenizer.model.v3 is a SentencePiece model")
    rng = random.Random(0)
    words = ["def", "main", "return", "print", "hello", "world", "mamba", "state", "space", "model", "code"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", minloglevel=2)
    return buf.getvalue()


def test_tokenizer_model_v3_encodes_as_sentencepiece(codestral, tmp_path):
    import sentencepiece as spm_mod

    from mamba_deploy.tokenizer import load_tokenizer

    blob = _sentencepiece_model()
    (tmp_path / "tokenizer.model.v3").write_bytes(blob)
    sp = spm_mod.SentencePieceProcessor(model_proto=blob)
    tok = load_tokenizer(tmp_path)
    text = "hello mamba world\ndef main(): return code"
    bos = [sp.bos_id()]  # mistral_inference encodes prompts with bos=True
    assert tok.encode(text) == bos + sp.encode(text) and len(tok.encode(text)) > 3
    assert tok.encode_batch([text, "state space"]) == [bos + sp.encode(text), bos + sp.encode("state space")]
    assert tok.decode(tok.encode("hello world")) == "hello world"
    # ids of padded embedding rows (96 rows for 90 pieces) are dropped like `tokenizers` drops them
    assert tok.decode(tok.encode("hello") + [sp.get_piece_size(), 95]) == "hello"
    assert (tok.eos_token_id, tok.bos_token_id, tok.vocab_size) == (sp.eos_id(), sp.bos_id(), sp.get_piece_size())
    assert tok.token_to_id("▁hello") == sp.piece_to_id("▁hello") and tok.token_to_id("no-such-piece") is None


def test_generate_from_text_on_a_mistral_folder_matches_transformers(codestral, tmp_path, capsys):
    import sentencepiece as spm_mod

    from mamba_deploy.cli import main

    folder = tmp_path / "m"
    folder.mkdir()
    for f in ("params.json", "consolidated.safetensors"):
        (folder / f).symlink_to(codestral[0] / f)
    blob = _sentencepiece_model()
    (folder / "tokenizer.model.v3").write_bytes(blob)
    prompt = "hello mamba world"
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "6", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]
    sp = spm_mod.SentencePieceProcessor(model_proto=blob)
    ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
    padded_rows = list(range(PARAMS["vocab_size"], HF_SHAPE["vocab_size"]))  # generate never picks them
    ref = codestral[1].generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                                suppress_tokens=padded_rows)
    assert got["tokens"] == ref[0, ids.shape[1]:].tolist()


def test_tokenizer_model_v3_without_sentencepiece_says_how_to_install(tmp_path, monkeypatch):
    from mamba_deploy.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.model.v3").write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ModelNotFoundError, match="tokenizer.model.v3.*pip install sentencepiece"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- hub download

CODESTRAL_REPO = ["config.json", "params.json", "consolidated.safetensors", "model.safetensors.index.json",
                  "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                  "model-00003-of-00003.safetensors", "tokenizer.model.v3", "tokenizer.json", "README.md"]
WEIGHTS = (".safetensors", ".bin")


def _fetched_weights(names):
    patterns = hub_patterns(names)
    return sorted(n for n in names if n.endswith(WEIGHTS) and any(fnmatch.fnmatch(n, p) for p in patterns))


@pytest.mark.parametrize("names, expected", [
    (CODESTRAL_REPO, [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]),
    (["params.json", "consolidated.safetensors", "tokenizer.model.v3"], ["consolidated.safetensors"]),
    (["config.json", "model.safetensors", "pytorch_model.bin"], ["model.safetensors"]),
    (["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
      "pytorch_model-00002-of-00002.bin", "onnx/model.safetensors"],
     ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]),
    (["config.json", "weights.safetensors"], ["weights.safetensors"]),
    (["config.json", "weights.bin"], ["weights.bin"]),
])
def test_hub_download_fetches_one_set_of_weights(names, expected):
    assert _fetched_weights(names) == expected
    patterns = hub_patterns(names)
    for small in ("config.json", "params.json", "tokenizer.json", "tokenizer.model.v3", "model.safetensors.index.json"):
        assert any(fnmatch.fnmatch(small, p) for p in patterns)


def test_download_lists_the_repo_then_fetches_the_chosen_files(monkeypatch, tmp_path):
    import huggingface_hub

    from mamba_deploy import hub

    calls = []

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            calls.append(("list", repo_id))
            return CODESTRAL_REPO

    def snapshot_download(repo_id, allow_patterns, revision=None):
        calls.append(("get", repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(hub, "_hub_resolves", lambda: True)  # online, whatever this machine is
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub._download("mistralai/Mamba-Codestral-7B-v0.1") == tmp_path
    assert calls == [("list", "mistralai/Mamba-Codestral-7B-v0.1"),
                     ("get", "mistralai/Mamba-Codestral-7B-v0.1", hub_patterns(CODESTRAL_REPO))]

    class Offline:
        def list_repo_files(self, repo_id, revision=None):
            raise OSError("offline")

    def cache_only(repo_id, allow_patterns, revision=None):
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    with pytest.raises(ModelNotFoundError, match="FileNotFoundError: not in the cache.*HF_HUB_OFFLINE"):
        hub._download("org/missing")


def test_download_offline_fails_fast_or_reads_the_cache(monkeypatch, tmp_path):
    """Offline (the hub's host does not resolve), huggingface_hub retried each call for ~25 s
    before the error; now nothing is asked of the network: the cache serves, or the error comes
    at once."""
    import socket

    import huggingface_hub

    from mamba_deploy import hub

    def no_dns(host, *a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    class NoNetwork:
        def list_repo_files(self, repo_id, revision=None):
            raise AssertionError("the network was asked although the host does not resolve")

    cache = {"org/cached": tmp_path}

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False, revision=None):
        if not local_files_only:
            raise AssertionError("a download was attempted offline")
        if repo_id not in cache:
            raise FileNotFoundError("not in the cache")
        return str(cache[repo_id])

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub._download("org/cached") == tmp_path
    with pytest.raises(ModelNotFoundError, match="does not resolve.*not in the local hub cache"):
        hub._download("org/missing")
