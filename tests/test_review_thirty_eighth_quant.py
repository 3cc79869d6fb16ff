"""Thirty-eighth review, quantized checkpoints: `save_quantized` wrote config.json with the model's
own model_type (mamba / falcon_mamba / mamba2) beside a `quantization_config` transformers does not
know, so `AutoModelForCausalLM.from_pretrained(folder)` built the float model with random weights in
place of the packed ones and said so in a warning only (garbage text). The folder now carries a
model_type and architecture no other loader knows (transformers raises naming it; llama.cpp's
converter stops at the architecture), and mamba-deploy still loads it, and the folders written
before (the model's own model_type), with the same logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba_deploy import load_model
from mamba_deploy.errors import ConfigError
from mamba_deploy.quant import METHODS, quantize, save_quantized

transformers = pytest.importorskip("transformers")

CALIB = dict(calib_ids=torch.arange(4096) * 7919 % 128, n_calib=4, calib_len=64, progress=False)
GROUP = 32  # tiny models: d_model 32, d_inner 64
# every method's options on the tiny models (int4 groups must divide 32)
OPTIONS = {m: (dict(group_size=GROUP) if METHODS[m]["format"] == "int4" else {}) for m in METHODS}
KINDS = ("mamba", "falcon_mamba", "mamba2")
HF_TYPES = {"mamba", "falcon_mamba", "mamba2"}  # the model_types transformers builds a Mamba from
CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


def _ids(n=2, length=24, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _quantized(hf_checkpoint, tmp_path, kind, method, name="q"):
    """(folder written by save_quantized, the in-memory quantized model, its float folder)."""
    folder, _ = hf_checkpoint(kind)
    model = quantize(load_model(folder), method, **CALIB, **OPTIONS[method])
    return save_quantized(model, tmp_path / name), model, folder


def _config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def _as_old_layout(folder, dst):
    """A copy of `folder` with config.json as save_quantized wrote it before: the model's own
    model_type and architectures beside quantization_config (a checkpoint users already have)."""
    shutil.copytree(folder, dst)
    cfg = _config(folder)
    own = cfg["mamba_deploy_model_type"]
    arch = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}
    old = {"architectures": [arch[own]], "model_type": own,
           **{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "mamba_deploy_model_type",
                                                        "note")}}
    (dst / "config.json").write_text(json.dumps(old, indent=2))
    return dst


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_transformers_refuses_every_quantized_folder(hf_checkpoint, tmp_path, kind, method):
    """from_pretrained raises (not warns and loads random weights), naming the model_type; the
    config.json says what the folder is for a reader who opens it."""
    out, _, _ = _quantized(hf_checkpoint, tmp_path, kind, method)
    with pytest.raises(ValueError, match="mamba_deploy_quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ValueError, match="mamba_deploy_quantized"):
        transformers.AutoConfig.from_pretrained(out)
    cfg = _config(out)
    assert cfg["model_type"] not in HF_TYPES and "mamba-deploy" in cfg["note"]
    assert cfg["quantization_config"]["method"] == method


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_mamba_deploy_loads_the_folder_transformers_refuses(hf_checkpoint, tmp_path, kind, method):
    """load_model and the torch runner read the folder back bit for bit (the in-memory quantized
    model's logits), with its config and quantization intact."""
    from mamba_deploy.runners import open_runner

    out, model, _ = _quantized(hf_checkpoint, tmp_path, kind, method)
    assert _config(out)["model_type"] not in HF_TYPES  # the folder transformers refuses
    ids = _ids()
    reloaded = load_model(out)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert reloaded.config == model.config and reloaded.config.hf_model_type == kind
    assert reloaded.quantization_config == model.quantization_config
    runner = open_runner(out)
    try:
        got, _ = runner.prefill(ids, runner.new_state(2))
    finally:
        runner.close()
    want = _logits(model, ids)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["int8", "int4", "awq"])
def test_folder_in_the_old_layout_still_loads(hf_checkpoint, tmp_path, kind, method):
    """A folder save_quantized wrote before (config.json with the model's own model_type) loads
    as it did, with the same logits as the new layout of the same weights."""
    out, model, _ = _quantized(hf_checkpoint, tmp_path, kind, method)
    assert _config(out).get("mamba_deploy_model_type") == kind  # written in the new layout
    old = _as_old_layout(out, tmp_path / "old")
    assert _config(old)["model_type"] == kind and "quantization_config" in _config(old)
    ids = _ids(seed=1)
    reloaded = load_model(old)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert reloaded.config == load_model(out).config
    assert reloaded.quantization_config == model.quantization_config


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.pop("mamba_deploy_model_type"), "mamba_deploy_model_type"),
    (lambda c: c.update(mamba_deploy_model_type="llama"), "mamba_deploy_model_type"),
    (lambda c: c.pop("quantization_config"), "quantization_config"),
])
def test_broken_quantized_marker_is_a_config_error(hf_checkpoint, tmp_path, edit, needle):
    """A quantized config.json missing the model's own model_type, or its quantization_config, is
    a ConfigError naming the key and the fix (not an 'unknown model_type' or a weight mismatch)."""
    out, _, _ = _quantized(hf_checkpoint, tmp_path, "mamba2", "int8")
    cfg = _config(out)
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=needle) as e:
        load_model(out)
    assert "mamba-deploy quantize" in str(e.value)


@pytest.mark.skipif(not CONVERTER.is_file(), reason="llama.cpp's convert_hf_to_gguf.py is not installed")
def test_llamacpp_converter_stops_at_the_architecture(hf_checkpoint, tmp_path):
    """llama.cpp's converter picks its model class by `architectures`: it now stops there, naming
    ours, and writes nothing."""
    out, _, _ = _quantized(hf_checkpoint, tmp_path, "mamba2", "int8")
    gguf = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, str(CONVERTER), str(out), "--outfile", str(gguf)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and not gguf.exists()
    assert "MambaDeployQuantized is not supported" in r.stdout + r.stderr


def test_cli_quantize_then_generate_and_verify(ckpt, tmp_path, capsys):
    """End to end through the CLI: `quantize` writes the folder transformers refuses, and
    `generate` and `verify` (against the float checkpoint) run on it; transformers' tokenizer
    still loads from the folder."""
    from mamba_deploy.cli import main

    src, _ = ckpt("mamba2")
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--method", "int8"]) == 0
    with pytest.raises(ValueError, match="mamba_deploy_quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    assert transformers.AutoTokenizer.from_pretrained(out).encode("hello") != []
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert main(["verify", str(src), str(out), "--lengths", "5", "--batch", "1"]) == 0


def test_a_quantized_folder_with_a_vocab_and_merges_tokenizer_still_tokenizes(tmp_path):
    """No tokenizer.json and no tokenizer_class: AutoTokenizer picks the class from config.json's
    model_type, which the quantized folder's marker hid (a generic class that could not build).
    The ids against the `tokenizers` library on the original tokenizer.json."""
    import json
    import shutil
    from pathlib import Path

    from tokenizers import Tokenizer as HFTokenizer

    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize, save_quantized

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    src = tmp_path / "vm"
    shutil.copytree(demo, src)
    t = json.loads((src / "tokenizer.json").read_text())
    (src / "vocab.json").write_text(json.dumps(t["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"]["merges"]]
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (src / "tokenizer.json").unlink()
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("tokenizer_class", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    save_quantized(quantize(load_model(src), "int8"), tmp_path / "q")
    text = "def main(args):\n    return sorted(args)"
    want = HFTokenizer.from_file(str(demo / "tokenizer.json")).encode(text).ids
    assert load_model(tmp_path / "q").tokenizer.encode(text) == want
