"""Fortieth session: fixes from that session's reviews, each test failing on the code before it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO1, DEMO2 = ROOT / "models" / "demo-mamba1", ROOT / "models" / "demo-mamba2"


def test_the_server_refuses_a_request_past_any_runners_max_positions(request):
    """The server's position check read llama.cpp's `n_ctx` by name, so a backend with another
    position cap was not checked. It now reads the Runner's `max_positions` (llama.cpp's n_ctx
    is one): a request past it is a 400 naming the cap; one inside it is generated as alone."""
    from conftest import post_json, start_server
    from mamba_deploy.generation import generate
    from mamba_deploy.runners import open_runner

    r = open_runner(DEMO2, "torch")
    request.addfinalizer(r.close)
    alone = generate(r, [[5, 6, 7]], max_new_tokens=8).tokens[0]
    r.max_positions, r.max_positions_name = 16, "this backend's cap"
    server = start_server(r, request, max_num_seqs=4)
    status, _, body = post_json(server, {"prompt": list(range(3, 13)), "max_tokens": 7, "temperature": 0})
    assert status == 400, body
    assert "would pass this backend's cap=16" in json.loads(body)["error"]["message"]
    status, _, body = post_json(server, {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["token_ids"] == alone


def test_tensorrt_preflight_compares_release_numbers_not_spellings(tmp_path, onnx_export, monkeypatch):
    """verify's preflight refused a good engine when pip's version string and
    `tensorrt.__version__` (the sidecar's) spelled one release differently, and did not check at
    all when TensorRT came from its CUDA-specific distribution (`tensorrt-cu12`)."""
    from importlib import metadata

    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.tensorrt import SIDECAR_FORMAT, sidecar_path
    from mamba_deploy.runners import preflight

    onnx_dir = onnx_export("mamba2")[0]
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 100)
    sidecar_path(engine).write_text(json.dumps({"format": SIDECAR_FORMAT, "onnx_dir": str(onnx_dir),
                                               "manifest": manifest, "defaults": {},
                                               "build": {"engine_bytes": 100, "tensorrt": "10.13.0.35"}}))

    def installed(versions):
        def version(name):
            if name not in versions:
                raise metadata.PackageNotFoundError(name)
            return versions[name]
        monkeypatch.setattr(metadata, "version", version)

    for same in ("10.13.0.35", "10.13.0.35.post1", "v10.13.0.35"):
        installed({"tensorrt": same})
        assert preflight._tensorrt_config(engine).d_model == manifest["config"]["d_model"], same
    installed({"tensorrt-cu12": "10.12.0.36"})
    with pytest.raises(ExportError, match=r"built by TensorRT 10.13.0.35, and this is TensorRT 10.12.0.36"):
        preflight._tensorrt_config(engine)
    installed({})
    assert preflight._tensorrt_config(engine) is not None  # nothing recorded here: the runner's own check decides


def _mamba2_config():
    from mamba_deploy.config import MambaConfig

    return MambaConfig(arch="mamba2", d_model=24, n_layer=2, vocab_size=50, d_state=5, headdim=6, chunk_size=4)


def test_cpu_decode_keeps_a_nan_step_size_nan():
    """The C kernels are built with -ffast-math, whose finite-math assumption let the dt clamp
    return a bound for NaN: a NaN dt_bias gave NaN prefill logits but finite decode logits on
    the CPU. Reference: the ops' PyTorch twins (torch.clamp keeps NaN)."""
    import torch

    from conftest import random_lm
    from mamba_deploy import ops

    m = random_lm(_mamba2_config())
    with torch.no_grad():
        m.backbone.layers[0].mixer.dt_bias[0] = float("nan")
        ids = torch.tensor([[3, 7, 9]])
        assert not torch.isfinite(m(ids).logits).all()
        with ops.use_backend("ref"):
            st = m.new_state(1)
            assert not torch.isfinite(torch.stack([m.step(ids[:, t], st) for t in range(3)])).all()
        st = m.new_state(1)
        fast = torch.stack([m.step(ids[:, t], st) for t in range(3)])
    assert not torch.isfinite(fast).all(), "the C decode made a NaN step size finite"


def test_cpu_prefill_scan_keeps_small_step_sizes_accurate():
    """The C Mamba1 scan's softplus was log(1 + e^v), which rounds 1 + e^v and loses the step
    sizes of long-memory channels (v near -12): their state was 5e-3 off float64 math over 8192
    tokens. Now log1p: within the float32 reference's error."""
    import torch

    from mamba_deploy.ops import cpu_kernels, reference

    if not cpu_kernels.available():
        pytest.skip("no C compiler here: the CPU kernels are not built")
    torch.manual_seed(0)
    b, l, d, n = 1, 8192, 32, 16
    x, dt = torch.randn(b, l, d), torch.randn(b, l, d) * 0.5
    A, B, C, D = -torch.rand(d, n) * 0.1, torch.randn(b, l, n), torch.randn(b, l, n), torch.ones(d)
    bias = torch.cat([torch.full((d // 2,), -2.0), torch.full((d // 2,), -12.0)])
    h = torch.zeros(b, d, n)
    y_c, h_c = cpu_kernels.selective_scan_cpu(x, dt, A, B, C, D, None, bias, h)
    y64, h64 = reference.selective_scan_ref(*(t.double() for t in (x, dt, A, B, C, D)), None, bias.double(),
                                            h.double())

    def rel(t, ref):  # the slow channels only
        return ((t.double() - ref)[..., d // 2:, :].abs().max() / ref[..., d // 2:, :].abs().max()).item()

    assert rel(h_c, h64) < 1e-4, rel(h_c, h64)
    assert ((y_c.double() - y64).abs().max() / y64.abs().max()).item() < 1e-4


def test_torch_runner_forks_a_float64_state_exactly():
    """clone_state went through to_torch_state's float32 copy: a float64 fork moved by 6e-8."""
    import torch

    from conftest import random_lm
    from mamba_deploy.runners.torch_runner import TorchRunner

    r = TorchRunner(random_lm(_mamba2_config(), dtype=torch.float64))
    _, st = r.prefill(torch.randint(0, 50, (2, 9)), r.new_state(2))
    fork = r.clone_state(st)
    assert fork.ssm.dtype == torch.float64
    assert torch.equal(fork.ssm, st.ssm) and torch.equal(fork.conv, st.conv)
    assert fork.ssm.data_ptr() != st.ssm.data_ptr()
    a, _ = r.step(torch.tensor([4, 5]), st)
    b, _ = r.step(torch.tensor([4, 5]), fork)
    assert torch.equal(a, b)


def test_state_select_of_no_rows():
    """select([]) was a ShapeError ("got torch.float32"); select(slice(0, 0)) already worked."""
    import numpy as np
    import torch

    from conftest import random_lm

    st = random_lm(_mamba2_config()).new_state(3)
    for none in ([], (), slice(0, 0), np.array([], dtype=np.int64)):
        assert st.select(none).conv.shape[1] == 0
    assert st.select(torch.tensor(1)).conv.shape[1] == 1
    assert st.select(np.int64(2)).conv.shape[1] == 1


# ----------------------------------------------------------------------------- ONNX runner

@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the ONNX runner needs onnxruntime")
    from conftest import random_lm
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.export.onnx import export_onnx

    m = random_lm(MambaConfig(arch="mamba1", d_model=32, n_layer=2, vocab_size=100, d_state=8))
    return export_onnx(m, tmp_path_factory.mktemp("onnx40") / "o", validate=False), m


def _feeds(r, ids, arrays):
    import numpy as np

    from mamba_deploy.export.onnx_meta import state_names

    return {**dict(zip(state_names(r.n_layer), arrays)), "input_ids": np.asarray(ids, np.int64)}


def test_onnx_run_refuses_padding_over_a_state_that_holds_tokens(small_onnx):
    """prefill refused left padding over a used state; run() took it and returned logits 40 %
    off (the padded positions still decay the state)."""
    import numpy as np
    import torch

    from mamba_deploy.errors import ShapeError
    from mamba_deploy.runners.onnx_runner import open_onnx

    with open_onnx(small_onnx[0], threads=1) as r:
        _, st = r.prefill(torch.tensor([[5, 6, 7], [8, 9, 10]]), r.new_state(2))
        f = _feeds(r, [[1, 2, 3], [0, 2, 3]], [a.copy() for a in r.state_arrays(st)])
        f["attention_mask"] = np.array([[1, 1, 1], [0, 1, 1]], np.int64)
        with pytest.raises(ShapeError, match="pads rows \\[1\\] of a state that already holds tokens"):
            r.run(f)
        fresh = _feeds(r, [[1, 2, 3], [0, 2, 3]], [np.zeros_like(a) for a in r.state_arrays(st)])
        fresh["attention_mask"] = f["attention_mask"]
        assert r.run(fresh)["logits"].shape == (2, 3, 100)


def test_onnx_run_of_no_rows_is_empty(small_onnx):
    """A batch of 0 rows raised onnxruntime's own Fail from the graph's Reshape."""
    import numpy as np

    from mamba_deploy.runners.onnx_runner import open_onnx
    from mamba_deploy.state import State

    with open_onnx(small_onnx[0], threads=1) as r:
        empty = [np.zeros(s, np.float32) for s in State.layer_shapes(r.config, 0)]
        out = r.run(_feeds(r, np.zeros((0, 3), np.int64), empty))
        assert out["logits"].shape == (0, 3, 100)
        assert [out[n].shape for n in out if n != "logits"] == [a.shape for a in empty]


def test_onnx_manifest_outputs_in_another_order_decode(small_onnx, tmp_path):
    """The runner took the vocabulary from the manifest's first output: a manifest listing
    logits last opened and then failed at the first step with ORT's RuntimeError."""
    import shutil

    import torch

    from mamba_deploy.runners.onnx_runner import open_onnx

    dst = tmp_path / "o"
    shutil.copytree(small_onnx[0], dst)
    man = json.loads((dst / "manifest.json").read_text())
    man["outputs"].append(man["outputs"].pop(0))
    (dst / "manifest.json").write_text(json.dumps(man))
    with open_onnx(dst, threads=1) as r, open_onnx(small_onnx[0], threads=1) as ref:
        got, _ = r.step(torch.tensor([5]), r.new_state(1))
        want, _ = ref.step(torch.tensor([5]), ref.new_state(1))
    assert torch.equal(got, want)


@pytest.mark.parametrize("providers", [[None], 5, [], [("CPUExecutionProvider",)], [("CPUExecutionProvider", 1)]])
def test_onnx_bad_providers_are_a_config_error(small_onnx, providers):
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.runners.onnx_runner import open_onnx

    with pytest.raises(ConfigError, match="provider"):
        open_onnx(small_onnx[0], providers=providers)


def test_onnx_export_validate_takes_true_or_false(small_onnx, tmp_path):
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.export.onnx import export_onnx

    with pytest.raises(ConfigError, match="validate must be True or False"):
        export_onnx(small_onnx[1], tmp_path / "o", validate="false")
    assert not (tmp_path / "o").exists()


def test_onnx_export_of_a_model_on_a_gpu_validates(tmp_path):
    """export_onnx(model on CUDA) made its validation ids on the CPU and fed them to the GPU
    model: a bare RuntimeError unless validate=False. Reference: PyTorch, the export's own
    validation (fp32 logits within 1e-4 of the model, or within 8x of its own float64 error)."""
    import torch

    pytest.importorskip("onnxruntime", reason="validating an export runs ONNX Runtime")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (runs on the GPU machine)")
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.export.onnx import export_onnx

    for demo in (DEMO1, DEMO2):
        m = load_model(demo, device="cuda")
        out = export_onnx(m, tmp_path / demo.name)
        assert (out / "model.onnx").is_file()


# ----------------------------------------------------------------------------- GGUF vocabulary

@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    pytest.importorskip("gguf", reason="GGUF export needs gguf-py")
    from conftest import build_hf_model, write_tiny_bpe

    d = tmp_path_factory.mktemp("bpe40") / "m"
    build_hf_model("mamba").save_pretrained(d)
    write_tiny_bpe(d)
    return d


@pytest.fixture(scope="module")
def lone_gguf(bpe_folder, tmp_path_factory):
    import warnings

    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_gguf(bpe_folder, tmp_path_factory.mktemp("g40") / "a.gguf")


def _llama_ids(path, text):
    from mamba_deploy.runners import open_runner

    with open_runner(path, "llama.cpp", n_threads=1) as r:
        return r.tokenizer.encode(text)


def test_gguf_export_of_a_model_loaded_from_a_gguf_keeps_its_vocabulary(lone_gguf, tmp_path):
    """export_gguf(load_model(x.gguf)) looked for a tokenizer file beside the GGUF: none there
    was a ModelNotFoundError, and another model's tokenizer.json there was written into the new
    GGUF (100 of 128 tokens differed). Passing the path used the GGUF's own vocabulary."""
    import shutil
    import warnings

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.export.gguf_vocab import vocab_from_gguf

    d = tmp_path / "dl"
    d.mkdir()
    shutil.copy(lone_gguf, d / "a.gguf")
    want = vocab_from_gguf(d / "a.gguf").tokens
    assert vocab_from_gguf(export_gguf(load_model(d / "a.gguf"), tmp_path / "alone.gguf")).tokens == want
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["another corpus zebra xylophone"] * 10,
                            trainers.BpeTrainer(vocab_size=90, special_tokens=["</s>"], show_progress=False))
    tok.save(str(d / "tokenizer.json"))  # another model's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(load_model(d / "a.gguf"), tmp_path / "stray.gguf")
    assert vocab_from_gguf(out).tokens == want


@pytest.mark.parametrize("edit,text,said", [
    ({"normalizer": {"type": "Lowercase"}}, "The quick brown fox", "normalizer Lowercase"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}},
     "the quick brown fox", "ByteLevel add_prefix_space"),
])
def test_gguf_export_warns_of_bpe_features_llamacpp_does_not_apply(bpe_folder, tmp_path, edit, text, said):
    """A normalizer or a ByteLevel prefix space in tokenizer.json was dropped without a word:
    llama.cpp then tokenized texts differently from the checkpoint (reference: tokenizers)."""
    import shutil

    from tokenizers import Tokenizer

    from mamba_deploy.export.gguf import export_gguf

    pytest.importorskip("llama_cpp", reason="compares with llama.cpp's tokenizer")
    d = tmp_path / "m"
    shutil.copytree(bpe_folder, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj.update(edit)
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.warns(UserWarning, match=said):
        out = export_gguf(d, tmp_path / "m.gguf")
    assert _llama_ids(out, text) != Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids  # why it warns


def test_gguf_export_warns_of_added_tokens_that_strip_spaces(bpe_folder, tmp_path):
    import shutil

    from tokenizers import AddedToken, Tokenizer

    from mamba_deploy.export.gguf import export_gguf

    d = tmp_path / "m"
    shutil.copytree(bpe_folder, d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|user|>", lstrip=True, rstrip=True, special=True, normalized=False)])
    tok.save(str(d / "tokenizer.json"))
    with pytest.warns(UserWarning, match=r"lstrip / rstrip / single_word \['<\|user\|>'\]"):
        export_gguf(d, tmp_path / "m.gguf")


def test_gguf_export_of_a_bare_tokenizer_json_says_nothing(bpe_folder, tmp_path):
    import warnings

    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        export_gguf(bpe_folder, tmp_path / "m.gguf")
    assert not [x for x in w if "does not apply" in str(x.message)]


def test_gguf_sentencepiece_export_follows_tokenizer_config_bos_and_eos(tmp_path):
    """tokenizer_config.json's add_bos_token / add_eos_token (which the checkpoint's tokenizer,
    transformers', follows) were ignored: llama.cpp added a BOS and no EOS where the checkpoint
    added an EOS and no BOS. Reference: the checkpoint's tokenizer."""
    import io
    import random

    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("llama_cpp", reason="compares with llama.cpp's tokenizer")
    from conftest import build_hf_model
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.tokenizer import load_tokenizer

    words = ["def", "main", "return", "print", "hello", "world", "mamba", "state", "space", "model", "code"]
    rng = random.Random(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(12))
                                                           for _ in range(400)]), model_writer=buf, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    for add_bos, add_eos in ((False, True), (True, True), (True, False)):
        d = tmp_path / f"m{add_bos:d}{add_eos:d}"
        build_hf_model("mamba2", vocab_size=320).save_pretrained(d)
        (d / "tokenizer.model").write_bytes(buf.getvalue())
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": add_eos,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
        out = export_gguf(d, tmp_path / f"{d.name}.gguf")
        want = load_tokenizer(d).encode("hello world")
        assert _llama_ids(out, "hello world") == want, (add_bos, add_eos)


def test_gguf_reexport_drops_the_ids_it_says_it_ignores(lone_gguf, tmp_path):
    """A special id outside the vocabulary was warned about as ignored, then written back by the
    re-export (the old file's carried keys)."""
    import gguf

    from conftest import rewrite_gguf
    from mamba_deploy.export.gguf import export_gguf
    from mamba_deploy.export.gguf_reader import GGUFFile

    VT = gguf.GGUFValueType
    bad = rewrite_gguf(lone_gguf, tmp_path / "bad.gguf", edit={
        "tokenizer.ggml.bos_token_id": (99999, VT.UINT32, None), "tokenizer.ggml.eot_token_id": (99998, VT.UINT32, None)})
    with pytest.warns(UserWarning, match="outside the 128-token vocabulary"):
        out = export_gguf(bad, tmp_path / "fixed.gguf")
    f = GGUFFile(out)
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eot_token_id"):
        assert key not in f.fields or f.fields[key].contents() < 128, key


@pytest.mark.parametrize("key,value", [
    ("tokenizer.ggml.unknown_token_id", ([1, 2], "ARRAY", "UINT32")),
    ("tokenizer.ggml.unknown_token_id", ("x", "STRING", None)),
    ("tokenizer.ggml.model", (["gpt2"], "ARRAY", "STRING")),
    ("tokenizer.ggml.pre", (5, "UINT32", None)),
    ("tokenizer.chat_template", (3, "UINT32", None)),
    ("tokenizer.ggml.add_bos_token", (1, "UINT8", None)),
])
def test_gguf_tokenizer_metadata_of_another_type_is_a_typed_error(lone_gguf, tmp_path, key, value):
    """Such files raised TypeError / ValueError tracebacks from export gguf and load_model."""
    import gguf

    from conftest import rewrite_gguf
    from mamba_deploy.cli import main
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.gguf_vocab import vocab_from_gguf

    VT = gguf.GGUFValueType
    v, kind, sub = value
    p = rewrite_gguf(lone_gguf, tmp_path / "x.gguf", edit={key: (v, VT[kind], sub and VT[sub])})
    with pytest.raises(ExportError, match=f"GGUF metadata {key} must be"):
        vocab_from_gguf(p)
    assert main(["export", "gguf", str(p), str(tmp_path / "o.gguf")]) != 0
    assert not (tmp_path / "o.gguf").exists()


def test_gguf_kquant_failure_names_no_temporary_file_and_a_fix(bpe_folder, tmp_path):
    """llama.cpp's quantizer refusing inf block scales was reported naming a hidden temporary
    file that no longer existed, and no fix."""
    import torch

    pytest.importorskip("llama_cpp", reason="the K-quants are written by llama.cpp's quantizer")
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.gguf import export_gguf

    m = load_model(bpe_folder)
    with torch.no_grad():
        m.backbone.layers[0].mixer.in_proj.weight[0, :] = 1e7
    with pytest.raises(ExportError) as e:
        export_gguf(m, tmp_path / "q.gguf", outtype="q4_k_m")
    msg = str(e.value)
    assert "--outtype bf16 or f32" in msg and ".tmp" not in msg and str(tmp_path) not in msg, msg
    assert list(tmp_path.iterdir()) == []


def test_llamacpp_default_n_ctx_survives_a_huge_context_length(lone_gguf, tmp_path):
    """A GGUF whose context_length is near 2**32 (a valid u32) made the default n_ctx overflow
    inside llama.cpp, with an error telling the user to use a smaller batch."""
    import gguf
    import torch

    pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python")
    from conftest import rewrite_gguf
    from mamba_deploy.runners import open_runner

    p = rewrite_gguf(lone_gguf, tmp_path / "x.gguf",
                     edit={"mamba.context_length": (2**32 - 1, gguf.GGUFValueType.UINT32, None)})
    with open_runner(p, "llama.cpp", n_threads=1) as r, open_runner(lone_gguf, "llama.cpp", n_threads=1) as ref:
        got, _ = r.prefill(torch.tensor([[5, 6, 7]]), r.new_state(1))
        want, _ = ref.prefill(torch.tensor([[5, 6, 7]]), ref.new_state(1))
    assert torch.equal(got, want)


def test_openvino_removes_a_killed_runs_stripped_graph(hf_checkpoint, tmp_path, monkeypatch):
    """An external-data export opened in OpenVINO gets a stripped copy of its graph beside the
    weights, removed on close(); a run killed before close() left it there for good. The next
    open now removes one whose process is gone (and keeps a live process's)."""
    import subprocess
    import sys

    pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino")
    import mamba_deploy.export.onnx as onnx_export
    from mamba_deploy.atomic import temp_owner
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners.openvino_runner import open_openvino

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = export_onnx(hf_checkpoint("mamba")[0], tmp_path / "ext", validate=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = temp_owner().split("h", 1)[1]
    stale = out / f".model.openvino.p{dead}h{host}-1f.onnx"
    live = out / f".model.openvino.{temp_owner()}-2f.onnx"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    with pytest.warns(UserWarning, match="a temporary left by an earlier run"):
        r = open_openvino(out)
    assert not stale.exists() and live.exists()
    r.close()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live.name]


# ----------------------------------------------------------------------------- files, tokenizer, hub
# (from a review: each test failed on the code before; references: transformers, tokenizers, cp)



def _wordlevel(folder, vocab, specials=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece()
    if specials:
        t.add_special_tokens(list(specials))
    t.save(str(folder / "tokenizer.json"))


VOCAB = {"<unk>": 0, "<eos>": 1, "<pad>": 2, "def": 3, "main": 4}


@pytest.mark.parametrize("name", ["special_tokens_map.json", "generation_config.json"])
@pytest.mark.parametrize("kind", ["fifo", "deep"])
def test_tokenizer_side_files_are_guarded(tmp_path, name, kind):
    """load_tokenizer reads special_tokens_map.json / generation_config.json through
    read_json_object without check_model_file: a FIFO hangs forever (a link to /dev/zero eats
    all memory); deep nesting is a raw RecursionError."""
    _wordlevel(tmp_path, VOCAB, ["<eos>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    p = tmp_path / name
    if kind == "fifo":
        os.mkfifo(p)
    else:
        p.write_text("[" * 100000 + "]" * 100000)
    code = ("import sys; from mamba_deploy.tokenizer import load_tokenizer\n"
            "from mamba_deploy.errors import MambaDeployError\n"
            f"try: load_tokenizer({str(tmp_path)!r}); print('loaded')\n"
            "except MambaDeployError as e: print('typed', type(e).__name__)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_tokenizer hung on a {kind} {name}")
    assert r.returncode == 0, r.stderr[-300:]


def test_chat_template_jinja_wins_over_tokenizer_config_as_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    from mamba_deploy.tokenizer import load_tokenizer
    _wordlevel(tmp_path, VOCAB, ["<eos>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>",
        "chat_template": "OLD {% for m in messages %}{{ m.content }}{% endfor %}"}))
    (tmp_path / "chat_template.jinja").write_text("NEW {% for m in messages %}{{ m.content }}{% endfor %}")
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert ref.chat_template.startswith("NEW")
    assert load_tokenizer(tmp_path).chat_template == ref.chat_template


def test_overwriting_an_output_keeps_its_mode(tmp_path):
    from mamba_deploy.atomic import write_text
    p = tmp_path / "result.json"
    p.write_text("{}")
    os.chmod(p, 0o600)
    old = os.umask(0o022)
    try:
        write_text(p, '{"a": 1}')
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600  # `>` and cp keep it; here 0o644: world-readable


def test_reading_the_umask_does_not_race_other_threads(tmp_path):
    from mamba_deploy import atomic
    old = os.umask(0o077)
    bad, stop = [], threading.Event()

    def creator():
        i = 0
        while not stop.is_set() and not bad:
            p = tmp_path / f"f{i % 16}"
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666))
            m = stat.S_IMODE(p.stat().st_mode)
            if m != 0o600:
                bad.append(oct(m))
            p.unlink()
            i += 1
    t = threading.Thread(target=creator)
    t.start()
    t0 = time.time()
    try:
        while time.time() - t0 < 15 and not bad:
            atomic._umask()
    finally:
        stop.set()
        t.join()
        os.umask(old)
    assert not bad, f"another thread created a file with mode {bad[0]} under umask 077"


@pytest.mark.parametrize("dir_", [False, True])
def test_a_long_but_valid_output_name_is_written(tmp_path, dir_):
    from mamba_deploy.atomic import atomic_dir, write_text
    name = "模型" * 39 + ".json"  # 239 bytes: a valid name (NAME_MAX 255)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / name).write_text("{}")  # the filesystem takes it
    if dir_:
        with atomic_dir(tmp_path / name) as tmp:
            (tmp / "x").write_text("1")
        assert (tmp_path / name / "x").exists()
    else:
        write_text(tmp_path / name, "{}")  # OSError [Errno 36] naming the temporary
        assert (tmp_path / name).read_text() == "{}"


def test_decode_skips_the_special_tokens_the_configs_name(tmp_path):
    from transformers import AutoTokenizer

    from mamba_deploy.tokenizer import load_tokenizer
    _wordlevel(tmp_path, VOCAB)  # <eos>/<pad>/<unk> in the vocabulary, not flagged special in tokenizer.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    ids = [3, 1, 4, 2]
    ref = AutoTokenizer.from_pretrained(str(tmp_path)).decode(ids, skip_special_tokens=True)
    assert ref == "def main"
    assert load_tokenizer(tmp_path).decode(ids) == ref  # ours: 'def <eos> main <pad>'


def test_a_proxy_reaches_the_hub_when_dns_does_not(monkeypatch, tmp_path):
    import huggingface_hub

    from mamba_deploy.hub import resolve
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real = socket.getaddrinfo

    def gai(host, *a, **k):  # a proxied network: only the proxy resolves outside names
        if host == "huggingface.co":
            raise socket.gaierror(-2, "Name or service not known")
        return real(host, *a, **k)
    monkeypatch.setattr(socket, "getaddrinfo", gai)
    (tmp_path / "model.safetensors").write_bytes(b"")
    online = []

    def snap(repo, revision=None, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        online.append(repo)
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snap)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: ["model.safetensors"])
    assert resolve("state-spaces/mamba-130m-hf") == tmp_path  # ModelNotFoundError "host does not resolve (offline?)"


def test_decode_of_a_huge_id_is_nothing(tmp_path):
    from mamba_deploy.tokenizer import load_tokenizer
    _wordlevel(tmp_path, VOCAB, ["<eos>"])
    tok = load_tokenizer(tmp_path)
    assert tok.decode([3, 2**32]) == "def"  # as an id past the vocabulary: nothing (a raw OverflowError before)
    assert tok.id_to_token(2**40) is None


def test_copy_tokenizer_files_names_a_folder_in_place_of_a_file(tmp_path):
    from mamba_deploy.errors import MambaDeployError
    from mamba_deploy.tokenizer_files import copy_tokenizer_files
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(); dst.mkdir()
    _wordlevel(src, VOCAB)
    (src / "merges.txt").mkdir()
    with pytest.raises(MambaDeployError):
        copy_tokenizer_files(src, dst)  # raw IsADirectoryError today


# ----------------------------------------------------------------------------- verify and eval
# (from a review; references: the tolerance rows, verify's own exit codes on corrupt exports)

def _cli(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mamba_deploy", *args], capture_output=True, text=True, env=e)


# 1. eval: math.exp(nll) overflows for a broken artifact -> OverflowError traceback (exit 1)
def test_eval_perplexity_overflow_is_not_an_untyped_error():
    """math.exp(nll) overflowed for a broken artifact: an OverflowError traceback."""
    from mamba_deploy.errors import MambaDeployError
    from mamba_deploy.eval import perplexity
    from mamba_deploy.runners import open_runner

    class Huge(type(open_runner(DEMO2, "torch", threads=1))):  # the torch runner, logits x -300
        def prefill(self, ids, state, attention_mask=None, last_only=False):
            logits, state = super().prefill(ids, state, attention_mask, last_only)
            return logits * -300, state

    r = open_runner(DEMO2, "torch", threads=1)
    r.__class__ = Huge
    try:
        res = perplexity(r, list(range(2, 60)), window=16)
    except MambaDeployError:
        return
    assert res["ppl"] == float("inf")  # currently: OverflowError: math range error


# 2. verify picks its limits from the raw CLI strings, the runners from the resolved paths
@pytest.fixture(scope="module")
def int4_export_x15(tmp_path_factory):
    work = tmp_path_factory.mktemp("r6")
    assert _cli("quantize", str(DEMO2), str(work / "q"), "--method", "int4").returncode == 0
    assert _cli("export", "onnx", str(work / "q"), str(work / "onnx")).returncode == 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from verify_corrupt_scales import scaled_copy  # one layer's MatMulNBits scales x1.5, manifest re-hashed

    scaled_copy(work / "onnx", work / "x15", 1.5)
    return work


@pytest.mark.parametrize("ref", ["~/q", "q/config.json"])
def test_corrupt_int4_export_fails_however_the_reference_is_spelled(int4_export_x15, ref):
    work = int4_export_x15
    ref = ref if ref.startswith("~") else str(work / ref)
    p = _cli("verify", ref, str(work / "x15"), "--quiet", "--lengths", "7,257", "--json", str(work / "v.json"),
            env={"HOME": str(work)})
    rep = json.loads((work / "v.json").read_text())
    assert rep["tolerance"]["label"] == "int8", rep["tolerance"]   # currently int4
    assert p.returncode == 1, p.stdout[-500:]                      # currently 0: PASSED


def test_tilde_artifact_gets_its_own_row(tmp_path, monkeypatch):
    from mamba_deploy.runners import guess_backend
    from mamba_deploy.verify import infer_artifact_dtype

    assert _cli("export", "gguf", str(DEMO2), str(tmp_path / "a.gguf"), "--outtype", "q8_0").returncode == 0
    monkeypatch.setenv("HOME", str(tmp_path))
    assert infer_artifact_dtype("~/a.gguf") == infer_artifact_dtype(tmp_path / "a.gguf") == "q8_0"  # "fp32"
    shutil.copytree(DEMO2, tmp_path / "ck")
    assert _cli("export", "onnx", str(tmp_path / "ck"), str(tmp_path / "o")).returncode == 0
    assert guess_backend("~/o") == "onnx"  # "torch"


# 3. an artifact type without a row: "give every limit with --tolerance" does not work,
#    and the ConfigError only comes after the reference pass
def test_every_limit_given_needs_no_row(tmp_path):
    """An artifact type without a row said 'give every limit with --tolerance', and that failed too."""
    from mamba_deploy.verify import make_tolerance

    t = make_tolerance(dict(logits_rel=0.9, state_rel=1.5, top1=0.45, ppl_rel=0.8), "q2_k_s")  # ConfigError
    assert t.logits_rel == 0.9


# 4. make_tolerance's dict form: untyped errors
@pytest.mark.parametrize("bad", [{"logits_rel": "x"}, {"logits_rel": None}, {"top1": True}])
def test_bad_override_values_are_config_errors(bad):
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.verify import make_tolerance

    with pytest.raises(ConfigError):
        make_tolerance(bad)


def test_a_missing_tokenizer_option_is_named_in_its_error(capsys):
    """generate --tokenizer /nonexist said 'pass a checkpoint folder, a .gguf file or a hub id',
    as if the model path were wrong, and never named the flag."""
    from mamba_deploy.cli import main

    assert main(["generate", str(DEMO2), "--tokenizer", "/nonexist-40", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer /nonexist-40" in err and "this is the tokenizer" in err, err


def test_verify_with_its_arguments_swapped_says_so(small_onnx, capsys):
    """verify ONNX_DIR CHECKPOINT said the ONNX folder had no config.json and suggested
    --backend onnx, which the reference cannot take."""
    from mamba_deploy.cli import main

    assert main(["verify", str(small_onnx[0]), str(DEMO2), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is an ONNX export, not a checkpoint" in err and "look swapped" in err, err
