"""Regression tests for what the forty-second session's reviews found; each fails on the code
before its fix."""

from __future__ import annotations

import onnx
import pytest

pytest.importorskip("onnxruntime")

from mamba_deploy.export.onnx import export_onnx  # noqa: E402

# ONNX's docs/Versioning.md: the IR version each opset of the default domain was released with
# (an independent table, not the onnx package's helper the exporter calls)
RELEASED_IR = {14: 7, 17: 8, 19: 9, 21: 10, 22: 10}


@pytest.mark.parametrize("opset", [14, 22])
def test_export_writes_the_lowest_ir_its_opset_needs(opset, hf_checkpoint, tmp_path):
    """Opsets 22-27 were written with the installed onnx's newest IR (14 with onnx 1.23): a runtime
    that reads opset 22 but IR 10 refused the file; opset 14 was written as IR 8, not 7."""
    if opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"the installed onnx {onnx.__version__} cannot write opset {opset}")
    folder, _ = hf_checkpoint("mamba2")
    out = export_onnx(folder, tmp_path / "o", opset=opset)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert model.opset_import[0].version == opset
    assert model.ir_version == RELEASED_IR[opset]


def test_corpus_skips_dangling_links_and_names_unreadable_files(tmp_path, monkeypatch):
    """os.walk lists a dangling `.py` link (Debian's sitecustomize.py -> /etc/...) among the files:
    it was kept and read_bytes raised a raw FileNotFoundError."""
    from mamba_deploy import data
    from mamba_deploy.errors import ModelNotFoundError

    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    for i in range(40):  # enough files that both splits get some
        (root / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    (root / "pkg" / "zz_broken.py").symlink_to(tmp_path / "nowhere.py")
    names = [rel for split in ("train", "val") for rel, _ in data.corpus_files(split, root)]
    assert "pkg/zz_broken.py" not in names and len(names) == 40
    assert sorted("".join(data.corpus_texts(s, root)) for s in ("train", "val"))  # reads every kept file
    real = type(root).read_bytes

    def read_bytes(path):  # a file that vanishes or turns unreadable between the listing and the read
        if path.name == "m0.py":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(type(root), "read_bytes", read_bytes)
    split = next(s for s in ("train", "val") if "pkg/m0.py" in [r for r, _ in data.corpus_files(s, root)])
    with pytest.raises(ModelNotFoundError, match="m0.py: Permission denied"):
        list(data.corpus_texts(split, root))


def _mamba2_with_d_inner(d_inner):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import random_lm
    from mamba_deploy.config import MambaConfig

    cfg = MambaConfig(arch="mamba2", d_model=48, n_layer=2, vocab_size=256, d_inner_override=d_inner,
                      headdim=16, ngroups=1, d_state=16, chunk_size=8)
    return random_lm(cfg)


def test_mamba2_wider_inner_saves_as_whole_expand_transformers_loads(tmp_path):
    """transformers' Mamba2 sizes its layers from expand * hidden_size alone: a d_inner override
    (a GGUF's ssm.inner_size) was written beside expand 2, and the folder then loaded in neither
    transformers nor mamba_deploy."""
    import torch
    from transformers import Mamba2ForCausalLM

    from mamba_deploy.checkpoint import load_model, save_checkpoint
    from mamba_deploy.state import State

    model = _mamba2_with_d_inner(144)  # 3 * d_model
    out = save_checkpoint(model, tmp_path / "hf")
    hf = Mamba2ForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits.double()
        ours = load_model(out)(ids, State.zeros(model.config, 2)).logits.double()
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-4
    assert load_model(save_checkpoint(model, tmp_path / "ssm", fmt="mamba_ssm")).config.d_inner == 144


@pytest.mark.parametrize("fmt", ["hf", "mamba_ssm"])
def test_mamba2_inner_not_a_multiple_is_refused_before_writing(fmt, tmp_path):
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="d_inner 80 is not a whole multiple of d_model 48.*GGUF or ONNX"):
        save_checkpoint(_mamba2_with_d_inner(80), tmp_path / "out", fmt=fmt)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mask", ["complex", "numpy complex", "meta"])
