"""Checkpoint formats (HF, mamba_ssm, sharded, .bin), config dialects and typed errors."""

import json
import shutil

import pytest
import torch

from conftest import rel_err
from mamba_deploy import MambaConfig, load_model, save_checkpoint
from mamba_deploy.cli import main as cli_main
from mamba_deploy.errors import (CheckpointError, ConfigError, ModelNotFoundError,
                                 UnsupportedArchitectureError)


def _ref_logits(hf, n=23):
    torch.manual_seed(5)
    ids = torch.randint(0, 128, (2, n))
    with torch.no_grad():
        return ids, hf(ids).logits


@pytest.mark.parametrize("kind", ["mamba", "mamba2_g2"])
def test_convert_to_mamba_ssm_and_back(kind, hf_checkpoint, tmp_path):
    folder, hf = hf_checkpoint(kind)
    assert cli_main(["convert", str(folder), str(tmp_path / "ssm"), "--format", "mamba_ssm"]) == 0
    cfg = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert "ssm_cfg" in cfg and cfg["ssm_cfg"].get("layer", "Mamba1") == ("Mamba1" if kind == "mamba" else "Mamba2")
    sd = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)  # what mamba_ssm loads
    assert "backbone.embedding.weight" in sd and "lm_head.weight" in sd  # its load_state_dict is strict
    if json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", True):
        assert sd["lm_head.weight"].untyped_storage().data_ptr() == \
            sd["backbone.embedding.weight"].untyped_storage().data_ptr()  # stored once
    ids, ref = _ref_logits(hf)
    assert rel_err(load_model(tmp_path / "ssm")(ids).logits, ref) <= 1e-4
    # and back to HF: transformers itself must load it
    assert cli_main(["convert", str(tmp_path / "ssm"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_err(back(ids).logits, ref) <= 1e-4


def test_sharded_checkpoint(hf_checkpoint, tmp_path):
    folder, hf = hf_checkpoint("mamba")
    model = load_model(folder)
    save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids, ref = _ref_logits(hf)
    assert rel_err(load_model(tmp_path / "sharded")(ids).logits, ref) <= 1e-4


def test_transformers_sharded_and_bin(hf_checkpoint, tmp_path):
    _, hf = hf_checkpoint("mamba2")
    hf.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    ids, ref = _ref_logits(hf)
    assert rel_err(load_model(tmp_path / "shards")(ids).logits, ref) <= 1e-4
    # pytorch_model.bin via torch.load(weights_only=True)
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "shards" / "config.json", tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert rel_err(load_model(tmp_path / "bin")(ids).logits, ref) <= 1e-4


def test_vocab_padding_mamba_ssm(hf_checkpoint, tmp_path):
    """mamba_ssm configs give the true vocab and a pad multiple; rows beyond it are padding."""
    folder, hf = hf_checkpoint("mamba")
    model = load_model(folder)
    out = save_checkpoint(model, tmp_path / "ssm", fmt="mamba_ssm")
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"], cfg["pad_vocab_size_multiple"] = 125, 8  # 125 -> padded 128
    (out / "config.json").write_text(json.dumps(cfg))
    m2 = load_model(out)
    assert m2.config.padded_vocab_size == 128 and m2.config.vocab_size == 125
    ids, ref = _ref_logits(hf)
    assert rel_err(m2(ids).logits, ref) <= 1e-4


@pytest.mark.parametrize("dtype", ["fp8", torch.int8, torch.bool, torch.float8_e4m3fn])
def test_save_checkpoint_refuses_a_dtype_it_cannot_load(hf_checkpoint, tmp_path, dtype):
    """Before: "fp16" raised a raw RuntimeError ("Invalid device string") (names such as "fp16" are
    now read as their dtypes), and int8 / bool / fp8 cast every tensor (A_log and the norms too)
    into a checkpoint load_model then refused."""
    model = load_model(hf_checkpoint("mamba")[0])
    with pytest.raises(ConfigError, match=r"dtype .* is not one a checkpoint is saved in; pass one of torch.float32"):
        save_checkpoint(model, tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_export_gguf_refuses_a_tokenizer_that_is_not_a_path(hf_checkpoint, tmp_path):
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.gguf import export_gguf

    with pytest.raises(ExportError, match="tokenizer takes a folder, tokenizer file or hub id .*got int 123"):
        export_gguf(hf_checkpoint("mamba")[0], tmp_path / "x.gguf", tokenizer=123)
    assert list(tmp_path.iterdir()) == []


def test_config_dialects():
    hf = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100,
          "num_heads": 8, "head_dim": 16, "n_groups": 2, "state_size": 16,
          "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    c = MambaConfig.from_dict(hf)
    assert (c.arch, c.nheads, c.ngroups, c.dt_limit[1]) == ("mamba2", 8, 2, float("inf"))
    ssm = {"d_model": 64, "n_layer": 2, "vocab_size": 100, "pad_vocab_size_multiple": 16,
           "ssm_cfg": {"layer": "Mamba2", "headdim": 32, "ngroups": 2, "d_state": 64}}
    c2 = MambaConfig.from_dict(ssm)
    assert (c2.arch, c2.headdim, c2.padded_vocab_size, c2.d_state) == ("mamba2", 32, 112, 64)
    c3 = MambaConfig.from_dict({"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": {}})
    assert c3.arch == "mamba1" and c3.resolved_dt_rank == 4
    f = MambaConfig.from_dict({"architectures": ["FalconMambaForCausalLM"], "hidden_size": 32,
                               "num_hidden_layers": 1, "vocab_size": 10})
    assert f.dt_bc_rms and f.arch == "mamba1"
    assert MambaConfig.from_dict(c.to_hf_dict()) == c.replace(source="hf", hf_model_type="mamba2")


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(UnsupportedArchitectureError, match=r"'llama'.*supported:.*mamba2"):
        load_model(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="Mamba3"):
        MambaConfig.from_dict({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {"layer": "Mamba3"}})


def test_inconsistent_config():
    with pytest.raises(ConfigError, match="num_heads"):
        MambaConfig.from_dict({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 1,
                               "vocab_size": 10, "num_heads": 3, "head_dim": 16})


def test_missing_path_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_model(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"state-spaces/mamba-130m-hf.*offline"):
        load_model("state-spaces/mamba-130m-hf")


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_corrupt_safetensors(hf_checkpoint, tmp_path):
    dst = _copy(hf_checkpoint("mamba")[0], tmp_path)
    f = dst / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(dst)


def test_missing_and_wrong_shape_tensors(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy(hf_checkpoint("mamba")[0], tmp_path)
    sd = load_file(dst / "model.safetensors")
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.0.mixer.A_log"] = torch.zeros(3, 3)
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(1)
    save_file(sd, dst / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(dst)
    msg = str(e.value)
    assert "missing tensors: backbone.layers.1.mixer.D" in msg
    assert "backbone.layers.0.mixer.A_log: file (3, 3)" in msg
    assert "unexpected tensors: backbone.layers.0.mixer.extra" in msg


def test_bad_input_shapes(hf_checkpoint):
    from mamba_deploy.errors import ShapeError

    model = load_model(hf_checkpoint("mamba")[0])
    with pytest.raises(ShapeError, match=r"\(batch, seqlen\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        model(torch.full((1, 3), 1000))
    with pytest.raises(ShapeError, match="State.zeros"):
        model(torch.zeros(2, 3, dtype=torch.long), state=model.new_state(1))


def test_inspect_cli(hf_checkpoint, capsys):
    folder, hf = hf_checkpoint("mamba2_g2")
    assert cli_main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["ngroups"] == 2 and info["bytes_on_disk"] > 0
    assert info["state_bytes_per_sequence_fp32"] == 4 * 2 * (
        (64 + 2 * 2 * 16) * 3 + 8 * 8 * 16)


def test_cli_reports_typed_error(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_read_tagged_json_names_file_and_fix(tmp_path):
    """The manifest / sidecar reader: corrupt JSON or another format -> ExportError naming the file
    and the fix; a good file comes back as written."""
    from mamba_deploy.atomic import read_tagged_json, write_json
    from mamba_deploy.errors import ExportError

    p = tmp_path / "manifest.json"
    p.write_text("{not json")
    with pytest.raises(ExportError, match=r"manifest\.json is not valid JSON .*re-export"):
        read_tagged_json(p, "fmt-a", "ONNX manifest", "re-export the model")
    write_json(p, {"format": "fmt-b"})
    with pytest.raises(ExportError, match=r"not a mamba-deploy ONNX manifest \(format='fmt-b'\); re-export"):
        read_tagged_json(p, "fmt-a", "ONNX manifest", "re-export the model")
    write_json(p, [1, 2])
    with pytest.raises(ExportError, match="format='list'"):
        read_tagged_json(p, "fmt-a", "ONNX manifest", "re-export the model")
    write_json(p, {"format": "fmt-a", "x": 1})
    assert read_tagged_json(p, "fmt-a", "ONNX manifest", "re-export the model") == {"format": "fmt-a", "x": 1}


def test_more_bad_inputs_are_typed(hf_checkpoint):
    """Empty sequences, out-of-vocab ids in a decode step, a state of the wrong dtype and a
    negative num_logits_to_keep: ShapeError naming the value, not an error from deep in torch."""
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.state import State

    model = load_model(hf_checkpoint("mamba2")[0])
    with pytest.raises(ShapeError, match="length 0"):
        model(torch.zeros(2, 0, dtype=torch.long))
    st = model.new_state(2)
    with pytest.raises(ShapeError, match="token id 128 outside"):
        model.step(torch.tensor([3, 128]), st)
    with pytest.raises(ShapeError, match="token id -1 outside"):
        model(torch.tensor([[1, -1]]))
    double = State(st.conv.double(), st.ssm.double())
    with pytest.raises(ShapeError, match="conv torch.float64"):
        model(torch.ones(2, 3, dtype=torch.long), state=double)
    ints = State(st.conv.long(), st.ssm)
    with pytest.raises(ShapeError, match="conv torch.int64"):
        model.step(torch.ones(2, dtype=torch.long), ints)
    with pytest.raises(ShapeError, match="num_logits_to_keep"):
        model(torch.ones(1, 3, dtype=torch.long), num_logits_to_keep=-1)
    assert torch.equal(st.conv, torch.zeros_like(st.conv))  # nothing was half-updated


def test_convert_refuses_a_norm_eps_mamba_ssm_cannot_hold(tmp_path, capsys):
    """mamba_ssm's config has no norm epsilon (it is fixed at 1e-5): converting a model with
    another eps would change its outputs silently, so it is refused and nothing is written."""
    from conftest import build_hf_model

    build_hf_model("mamba", layer_norm_epsilon=1e-3).save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "ssm"), "--format", "mamba_ssm"]) == 2
    err = capsys.readouterr().err
    assert "0.001" in err and "--format hf" in err
    assert not (tmp_path / "ssm").exists()
    with pytest.raises(ConfigError, match="fixes the RMSNorm epsilon"):
        load_model(tmp_path / "hf").config.to_mamba_ssm_dict()


def test_convert_keeps_dtype_and_shares_files(tmp_path):
    """Without --dtype an fp16 checkpoint stays fp16 (it was silently doubled to fp32), and the
    safetensors files get the umask's permissions like every other output (they were 0600)."""
    import os

    demo = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "demo-mamba1"
    assert json.loads((demo / "config.json").read_text())["torch_dtype"] == "float16"
    assert cli_main(["convert", str(demo), str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "float16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "c" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_corrupt_weights_found_by_load_and_inspect(hf_checkpoint, tmp_path, capsys):
    folder, _ = hf_checkpoint("mamba")
    nan = tmp_path / "nan"
    shutil.copytree(folder, nan)
    f = nan / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-64:] = b"\xff" * 64  # NaN bit patterns in the last tensor's data
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="NaN or infinite values"):
        load_model(nan)
    trunc = tmp_path / "trunc"
    shutil.copytree(folder, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert cli_main(["inspect", str(trunc)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    shutil.copy(hf_checkpoint("mamba2")[0] / "model.safetensors", other / "model.safetensors")
    assert cli_main(["inspect", str(other)]) == 2
    assert "does not match its config.json" in capsys.readouterr().err


def test_stored_dtype_reads_both_config_spellings(tmp_path):
    from mamba_deploy.checkpoint import stored_dtype

    for key in ("torch_dtype", "dtype"):  # transformers < 5 / >= 5
        (tmp_path / "config.json").write_text(json.dumps({key: "float16"}))
        assert stored_dtype(tmp_path) == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert stored_dtype(tmp_path) is None


@pytest.mark.parametrize("with_generation_config", [False, True])
def test_token_ids_survive_hf_to_mamba_ssm_and_back(with_generation_config, tmp_path):
    """mamba_ssm's config.json has no token-id fields, so hf -> mamba_ssm -> hf set bos / eos /
    pad to null. They now go into generation_config.json (transformers' file, which mamba_ssm
    ignores), merged into a copied one without dropping its other keys, and are read back."""
    import transformers

    from conftest import build_hf_model

    hf = build_hf_model("mamba2", bos_token_id=3, eos_token_id=5, pad_token_id=7)
    hf.save_pretrained(tmp_path / "hf")
    gen = tmp_path / "hf" / "generation_config.json"
    if with_generation_config:
        gen.write_text(json.dumps({"max_new_tokens": 11, "eos_token_id": 5}))
    else:
        gen.unlink(missing_ok=True)
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "ssm"), "--format", "mamba_ssm"]) == 0
    written = json.loads((tmp_path / "ssm" / "generation_config.json").read_text())
    assert {k: written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {"bos_token_id": 3, "eos_token_id": 5, "pad_token_id": 7}
    assert written.get("max_new_tokens") == (11 if with_generation_config else None)
    assert cli_main(["convert", str(tmp_path / "ssm"), str(tmp_path / "back"), "--format", "hf"]) == 0
    back = transformers.AutoConfig.from_pretrained(tmp_path / "back")  # transformers reads it, not our code
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (3, 5, 7)


def test_generation_config_token_id_of_wrong_type_is_a_config_error(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("mamba2")
    ssm = tmp_path / "ssm"
    assert cli_main(["convert", str(folder), str(ssm), "--format", "mamba_ssm"]) == 0
    (ssm / "generation_config.json").write_text(json.dumps({"eos_token_id": "two"}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id='two'"):
        load_model(ssm)


# mamba_ssm 2.3.2's MambaConfig fields (mamba_ssm/models/config_mamba.py): from_pretrained builds
# MambaConfig(**config.json), so any other key is a TypeError there
MAMBA_SSM_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                           "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                           "pad_vocab_size_multiple", "tie_embeddings"}


@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.001, float("inf")), (0.0, 0.1)])
def test_mamba_ssm_layout_config_is_one_mamba_ssm_loads(dt_limit, tmp_path):
    """convert --format mamba_ssm wrote torch_dtype (and, from a quantized GGUF, source_weights)
    into config.json, and dt_limit's infinity as transformers' {"__float__": "Infinity"}: mamba_ssm's
    MambaConfig(**config) refused the first, and its Mamba2 got a dict for dt_limit's max."""
    from conftest import random_lm

    cfg = MambaConfig(arch="mamba2", d_model=64, n_layer=2, vocab_size=96, d_state=16, headdim=16,
                      ngroups=2, chunk_size=16, dt_limit=dt_limit)
    model = random_lm(cfg)
    save_checkpoint(model, tmp_path / "ssm", fmt="mamba_ssm", dtype=torch.float16)
    raw = json.loads((tmp_path / "ssm" / "config.json").read_text())  # python json, as mamba_ssm reads it
    assert set(raw) <= MAMBA_SSM_CONFIG_FIELDS, set(raw) - MAMBA_SSM_CONFIG_FIELDS
    got = raw["ssm_cfg"].get("dt_limit", (0.0, float("inf")))  # absent: mamba_ssm's default
    assert all(isinstance(v, float) for v in got) and tuple(got) == dt_limit
    back = load_model(tmp_path / "ssm")
    assert back.config.dt_limit == dt_limit and back.backbone.embeddings.weight.dtype == torch.float32
    from mamba_deploy.checkpoint import stored_dtype

    assert stored_dtype(tmp_path / "ssm") == torch.float16  # read from the tensors now


def test_mamba_ssm_layout_refuses_a_shard_size_before_any_work(tmp_path, capsys):
    """mamba_ssm's from_pretrained reads one pytorch_model.bin: shards would be unloadable there."""
    demo = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "demo-mamba1"
    out = tmp_path / "ssm"
    assert cli_main(["convert", str(demo), str(out), "--format", "mamba_ssm", "--max-shard-size", "1"]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err and not out.exists()
    assert cli_main(["convert", str(demo), str(out), "--format", "mamba_ssm"]) == 0
    assert sorted(p.name for p in out.glob("*.bin")) == ["pytorch_model.bin"]
    assert not list(out.glob("*.safetensors"))
    from mamba_deploy.checkpoint import stored_dtype

    assert stored_dtype(out) == torch.float16  # the demo's dtype kept, and read back from the .bin


def test_convert_keeps_every_float_of_a_mixed_dtype_folder(hf_checkpoint, tmp_path, capsys):
    """bf16 matrices beside float32 vectors (A_log, D, norms): the bf16 bulk decides verify's row,
    but `convert` without --dtype saves float32 (and says so), so no float32 value is rounded."""
    from safetensors.torch import load_file, save_file

    from mamba_deploy.checkpoint import stored_dtype

    src = _copy(hf_checkpoint("mamba2")[0], tmp_path)
    files = sorted(src.glob("*.safetensors"))
    for f in files:
        sd = load_file(f)
        save_file({k: v.to(torch.bfloat16) if v.ndim > 1 else v.float() for k, v in sd.items()}, f,
                  metadata={"format": "pt"})
    want = {k: v for f in files for k, v in load_file(f).items()}
    assert stored_dtype(src) == torch.bfloat16 and stored_dtype(src, exact=True) == torch.float32
    assert cli_main(["convert", str(src), str(tmp_path / "out")]) == 0
    assert "more than one float dtype (mostly bfloat16)" in capsys.readouterr().err
    got = {k: v for f in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(f).items()}
    vectors = [k for k, v in want.items() if v.ndim <= 1]
    assert vectors and all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in vectors)
    assert all(torch.equal(got[k].to(torch.bfloat16), want[k]) for k in want if k not in vectors)
