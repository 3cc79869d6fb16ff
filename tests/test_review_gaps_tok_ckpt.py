"""Gaps found by a mutation review of src/mamba_deploy/tokenizer.py and src/mamba_deploy/checkpoint.py
(special tokens, SentencePiece, transformers' tokenizers; hub resolution, shard indexes, NaN/inf
refusal, vocab padding, stored dtype, sharded saving): each test fails on a one-line planted bug
that the rest of the suite let through, and passes on the reviewed code.

References, never the code under test: transformers' own tokenizer and model loaded from the same
files, `tokenizers` and sentencepiece themselves, safetensors' own reader, torch's own safe
unpickler, and plain arithmetic on the files a test writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_hf_model, rel_err

from mamba_deploy import load_model, save_checkpoint
from mamba_deploy.errors import CheckpointError, ConfigError, ModelNotFoundError
from mamba_deploy.tokenizer import load_tokenizer

TEXTS = ["def main", "main def main", ""]


def _ids(n=23, vocab=125):
    torch.manual_seed(5)
    return torch.randint(0, vocab, (2, n))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits


# ============================================================================ tokenizer.py

def _added_token(content: str) -> dict:
    """A special token as transformers serializes it in tokenizer_config.json (an AddedToken)."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "rstrip": False,
            "normalized": False, "single_word": False, "special": True}


def _llama_style_json(folder: Path) -> None:
    """tokenizer.json whose post-processor prepends <s> (as Llama / Mistral ones do), with a chat
    end token <|im_end|> that is not one of the names eos falls back to."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 3, "def": 4, "main": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.save(str(folder / "tokenizer.json"))


def test_tokenizer_json_specials_and_plain_encode_match_transformers(tmp_path):
    """bos / eos given as AddedToken dicts (what save_pretrained writes) and encode without the
    post-processor's <s> (chat templates write their own): as transformers' tokenizer reads them."""
    from transformers import AutoTokenizer

    _llama_style_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": _added_token("<s>"),
        "eos_token": _added_token("<|im_end|>"), "unk_token": "<unk>"}))
    ref, ours = AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)
    assert (ours.eos_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)
    assert ref.eos_token_id != ref.bos_token_id
    for text in TEXTS:
        assert ours.encode(text) == ref(text).input_ids
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.encode("def", add_special_tokens=False) != ours.encode("def")  # the <s> is really there


def _sentencepiece_blob(**kw) -> bytes:
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from test_gguf_spm import _train

    return _train(**kw)


@pytest.mark.parametrize("add_bos", [True, False])
def test_transformers_tokenizer_path_matches_transformers(tmp_path, add_bos):
    """A tokenizer.model with a tokenizer_config.json (no tokenizer.json) goes through transformers,
    whose config decides add_bos_token and adds <|im_end|> past the SentencePiece pieces: ids,
    specials, vocabulary size and unknown tokens as transformers' tokenizer has them."""
    from transformers import AutoTokenizer

    (tmp_path / "tokenizer.model").write_bytes(_sentencepiece_blob())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "add_bos_token": add_bos}))
    ref, ours = AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)
    texts = ["hello world def main", "x <|im_end|> y", "Zürich 🐍"]
    assert [ours.encode(t) for t in texts] == [ref(t).input_ids for t in texts]
    assert [ours.encode(t, add_special_tokens=False) for t in texts] == [
        ref.encode(t, add_special_tokens=False) for t in texts]
    assert (ours.eos_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)
    assert ours.vocab_size == len(ref) > ref.vocab_size  # <|im_end|> is an added token
    assert ours.token_to_id("no-such-piece-xyz") is None and "no-such-piece-xyz" not in ref.get_vocab()
    assert ours.token_to_id("<unk>") == ref.unk_token_id
    assert ours.token_to_id("<|im_end|>") == ref.convert_tokens_to_ids("<|im_end|>")