def test_runner_refuses_complex_and_meta_masks_typed(mask, hf_checkpoint):
    """A complex mask crashed in torch.unique (NotImplementedError) while its message was built, a
    meta one in .item() (RuntimeError); ids had these checks, masks did not."""
    import numpy as np
    import torch

    from mamba_deploy.errors import ShapeError
    from mamba_deploy.runners import open_runner

    folder, _ = hf_checkpoint("mamba2")
    runner = open_runner(folder, "torch")
    ids = torch.ones(2, 3, dtype=torch.long)
    m = {"complex": torch.ones(2, 3, dtype=torch.complex64), "numpy complex": np.ones((2, 3), np.complex128),
         "meta": torch.ones(2, 3, dtype=torch.long, device="meta")}[mask]
    with pytest.raises(ShapeError, match="complex|meta device"):
        runner.prefill(ids, runner.new_state(2), attention_mask=m)


def test_tied_weights_stored_only_as_lm_head_load_as_transformers_does(hf_checkpoint, tmp_path):
    """A tied checkpoint whose shared matrix is saved under `lm_head.weight` alone: transformers
    loads it (tying either name to the other); mamba_deploy said the embeddings were missing."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import MambaForCausalLM

    from mamba_deploy import load_model
    from mamba_deploy.cli import main
    from mamba_deploy.state import State

    folder, _ = hf_checkpoint("mamba")
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    (f,) = d.glob("*.safetensors")
    sd = load_file(f)
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd.pop("backbone.embeddings.weight")
    save_file(sd, f, metadata={"format": "pt"})
    hf = MambaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model = load_model(d)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits.double()
        ours = model(ids, State.zeros(model.config, 2)).logits.double()
    assert (ours - ref).abs().max() / ref.abs().max() < 1e-5
    assert main(["inspect", str(d)]) == 0


# ----------------------------------------------------------------------------- OpenVINO

@pytest.fixture(scope="module")
def quantized_l0_export(hf_checkpoint, tmp_path_factory):
    """An int8 quantized tiny Mamba2 and its ONNX export at MatMulNBits accuracy level 0."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.quant.quantizer import quantize, save_quantized

    pytest.importorskip("openvino")
    folder, _ = hf_checkpoint("mamba2")
    tmp = tmp_path_factory.mktemp("ov_q")
    save_quantized(quantize(load_model(folder), "int8"), tmp / "q")
    return tmp / "q", export_onnx(tmp / "q", tmp / "onnx", accuracy_level=0)


def test_openvino_keeps_a_level_0_quantized_graph_at_fp32(quantized_l0_export):
    """OpenVINO's CPU plugin rounded the activations of MatMulNBits layers to int8 (its dynamic
    quantization, on by default) whatever the f32 hint: 3e-2 from the quantized torch model where
    onnxruntime on the same graph is 1e-6, and `verify` failed the fp32 row."""
    import torch

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.runners.onnx_runner import open_onnx
    from mamba_deploy.runners.openvino_runner import open_openvino

    qdir, out = quantized_l0_export
    model = load_model(qdir)
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids, model.new_state(2)).logits.double()
    ort = open_onnx(out, threads=1)
    ov = open_openvino(out, threads=1)
    for runner in (ort, ov):
        got, _ = runner.prefill(ids, runner.new_state(2))
        assert (got.double() - want).abs().max() / want.abs().max() < 1e-4, runner.name
        runner.close()


def test_openvino_device_with_an_index_it_lacks_is_unavailable_not_an_export_error(onnx_export):
    from mamba_deploy.errors import BackendUnavailableError, ConfigError
    from mamba_deploy.runners.openvino_runner import missing_devices, open_openvino

    pytest.importorskip("openvino")
    assert missing_devices("GPU.3", ["CPU", "GPU.0", "GPU.1"]) == ["GPU.3"]
    assert missing_devices("GPU.0", ["CPU", "GPU"]) == [] and missing_devices("GPU.1", ["GPU.0", "GPU.1"]) == []
    assert missing_devices("HETERO:GPU.2,CPU", ["CPU", "GPU.0"]) == ["GPU.2"]
    out = onnx_export("mamba2")[0]
    with pytest.raises(BackendUnavailableError, match="CPU.1.*use device='CPU'"):
        open_openvino(out, device="CPU.1")
    with pytest.raises(ConfigError, match="property names"):
        open_openvino(out, properties={1: 2})


