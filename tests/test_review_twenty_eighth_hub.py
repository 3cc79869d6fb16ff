"""Twenty-eighth session: how hub ids and weight files are found and read (a review of
checkpoint.py). Hub ids are exercised offline, against a huggingface_hub cache the tests build
(models--ORG--NAME/{blobs,refs,snapshots}) and huggingface_hub's own resolution of it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import rel_err

huggingface_hub = pytest.importorskip("huggingface_hub")


def _add_snapshot(cache: Path, repo_id: str, commit: str, folder: Path, refs=("main",)) -> Path:
    """`folder`'s files as huggingface_hub caches a download of repo_id at `commit`: content-named
    blobs, a snapshot of relative symlinks to them, and refs naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for r in refs:
        (repo / "refs" / r).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / r).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub reads offline (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _logits(model, vocab=128):
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def test_a_cached_hub_id_loads_beside_a_folder_named_after_its_org(hf_checkpoint, hub_cache, tmp_path, monkeypatch):
    """`hf download ORG/A --local-dir ORG/A` leaves ./ORG: every other ORG/B was refused as a
    missing local path. Reference: huggingface_hub's own resolution of the cached id."""
    from huggingface_hub import snapshot_download

    from mamba_deploy import load_model
    from mamba_deploy.errors import ModelNotFoundError

    folder = hf_checkpoint("mamba")[0]
    snap = _add_snapshot(hub_cache, "state-spaces/tiny-hf", "a" * 40, folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "state-spaces" / "other-hf").mkdir(parents=True)
    assert Path(snapshot_download("state-spaces/tiny-hf", local_files_only=True)) == snap
    model = load_model("state-spaces/tiny-hf")
    assert model.source_path.resolve() == snap.resolve()
    assert rel_err(_logits(model), _logits(load_model(folder))) == 0
    with pytest.raises(ModelNotFoundError, match=r"folder 'state-spaces' has no 'typo-hf'.*hf download state-spaces/typo"):
        load_model("state-spaces/typo-hf")


def test_a_revision_is_honoured_by_at_and_by_keyword(hf_checkpoint, hub_cache):
    """There was no way to ask for a branch, tag or commit. Reference: the cache's refs/v2."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import ConfigError

    main, v2 = hf_checkpoint("mamba")[0], hf_checkpoint("mamba2")[0]
    _add_snapshot(hub_cache, "org/tiny", "a" * 40, main)
    _add_snapshot(hub_cache, "org/tiny", "b" * 40, v2, refs=("v2",))
    assert load_model("org/tiny").config.arch == "mamba1"
    for model in (load_model("org/tiny@v2"), load_model("org/tiny", revision="v2"), load_model(f"org/tiny@{'b' * 40}")):
        assert model.config.arch == "mamba2"
        assert rel_err(_logits(model), _logits(load_model(v2))) == 0
    with pytest.raises(ConfigError, match="revision='v2' applies to a hub id"):
        load_model(main, revision="v2")


@pytest.mark.parametrize("kind", ["gated", "missing"])
def test_gated_and_missing_repos_say_what_to_do_and_are_not_retried(kind, monkeypatch):
    """The error kept only '401 Client Error.' and suggested going offline; the repo was asked
    three times although the answer cannot change."""
    from huggingface_hub import errors

    from mamba_deploy import checkpoint as ck
    from mamba_deploy import hub
    from mamba_deploy.errors import ModelNotFoundError

    err = {"gated": errors.GatedRepoError, "missing": errors.RepositoryNotFoundError}[kind]
    calls = []

    def listing(self, repo_id, **kw):
        calls.append(repo_id)
        e = err.__new__(err)  # what huggingface_hub raises, without the HTTP response its __init__ reads
        Exception.__init__(e, f"401 Client Error.\n\nCannot access repo {repo_id}. Please log in.")
        raise e

    monkeypatch.setattr(hub, "_hub_resolves", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: calls.append("snapshot"))
    want = {"gated": r"gated repo: accept its terms at https://huggingface.co/org/m, then log in .*Please log in",
            "missing": r"no such model on the hub, or a private one: check the id"}[kind]
    with pytest.raises(ModelNotFoundError, match=want):
        ck.load_model("org/m")
    assert calls == ["org/m"]


def test_a_bin_only_repo_is_fetched_when_the_listing_fails(hf_checkpoint, tmp_path, monkeypatch):
    """With the file listing rate-limited, the first download (*.safetensors) matched no weights
    and was returned as the model; the *.bin set was never tried. The fake download filters the
    repo's files with huggingface_hub's own filter, as snapshot_download does."""
    from huggingface_hub.utils import filter_repo_objects
    from safetensors.torch import load_file

    from mamba_deploy import checkpoint as ck
    from mamba_deploy import hub

    remote = tmp_path / "remote"
    remote.mkdir()
    shutil.copy(hf_checkpoint("mamba")[0] / "config.json", remote)
    torch.save(load_file(hf_checkpoint("mamba")[0] / "model.safetensors"), remote / "pytorch_model.bin")
    out, calls = tmp_path / "snap", []

    def snapshot(repo_id, allow_patterns=None, **kw):
        calls.append(allow_patterns[-1])
        out.mkdir(exist_ok=True)
        for f in filter_repo_objects([p.name for p in remote.iterdir()], allow_patterns=allow_patterns):
            shutil.copy(remote / f, out / f)
        return str(out)

    def rate_limited(self, repo_id, **kw):
        raise RuntimeError("429 Too Many Requests")

    monkeypatch.setattr(hub, "_hub_resolves", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", rate_limited)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    model = ck.load_model("state-spaces/tiny")
    assert calls == ["*.safetensors", "*.bin"]
    assert rel_err(_logits(model), _logits(ck.load_model(hf_checkpoint("mamba")[0]))) == 0


def test_a_pytorch_bin_saved_before_the_zip_format_loads(hf_checkpoint, tmp_path):
    """torch.load(mmap=True) refuses the legacy format, and the file was called corrupt.
    Reference: transformers' from_pretrained on the same folder."""
    import transformers
    from safetensors.torch import load_file

    from mamba_deploy import load_model

    src = hf_checkpoint("mamba")[0]
    folder = tmp_path / "legacy"
    folder.mkdir()
    shutil.copy(src / "config.json", folder)
    torch.save(load_file(src / "model.safetensors"), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(load_model(folder)(ids).logits, want) < 1e-5


def test_special_tokens_map_names_the_eos_as_in_transformers(ckpt, tmp_path):
    """A chat fine-tune's special_tokens_map.json names <|im_end|> as its EOS; tokenizer_config.json
    does not. Generation stopped at the guessed <|endoftext|>. Reference: AutoTokenizer."""
    import transformers
    from tokenizers import AddedToken, Tokenizer

    from mamba_deploy.tokenizer import load_tokenizer

    folder = shutil.copytree(ckpt("mamba")[0], tmp_path / "chat")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    assert theirs.eos_token == "<|im_end|>"
    assert (ours.eos_token_id, ours.bos_token_id) == (theirs.eos_token_id, theirs.bos_token_id)


def test_an_original_mamba_ssm_folder_without_tokenizer_names_the_one_it_uses(hf_checkpoint, tmp_path):
    """state-spaces' original repos ship no tokenizer; the error only said to copy files into the
    (hub cache) folder."""
    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import ModelNotFoundError

    ssm = save_checkpoint(load_model(hf_checkpoint("mamba")[0]), tmp_path / "ssm", fmt="mamba_ssm")
    with pytest.raises(ModelNotFoundError, match="use EleutherAI/gpt-neox-20b's tokenizer"):
        load_model(ssm).tokenizer.encode("hello")


def test_a_hub_tokenizer_is_fetched_without_its_weights(ckpt, hf_checkpoint, tmp_path, monkeypatch):
    """`export gguf --tokenizer EleutherAI/gpt-neox-20b` (what state-spaces' original models use)
    resolved the id as a model and downloaded its 41 GB of weights for a tokenizer.json."""
    pytest.importorskip("gguf")
    from huggingface_hub.utils import filter_repo_objects

    from mamba_deploy import hub
    from mamba_deploy.export.gguf import export_gguf

    remote = tmp_path / "remote"  # the tokenizer's repo: its tokenizer files and weights
    shutil.copytree(ckpt("mamba")[0], remote)
    fetched = []

    class Api:
        def list_repo_files(self, repo_id, revision=None):
            return sorted(p.name for p in remote.iterdir())

    def snapshot(repo_id, allow_patterns=None, revision=None, **kw):
        out = tmp_path / "snap"
        out.mkdir(exist_ok=True)
        for f in filter_repo_objects(sorted(p.name for p in remote.iterdir()), allow_patterns=allow_patterns):
            fetched.append(f)
            shutil.copy(remote / f, out / f)
        return str(out)

    monkeypatch.setattr(hub, "_hub_resolves", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    out = export_gguf(hf_checkpoint("mamba")[0], tmp_path / "m.gguf", outtype="f32", tokenizer="org/tokenizer")
    assert out.exists() and "tokenizer.json" in fetched
    assert not [f for f in fetched if f.endswith((".safetensors", ".bin"))], fetched


def test_generate_with_the_tokenizer_of_another_folder(ckpt, tmp_path, capsys):
    """state-spaces' original checkpoints ship no tokenizer and generate had no way to give one.
    Reference: transformers' greedy generate, prompt encoded by AutoTokenizer from the folder
    that has the tokenizer."""
    import transformers

    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.cli import main

    folder = ckpt("mamba")[0]
    ssm = save_checkpoint(load_model(folder), tmp_path / "ssm", fmt="mamba_ssm")
    for f in ssm.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    prompt = "the quick brown"
    ids = transformers.AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert main(["generate", str(ssm), "--prompt", prompt, "--max-new-tokens", "6", "--stop", "0", "--json",
                 "--tokenizer", str(folder)]) == 0
    got = json.loads(capsys.readouterr().out)[0]["tokens"]
    assert got == want.tolist()[:len(got)] and got
    assert main(["generate", str(ssm), "--prompt", prompt]) == 2  # without it: the error names the fix
    assert "--tokenizer" in capsys.readouterr().err


def test_a_tokenizer_option_is_refused_where_it_cannot_apply(ckpt, tiny_gguf, hf_checkpoint, tmp_path, capsys):
    from mamba_deploy.cli import main

    pytest.importorskip("llama_cpp")
    assert main(["generate", str(tiny_gguf), "--prompt", "hi", "--tokenizer", str(ckpt("mamba")[0])]) == 2
    assert "llama.cpp tokenizes with the GGUF's own vocabulary" in capsys.readouterr().err
    big = tmp_path / "big"  # a tokenizer of more ids than the model's 128
    shutil.copytree(ckpt("mamba")[0], big)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(big / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(200)])
    tok.save(str(big / "tokenizer.json"))
    assert main(["generate", str(ckpt("mamba")[0]), "--prompt", "hi", "--tokenizer", str(big)]) == 2
    assert "more than the model's vocabulary of 128" in capsys.readouterr().err