def test_sentencepiece_ids_at_zero_and_at_the_end(tmp_path):
    """A bare tokenizer.model.v3 read by sentencepiece: bos id 0 is an id (not "none"), encode
    without special tokens is sentencepiece's own, and an id one past the pieces has no token."""
    import sentencepiece as spm

    blob = _sentencepiece_blob(unk_id=3, bos_id=0, eos_id=1, pad_id=2)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    (tmp_path / "tokenizer.model.v3").write_bytes(blob)
    ours = load_tokenizer(tmp_path)
    assert (ours.bos_token_id, ours.eos_token_id) == (sp.bos_id(), sp.eos_id()) == (0, 1)
    for text in ["hello world", " def main():\n    return 0", "Zürich 🐍"]:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text)
        assert ours.encode(text) == sp.encode(text, add_bos=True)
    n = sp.get_piece_size()
    assert ours.id_to_token(n - 1) == sp.id_to_piece(n - 1)
    assert ours.id_to_token(n) is None  # as `tokenizers` answers an id past its vocabulary


def test_load_tokenizer_given_a_file_reads_its_folder(tiny_tokenizer):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json"))
    ours = load_tokenizer(tiny_tokenizer / "tokenizer.json")
    text = "the quick brown fox, hello mamba"
    assert ours.encode(text) == ref.encode(text).ids
    assert ours.eos_token_id == ref.token_to_id("<|endoftext|>")