def test_openvino_precision_warning_names_the_properties_that_set_it(onnx_export):
    from mamba_deploy.runners.openvino_runner import open_openvino

    pytest.importorskip("openvino")
    out = onnx_export("mamba2")[0]
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        runner = open_openvino(out, properties={"INFERENCE_PRECISION_HINT": "f16"})
        ran = str(runner.compiled.get_property("INFERENCE_PRECISION_HINT"))
        runner.close()
    if not seen:
        pytest.skip(f"this CPU runs f16 as asked ({ran}): nothing to warn about")
    msg = str(seen[0].message)
    assert "properties' INFERENCE_PRECISION_HINT 'f16'" in msg and "precision 'f32'" not in msg


def test_small_dt_keeps_the_mamba1_prefill_state_at_fp32(tmp_path):
    """The prefill graph's softplus took log(1 + u) in float32, 6e-8 off absolute: for dt ~ 5e-5
    (dt_proj's output) that is 1e-3 of dt, and the state was 1.2e-4 from float64 (the export's
    validation refused the model; `verify` failed it). OpenVINO's rewrite of the same graph too."""
    import copy

    import torch
    import transformers

    from conftest import hf_cache
    from mamba_deploy.runners import open_runner

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=131, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, time_step_min=1e-4, time_step_max=1e-3)
    hf = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if any(k in n for k in ("A_log", "dt", ".D", "norm")) else 0.05))
            if n.endswith("dt_proj.bias"):
                p.sub_(1.0)  # dt ~ 4e-5 .. 4e-4
    hf.save_pretrained(tmp_path / "hf")
    out = export_onnx(tmp_path / "hf", tmp_path / "onnx")  # its validation refused it before
    ids = torch.randint(0, 131, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = hf_cache(copy.deepcopy(hf).double()(ids, use_cache=True))
    ref = torch.stack([cache.get_recurrent_state(i) for i in range(2)])
    backends = ["onnx"] + (["openvino"] if _has("openvino") else [])
    for backend in backends:
        with open_runner(out, backend, threads=1) as r:
            _, st = r.prefill(ids, r.new_state(3))
            got = r.to_torch_state(st).ssm.double()
        assert (got - ref).abs().max() / ref.abs().max() < 1e-5, backend


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ----------------------------------------------------------------------------- failure injection

def test_a_fifo_in_place_of_a_json_file_is_refused_not_waited_on(tmp_path):
    """A FIFO manifest.json / config.json blocked generate, verify, eval, bench and convert for good
    (the read waits for a writer that never comes)."""
    import os
    import threading

    from mamba_deploy.atomic import read_json_object, read_tagged_json
    from mamba_deploy.errors import ExportError

    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)
    got = {}

    def read():
        got["object"] = read_json_object(fifo)
        try:
            read_tagged_json(fifo, "onnx", "ONNX export manifest", "re-export the model")
        except ExportError as e:
            got["error"] = str(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "w"):
            pass
        pytest.fail("a read of a FIFO blocked")
    assert got["object"] == {} and "not a regular file" in got["error"]


def test_a_permission_error_is_one_line_not_a_traceback(hf_checkpoint, monkeypatch, capsys):
    """Path.exists() raises PermissionError on Python 3.11 for a path under an unreadable folder:
    every verb gave a traceback and exit 1."""
    from mamba_deploy import checkpoint
    from mamba_deploy.cli import main

    folder, _ = hf_checkpoint("mamba")
    capsys.readouterr()  # the fixture's own progress output

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied", str(folder / "config.json"))

    monkeypatch.setattr(checkpoint, "config_file", denied)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json: Permission denied; check its permissions" in err[0]


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_a_broken_tokenizer_link_is_refused_not_dropped(link, hf_checkpoint, tmp_path, capsys):
    """convert / export onnx / quantize copied tokenizer files with .exists(), False for a dangling
    or looping link: the output silently had no tokenizer, and generate on it failed later."""
    import shutil

    from mamba_deploy.cli import main

    folder, _ = hf_checkpoint("mamba")
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / "tokenizer.json").unlink(missing_ok=True)
    (src / "tokenizer.json").symlink_to(src / "tokenizer.json" if link == "loop" else tmp_path / "gone.json")
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err and not (tmp_path / "out").exists()