def test_tokenizer_of_exactly_an_eighth_of_the_rows_loads(hf_checkpoint, tmp_path):
    """The size check refuses tokenizers *under* 1/8 of the embedding rows; exactly 1/8 is allowed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src, _ = hf_checkpoint("mamba")
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    words = ["[UNK]"] + [f"w{i}" for i in range(rows // 8 - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    assert tok.get_vocab_size() * 8 == rows
    assert load_tokenizer(folder).encode("w1 w2") == tok.encode("w1 w2").ids


def test_corrupt_sentencepiece_and_config_files_are_config_errors(tmp_path):
    """A file that is there but unreadable is a ConfigError naming it (copy it again), not
    "no tokenizer" (ModelNotFoundError) nor an error from deep inside a library."""
    cases = {  # folder -> {file: bytes}; the file the error must name
        "garbage_spm": ({"tokenizer.model": b"\x0a\xff\xff not a model"}, "tokenizer.model"),
        "empty_spm": ({"tokenizer.model.v3": b""}, "tokenizer.model.v3"),
        "list_config": ({"tokenizer_config.json": b"[]"}, "tokenizer_config.json"),
        "bad_config_beside_spm": ({"tokenizer_config.json": b"{not json", "tokenizer.model": _sentencepiece_blob()},
                                  "tokenizer_config.json"),
    }
    (tmp_path / "json_only").mkdir()
    _llama_style_json(tmp_path / "json_only")
    for name, (files, culprit) in cases.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "json_only", folder) if name == "list_config" else folder.mkdir()
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
        with pytest.raises(ConfigError, match=rf"cannot read .*{culprit}"):
            load_tokenizer(folder)


# ============================================================================ checkpoint.py

def test_local_looking_paths_are_not_sent_to_the_hub(tmp_path, monkeypatch):
    """Strings that cannot be a hub id (two slashes, a .gguf / .json name, a first part that is a
    local folder) are a missing local path, said at once; "org/name" still goes to the hub."""
    from mamba_deploy import hub

    asked = []
    monkeypatch.setattr(hub, "_download", lambda s, weights=True: asked.append(s) or tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for s in ["no/such/path", "org/model.gguf", "org/config.json", "models/typo"]:
        with pytest.raises(ModelNotFoundError, match="no such file or folder"):
            hub.resolve(s)
    assert asked == []
    assert hub.resolve("org/name") == tmp_path and asked == ["org/name"]


def test_hub_patterns_ignore_weights_in_sub_folders():
    """A repo whose only top-level weights are a .bin, with an ONNX export's .safetensors in a
    sub-folder: the .bin is fetched (allow_patterns' * matches across '/')."""
    import fnmatch

    from mamba_deploy.hub import hub_patterns

    names = ["config.json", "weights.bin", "onnx/model.safetensors"]
    patterns = hub_patterns(names)
    assert [n for n in names if n.endswith((".bin", ".safetensors")) and any(
        fnmatch.fnmatch(n, p) for p in patterns)] == ["weights.bin"]


def _fake_hub(monkeypatch, snapshot_download):
    import huggingface_hub

    from mamba_deploy import hub

    class Unlisted:  # listing fails (private repo without token, flaky network): guess patterns
        def list_repo_files(self, repo_id, revision=None):
            raise OSError("cannot list")

    monkeypatch.setattr(hub, "_hub_resolves", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", Unlisted)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return hub


def test_unlisted_repo_falls_back_to_bin_weights(monkeypatch, tmp_path):
    def bin_only(repo_id, allow_patterns, revision=None):  # no .safetensors: only a pattern with *.bin finds weights
        if "*.bin" not in allow_patterns:
            raise FileNotFoundError("no weights matched")
        (tmp_path / "pytorch_model.bin").touch()
        return str(tmp_path)

    assert _fake_hub(monkeypatch, bin_only)._download("org/old-model") == tmp_path


def test_failed_download_reports_the_first_error(monkeypatch):
    errors = iter([PermissionError("401 gated repo"), FileNotFoundError("no weights matched")])

    def failing(repo_id, allow_patterns, revision=None):
        raise next(errors)

    with pytest.raises(ModelNotFoundError, match="PermissionError: 401 gated repo"):
        _fake_hub(monkeypatch, failing)._download("org/gated")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_config_json_wins_over_params_json(hf_checkpoint, tmp_path):
    """Mamba-Codestral's hub repo holds both; the HF weights fetched go with config.json."""
    from test_mistral import PARAMS

    src, hf = hf_checkpoint("mamba2_g2")
    folder = _copy(src, tmp_path / "both")
    (folder / "params.json").write_text(json.dumps(PARAMS))  # another model's params (dim 64, not 32)
    ids = _ids()
    assert rel_err(load_model(folder)(ids).logits, _hf_logits(hf, ids)) <= 1e-4


def test_shard_index_without_weight_map_is_a_checkpoint_error(hf_checkpoint, tmp_path):
    folder = _copy(hf_checkpoint("mamba")[0], tmp_path / "idx")
    (folder / "model.safetensors").unlink()  # a single file beside an index is read first (transformers' order)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="not a valid shard index"):
        load_model(folder)


def test_unnamed_safetensors_preferred_over_a_stray_bin(hf_checkpoint, tmp_path):
    src, hf = hf_checkpoint("mamba")
    folder = _copy(src, tmp_path / "named")
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    torch.save(build_hf_model("mamba", seed=9).state_dict(), folder / "other.bin")  # other weights
    ids = _ids()
    assert rel_err(load_model(folder)(ids).logits, _hf_logits(hf, ids)) <= 1e-4


class _Payload:
    """Pickles as a call of Path.touch: what torch's weights_only unpickler must refuse to run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_bin_with_code_in_its_pickle_is_refused_unrun(hf_checkpoint, tmp_path):
    import pickle

    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(hf_checkpoint("mamba")[0] / "config.json", folder)
    marker = tmp_path / "ran"
    torch.save({"backbone.norm_f.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):  # the reference: torch's own safe loader refuses it
        torch.load(folder / "pytorch_model.bin", weights_only=True)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(folder)
    assert not marker.exists()


def test_mamba_ssm_bin_with_the_embedding_last_loads(hf_checkpoint, tmp_path):
    """The layout is decided per key: a mamba_ssm state dict whose embedding comes after the layers
    (any order torch.save was given) still renames backbone.embedding."""
    src, hf = hf_checkpoint("mamba")
    out = save_checkpoint(load_model(src), tmp_path / "ssm", fmt="mamba_ssm")
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in sd
    torch.save(dict(sorted(sd.items(), key=lambda kv: kv[0] == "backbone.embedding.weight")),
               out / "pytorch_model.bin")
    ids = _ids()
    assert rel_err(load_model(out)(ids).logits, _hf_logits(hf, ids)) <= 1e-4


def _unpadded(tmp_path, vocab=125):
    """An untied transformers Mamba2 of `vocab` rows, its config.json asking for a pad multiple of 8:
    embedding and lm_head are padded to 128 rows on load."""
    hf = build_hf_model("mamba2_g2", seed=2, vocab_size=vocab)
    hf.save_pretrained(tmp_path / "pad")
    cfg = json.loads((tmp_path / "pad" / "config.json").read_text())
    (tmp_path / "pad" / "config.json").write_text(json.dumps({**cfg, "pad_vocab_size_multiple": 8}))
    return tmp_path / "pad", hf


def test_vocab_padded_on_load_keeps_real_logits_and_zero_padding(tmp_path):
    """Padding is asked for by unpadded_vocab_size (what to_hf_dict writes for a mamba_ssm model's
    50277 of 50280 ids); a bare pad_vocab_size_multiple is ignored, as transformers does."""
    folder, hf = _unpadded(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 128, "unpadded_vocab_size": 125}))
    model = load_model(folder)
    assert model.config.padded_vocab_size == 128
    ids = _ids()
    logits = model(ids).logits
    assert rel_err(logits[..., :125], _hf_logits(hf, ids)) <= 1e-4
    assert torch.equal(logits[..., 125:], torch.zeros_like(logits[..., 125:]))  # h . 0 = 0 exactly


def test_one_vocab_row_short_is_refused(tmp_path):
    folder, _ = _unpadded(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 126}))  # file: 125 rows
    with pytest.raises(CheckpointError, match="125 vocab rows, fewer than config.json's vocab_size 126"):
        load_model(folder)


def test_infinite_weight_is_refused_like_nan(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_checkpoint("mamba")[0], tmp_path / "inf")
    sd = load_file(folder / "model.safetensors")
    sd["backbone.layers.1.mixer.D"][0] = float("inf")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN or infinite values in backbone.layers.1.mixer.D"):
        load_model(folder)


def test_sharding_limits_and_index_total(hf_checkpoint, tmp_path):
    """A tensor larger than the limit gets a shard of its own (no empty shards); a limit equal to
    the total fits in one file; the index's total_size is in bytes. Read back by safetensors and
    loaded by transformers."""
    import transformers
    from safetensors import safe_open

    src, hf = hf_checkpoint("mamba")
    model = load_model(src)
    one = save_checkpoint(model, tmp_path / "one")
    with safe_open(str(one / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_tensor(k).nbytes for k in f.keys()}
    total = sum(sizes.values())
    assert sorted(p.name for p in save_checkpoint(model, tmp_path / "fit", max_shard_bytes=total).glob(
        "*.safetensors")) == ["model.safetensors"]

    each = save_checkpoint(model, tmp_path / "each", max_shard_bytes=1)
    index = json.loads((each / "model.safetensors.index.json").read_text())
    shards = sorted(each.glob("model-*.safetensors"))
    assert len(shards) == len(sizes) and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    for p in shards:
        with safe_open(str(p), "pt") as f:
            assert len(list(f.keys())) == 1
    assert index["metadata"]["total_size"] == total
    back = transformers.AutoModelForCausalLM.from_pretrained(each).eval()
    ids = _ids()
    assert rel_err(_hf_logits(back, ids), _hf_logits(hf, ids)) <= 1e-4


def test_stored_dtype_skips_int_tensors_and_bin_only_folders(tmp_path):
    """Without a dtype in config.json: the first *float* tensor decides (an int step counter may
    sort first), in safetensors and in a pytorch_model.bin (mamba_ssm checkpoints: a convert of one
    without --dtype kept fp16 only in the safetensors case and wrote fp32 from a .bin)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mamba_deploy.checkpoint import SAFETENSORS_FLOATS, stored_dtype

    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "config.json").write_text("{}")
    save_file({"a_step": torch.zeros(1, dtype=torch.int64), "b.weight": torch.zeros(2, dtype=torch.float16)},
              str(tmp_path / "st" / "model.safetensors"))
    with safe_open(str(tmp_path / "st" / "model.safetensors"), "pt") as f:
        assert list(f.keys())[0] == "a_step"
        want = SAFETENSORS_FLOATS[f.get_slice("b.weight").get_dtype()]
    assert stored_dtype(tmp_path / "st") == want == torch.float16

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 8}))
    torch.save({"a_step": torch.zeros(1, dtype=torch.int64), "x": torch.zeros(1, dtype=torch.bfloat16)},
               tmp_path / "bin" / "pytorch_model.bin")
    assert stored_dtype(tmp_path / "bin") == torch.bfloat16


def test_load_model_device_config_path_and_no_grad(hf_checkpoint):
    """A config.json path loads its folder; the meta device is refused up front; parameters come
    back without requires_grad (inference: no autograd graph through the in-place state)."""
    src, hf = hf_checkpoint("mamba")
    model = load_model(src / "config.json")
    ids = _ids()
    assert rel_err(model(ids).logits, _hf_logits(hf, ids)) <= 1e-4
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="'meta' is not supported"):
        load_model(src, device="meta")


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece"])
def test_gguf_beside_its_tokenizer_files_passes_them_on_unchanged(kind, tiny_tokenizer, tmp_path):
    """A checkpoint saved from a GGUF that sits in its source folder carries that folder's own
    tokenizer files byte for byte (generation_config.json, a Mistral tokenizer.model.v3), not ones
    rebuilt from the GGUF's vocabulary."""
    pytest.importorskip("gguf")
    from mamba_deploy.tokenizer_files import TOKENIZER_FILES
    from mamba_deploy.export.gguf import export_gguf

    folder = tmp_path / "src"
    if kind == "tokenizer.json":
        build_hf_model("mamba").save_pretrained(folder)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_tokenizer / f, folder)
        (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    else:
        build_hf_model("mamba2", seed=1, vocab_size=416).save_pretrained(folder)
        (folder / "tokenizer.model.v3").write_bytes(_sentencepiece_blob())
    gguf_file = export_gguf(folder, folder / "model.gguf")
    out = save_checkpoint(load_model(gguf_file), tmp_path / "out")
    src_files = [n for n in TOKENIZER_FILES if (folder / n).exists()]
    assert len(src_files) >= (3 if kind == "tokenizer.json" else 1)
    assert sorted(n for n in TOKENIZER_FILES if (out / n).exists()) == sorted(src_files)
    assert all((out / n).read_bytes() == (folder / n).read_bytes() for n in src_files)


# ----------------------------------------------------------------------------- real bug (fixed)

def test_hub_download_fetches_the_chat_template_file(tiny_tokenizer, tmp_path):
    """transformers >= 4.49 saves a chat template as chat_template.jinja, not in tokenizer_config.json;
    the hub download's allow_patterns left it out, so `chat` on a hub id said "no chat template".
    The download is simulated with huggingface_hub's own pattern filter over the files
    save_pretrained wrote; the reference template is transformers' own reading of the source."""
    from huggingface_hub.utils import filter_repo_objects
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from mamba_deploy.hub import hub_patterns

    src = tmp_path / "repo"
    build_hf_model("mamba").save_pretrained(src)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_tokenizer))
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    tok.save_pretrained(str(src))
    assert (src / "chat_template.jinja").exists()  # where this transformers writes it
    names = sorted(p.name for p in src.iterdir())
    got = tmp_path / "download"
    got.mkdir()
    for name in filter_repo_objects(names, allow_patterns=hub_patterns(names)):
        shutil.copy(src / name, got / name)
    assert load_tokenizer(got).chat_template == AutoTokenizer.from_pretrained(str(src)).chat_template
