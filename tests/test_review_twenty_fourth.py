"""Review (twenty-fourth session): user-level findings, each a test that failed before its fix."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from mamba_deploy import load_model

REPO = Path(__file__).resolve().parents[1]
DEMO2 = REPO / "models" / "demo-mamba2"


def test_a_short_calibration_text_says_it_gives_fewer_sequences_than_n_calib():
    """A --calib text too short for --n-calib sequences silently calibrated on fewer; now a
    warning names how many were taken and what to change. Enough text: no warning."""
    from mamba_deploy.quant.calib import calibration_ids

    model = load_model(DEMO2)
    text = (REPO / "README.md").read_text()
    n_tokens = len(model.tokenizer.encode(text))
    seq_len = n_tokens // 3  # room for 3 sequences
    with pytest.warns(UserWarning, match=r"3 sequence\(s\) of calib_len=%d instead of n_calib=8 \(--n-calib\)"
                      % seq_len):
        ids = calibration_ids(model, text, 8, seq_len)
    assert ids.shape == (3, seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibration_ids(model, text, 3, seq_len).shape == (3, seq_len)


# ---- Python API review -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_m2(ckpt, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from mamba_deploy.export.gguf import export_gguf

    folder, hf = ckpt("mamba2")
    return export_gguf(folder, tmp_path_factory.mktemp("g24") / "m.gguf", outtype="f32"), folder, hf


def _threads_generate(runner, prompts, n=10):
    import threading

    from mamba_deploy.generation import generate

    alone = {i: generate(runner, [p], max_new_tokens=n, stop_token_ids=[]).tokens[0] for i, p in enumerate(prompts)}
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                out = generate(runner, [prompts[i]], max_new_tokens=n, stop_token_ids=[])
                got.setdefault(i, []).append(out.tokens[0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == {i: [alone[i]] * 3 for i in alone}


PROMPTS = [[5, 6, 7], [9, 1], [3, 3, 3, 3, 2], [11]]


def test_threads_sharing_one_llamacpp_runner_wait_for_each_other(gguf_m2):
    """Four threads generating on one llama.cpp runner (each with its own state) crashed the
    process (a segfault in llama_decode); now each gets the tokens it gets alone."""
    from mamba_deploy.runners import open_runner

    _threads_generate(open_runner(gguf_m2[0], "llama.cpp", threads=1, n_seq_max=2), PROMPTS)


def test_threads_sharing_one_openvino_runner_wait_for_each_other(onnx_export):
    """OpenVINO's one infer request raised "Infer Request is busy" to all but one thread."""
    pytest.importorskip("openvino")
    from mamba_deploy.runners import open_runner

    _threads_generate(open_runner(onnx_export("mamba2")[0], "openvino", threads=1), PROMPTS)


def test_growing_the_llamacpp_context_keeps_the_conversations_it_holds(gguf_m2):
    """new_state past n_seq_max rebuilt the context and invalidated every live state (the next
    step raised "belongs to an older context"). The live sequences now move to the new context:
    a conversation goes on with the logits of one never interrupted (same runner kind), which
    also match the torch model's."""
    from mamba_deploy import load_model
    from mamba_deploy.runners import open_runner
    from mamba_deploy.runners.torch_runner import TorchRunner

    path, folder, _ = gguf_m2
    r = open_runner(path, "llama.cpp", threads=1, n_seq_max=2)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    a, b = r.new_state(1), r.new_state(1)
    r.prefill(ids, a)
    r.prefill(torch.tensor([[1, 2]]), b)
    r.new_state(3)  # more rows than the context holds: it grows
    assert r.reserve_rows(64) >= 64  # and grows again
    got, _ = r.step(torch.tensor([4]), a)
    fresh = open_runner(path, "llama.cpp", threads=1)
    st = fresh.new_state(1)
    fresh.prefill(ids, st)
    want, _ = fresh.step(torch.tensor([4]), st)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    tr = TorchRunner(load_model(folder))
    ts = tr.new_state(1)
    tr.prefill(ids, ts)
    assert rel_err(got, tr.step(torch.tensor([4]), ts)[0]) < 1e-4  # fp32 GGUF vs torch fp32


def test_a_torch_state_loads_into_llamacpp(gguf_m2):
    """load_torch_state raised NotImplementedError although can_gather_states said True: a state
    prefilled by the torch runner now continues in llama.cpp with the torch model's logits, and
    reads back as it went in."""
    from mamba_deploy import load_model
    from mamba_deploy.runners import open_runner
    from mamba_deploy.runners.torch_runner import TorchRunner

    path, folder, _ = gguf_m2
    tr = TorchRunner(load_model(folder))
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    _, ts = tr.prefill(ids, tr.new_state(2))
    r = open_runner(path, "llama.cpp", threads=1)
    ls = r.new_state(2)
    r.load_torch_state(ls, ts)
    back = r.to_torch_state(ls)
    assert torch.equal(back.conv, ts.conv) and torch.equal(back.ssm, ts.ssm)
    got = r.step(torch.tensor([4, 7]), ls)[0]
    assert rel_err(got, tr.step(torch.tensor([4, 7]), ts)[0]) < 1e-4
    from mamba_deploy.errors import ShapeError

    with pytest.raises(ShapeError, match=r"state has conv \(\d+, 2, .* expected \(\d+, 1, .* for batch 1"):
        r.load_torch_state(r.new_state(1), ts)


def test_a_llamacpp_step_of_no_rows_gives_no_logits(gguf_m2):
    """llama_decode refused the empty batch: RuntimeError "llama_decode failed with code -1"."""
    from mamba_deploy.runners import open_runner

    r = open_runner(gguf_m2[0], "llama.cpp", threads=1)
    logits, _ = r.step(torch.zeros(0, dtype=torch.long), r.new_state(0))
    assert logits.shape == (0, r.n_vocab)


def test_a_refused_quantize_leaves_the_model_as_it_was(monkeypatch):
    """A rule the last layer cannot take (group size 7) was refused after layers 0-4 had been
    swapped to QuantLinear, with no quantization_config: a half-quantized model. Now it is
    refused before any work, and a failure part-way puts every module back."""
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantizer

    model = load_model(DEMO2)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    modules = {n: m for n, m in model.named_modules()}
    rules = {"quant_cfg": {"backbone.layers.-1.mixer.in_proj": {"format": "int4", "group_size": 7}}}
    calls = []
    monkeypatch.setattr(quantizer, "calibration_ids", lambda *a, **k: calls.append(a) or None)
    # the rule set the group size, so the fix named is the rule's (--group-size cannot override it)
    with pytest.raises(QuantizationError, match=r"group size 7; set the group_size of rule "
                                                r"'backbone.layers.-1.mixer.in_proj' to \d+"):
        quantizer.quantize(model, "gptq", rules=rules, progress=False)
    assert not calls  # refused before calibrating
    monkeypatch.undo()
    real, swaps = quantizer._quant_linear, []

    def fail_third(*a, **k):
        swaps.append(a[1])
        if len(swaps) == 3:
            raise QuantizationError("refused by the test")
        return real(*a, **k)

    monkeypatch.setattr(quantizer, "_quant_linear", fail_third)
    with pytest.raises(QuantizationError, match="refused by the test"):
        quantizer.quantize(model, "int8", progress=False)
    assert {n: m for n, m in model.named_modules()} == modules
    assert not getattr(model, "quantization_config", None)
    assert torch.equal(model(ids).logits, before)


def test_output_paths_expand_the_home_folder(tmp_path, monkeypatch):
    """load_model("~/m") expanded ~, but export_gguf / export_onnx / save_checkpoint wrote into
    a folder literally named "~" in the working directory."""
    from mamba_deploy import save_checkpoint
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    model = load_model(DEMO2)
    save_checkpoint(model, "~/ckpt")
    export_onnx(DEMO2, "~/onnx", validate=False)
    assert sorted(p.name for p in home.iterdir()) == ["ckpt", "onnx"] and list(work.iterdir()) == []
    assert open_runner("~/onnx", "onnx").config == model.config
    assert open_runner("~/ckpt").config.d_model == model.config.d_model


def test_state_methods_refuse_what_they_cannot_do_by_name():
    """State.copy_ of another batch raised torch's size RuntimeError, select([5]) an IndexError,
    select(0) dropped the batch axis, and ids on the meta device a RuntimeError from .item()."""
    from mamba_deploy.errors import ShapeError

    model = load_model(DEMO2)
    with pytest.raises(ShapeError, match=r"copy_: the other state's conv is \(\d+, 3,"):
        model.new_state(2).copy_(model.new_state(3))
    with pytest.raises(ShapeError, match=r"select: row 5 is outside this state's batch of 2"):
        model.new_state(2).select([5])
    st = model.new_state(3)
    st.ssm.normal_()
    one = st.select(1)
    assert one.ssm.shape[1] == 1 and torch.equal(one.ssm[:, 0], st.ssm[:, 1])
    assert torch.equal(st.select(slice(1, None)).ssm, st.ssm[:, 1:])
    with pytest.raises(ShapeError, match="meta device"):
        model(torch.zeros(1, 3, dtype=torch.long, device="meta"))


def test_a_state_made_under_inference_mode_continues_through_forward():
    """model(ids, state) raised "Inplace update to inference tensor" for a state made inside
    torch.inference_mode (model.step took it). It now continues as a state made outside would."""
    model = load_model(DEMO2)
    first, then = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5]])
    with torch.inference_mode():
        st = model.new_state(1)
        model(first, state=st)
    normal = model.new_state(1)
    with torch.no_grad():
        model(first, state=normal)
        want = model(then, state=normal).logits
        got = model(then, state=st).logits
    assert torch.equal(got, want) and torch.equal(st.ssm, normal.ssm)


def test_a_transformers_mamba2_saved_with_rms_norm_false_loads_as_transformers_runs_it(tmp_path):
    """transformers' Mamba2 ignores rms_norm=false (it always builds, saves and applies the gated
    norm); the loader refused the checkpoint's norm weights as unexpected. Now it loads and gives
    transformers' logits; a model without the norm (mamba_ssm's rmsnorm=false) is refused by the
    hf writer instead of being saved as one transformers would run with a norm of ones."""
    import transformers

    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ConfigError

    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=128, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2,
                                    conv_kernel=4, head_dim=16, num_heads=8, n_groups=2, chunk_size=16, rms_norm=False)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)  # a norm of ones would hide a missing one
    hf.save_pretrained(tmp_path / "m")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    with torch.no_grad():
        want = hf(ids).logits
        got = load_model(tmp_path / "m")(ids).logits
    assert rel_err(got, want) < 1e-4
    ours = MambaConfig(arch="mamba2", d_model=64, n_layer=2, vocab_size=128, d_state=16, headdim=16, ngroups=2,
                       rmsnorm=False)
    with pytest.raises(ConfigError, match="cannot express rmsnorm=False.*--format mamba_ssm"):
        ours.to_hf_dict()


# ---- README review ------------------------------------------------------------------------------

def test_serve_forever_ends_when_its_scheduler_is_stopped():
    """The model loop ending without shutdown() (a signal handler's scheduler.stop()) left
    serve_forever waiting for its accept thread forever; now it stops accepting and returns."""
    import threading

    from mamba_deploy.runners.torch_runner import TorchRunner
    from mamba_deploy.serve import make_server

    server = make_server(TorchRunner(load_model(DEMO2)), "127.0.0.1", 0, quiet=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    server.scheduler.stop()
    t.join(10)
    assert not t.is_alive()
    server.server_close()


LOST_INTERRUPT = r'''
import os, signal, sys, time, weakref
import mamba_deploy.batching as batching

real_run = batching.Scheduler.run

class Handle:
    pass

def run(self):
    # the first SIGTERM arrives while the main thread runs a finalizer (as a llama.cpp state's
    # does): the handler's KeyboardInterrupt is raised inside it, and Python drops it
    h = Handle()
    weakref.finalize(h, lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(1)))
    del h
    return real_run(self)

batching.Scheduler.run = run
from mamba_deploy.cli import main
sys.exit(main(["serve", sys.argv[1], "--port", "0", "--quiet"]))
'''


def test_serve_stops_when_the_signal_lands_in_a_finalizer(tmp_path):
    """A Ctrl-C / SIGTERM whose KeyboardInterrupt was raised inside a finalizer (a llama.cpp
    state's weakref.finalize: seen in 2 of 8 runs of 12 concurrent requests) was dropped by
    Python, and the server ran on for good: every later signal only printed "already shutting
    down" and only SIGKILL ended it. The handler now also stops the model loop: exit 0."""
    import os
    import subprocess
    import sys

    script = tmp_path / "lost.py"
    script.write_text(LOST_INTERRUPT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(DEMO2)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the server ignored its SIGTERM: {err[-500:]}")
    assert proc.returncode == 0, err
    assert "Exception ignored" in err  # the interrupt was indeed lost in the finalizer


def test_bench_without_matplotlib_writes_its_tables_and_says_why_no_plots(hf_checkpoint, tmp_path, monkeypatch,
                                                                       capsys):
    """README calls the `bench` extra "bench's plots", but without matplotlib bench refused to run
    at all. Now it writes results.json and results.md, names the extra to install, and removes an
    earlier run's plots rather than leave them beside tables they do not belong to."""
    import json
    import sys

    from mamba_deploy.cli import main

    folder, _ = hf_checkpoint("mamba")
    out = tmp_path / "bench"
    tiny = ["--batch", "1", "--prompt-len", "3", "--gen-len", "2", "--warmup", "0", "--repeats", "1", "--quiet"]
    assert main(["bench", str(folder), "--out", str(out), *tiny]) == 0
    assert (out / "throughput_vs_batch.png").exists()  # with matplotlib: the plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match=r"matplotlib is not installed: bench writes results.json and results.md, "
                                         r"no plots; .*mamba-deploy\[bench\]"):
        assert main(["bench", str(folder), "--out", str(out), *tiny]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    assert json.loads((out / "results.json").read_text())["results"]


def test_export_gguf_threads_below_zero_names_zero_as_allowed(capsys, tmp_path):
    """--threads -1 said "threads must be an integer >= 1", though 0 (every core) is accepted."""
    from mamba_deploy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", "gguf", str(DEMO2), str(tmp_path / "x.gguf"), "--threads", "-1"])
    assert e.value.code == 2
    assert "threads must be 0 (every core) or a count >= 1, got -1" in capsys.readouterr().err


def test_train_says_when_the_warmup_is_longer_than_the_run(tmp_path, capsys):
    """--warmup 2000 --steps 10 trained at a fraction of --lr without a word."""
    from mamba_deploy.cli import main

    assert main(["train", "--preset", "tiny-mamba2", "--tokenizer", str(DEMO2), "--data-cache", str(tmp_path / "c"),
                 "--batch", "2", "--seq-len", "32", "--eval-batch", "2", "--eval-every", "2", "--steps", "2",
                 "--warmup", "8", "--lr", "0.004", "--out", str(tmp_path / "m")]) == 0
    assert "note: --warmup 8 >= --steps 2: the learning rate rises to 0.001 at most, never to --lr 0.004" \
        in capsys.readouterr().err


def test_a_hub_id_with_hf_hub_offline_already_set_is_not_told_to_set_it(monkeypatch, tmp_path):
    """With HF_HUB_OFFLINE=1 set and the id not cached, the error advised "use the cache with
    HF_HUB_OFFLINE=1"."""
    from mamba_deploy.errors import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: never a network request here
    with pytest.raises(ModelNotFoundError) as e:
        load_model("state-spaces/no-such-model-24")
    assert "HF_HUB_OFFLINE is set (offline) and the hub cache does not hold it" in str(e.value)
    assert "with HF_HUB_OFFLINE=1" not in str(e.value)


# ---- GGUF review --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_m1(ckpt, tmp_path_factory):
    pytest.importorskip("gguf")
    from mamba_deploy.export.gguf import export_gguf

    folder, hf = ckpt("mamba")
    return export_gguf(folder, tmp_path_factory.mktemp("g24m1") / "m.gguf", outtype="f32"), folder, hf


@pytest.mark.parametrize("name", ["blk.0.ssm_a", "blk.1.ssm_conv1d.weight", "blk.0.attn_norm.weight"])
def test_llamacpp_refuses_f16_where_it_needs_f32_instead_of_aborting(gguf_m1, tmp_path, name):
    """ssm_a, the conv or a norm stored as F16 (llama.cpp's converter keeps them F32) passed every
    check and then killed the process in llama.cpp (GGML_ASSERT, SIGABRT). Now the runner names the
    tensor; the torch backend still runs the file, with the f32 file's logits to F16 rounding."""
    import gguf
    import numpy as np

    from conftest import rewrite_gguf
    from mamba_deploy.errors import CheckpointError
    from mamba_deploy.runners import open_runner

    pytest.importorskip("llama_cpp")
    src = gguf_m1[0]
    data = next(t.data for t in gguf.GGUFReader(str(src)).tensors if t.name == name)
    bad = rewrite_gguf(src, tmp_path / "bad.gguf", tensors={name: np.asarray(data, np.float16)})
    with pytest.raises(CheckpointError, match=rf"{name} is F16; llama.cpp needs F32 there .*--backend torch"):
        open_runner(bad, "llama.cpp", threads=1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert rel_err(load_model(bad)(ids).logits, load_model(src)(ids).logits) < 1e-2


@pytest.mark.parametrize("offset,problem", [(32, "where the tensors before it end at 0"),
                                            (4, "not a multiple of the file's alignment 32")])
def test_a_gguf_with_a_wrong_tensor_offset_is_refused(gguf_m1, tmp_path, offset, problem):
    """An edited tensor offset (overlapping the next tensors, or unaligned) loaded shifted bytes as
    weights (convert wrote embeddings off by up to 13.6); llama.cpp refuses such files, and now so
    does the GGUF reader."""
    import struct

    import gguf

    from mamba_deploy.errors import CheckpointError

    src = gguf_m1[0]
    raw = bytearray(src.read_bytes())
    t = gguf.GGUFReader(str(src)).tensors[0]
    at = t.field.offset + 8 + len(t.name.encode())  # the name's u64 length, then the name
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<Q", raw, at + 4 + 8 * n_dims + 4, offset)  # past n_dims, the dims and the type
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"is corrupt: tensor .*{problem}"):
        load_model(bad)


def test_gguf_token_types_are_optional_and_merges_are_not(gguf_m1, tmp_path):
    """Without the optional tokenizer.ggml.token_type (llama.cpp reads every token as normal) the
    torch backend had no tokenizer; now it tokenizes as llama.cpp does. Without the merges of a
    byte-level BPE (llama.cpp refuses the file) it tokenized byte by byte without a word; now it
    says so and has no tokenizer."""
    from conftest import rewrite_gguf
    from mamba_deploy.runners import open_runner

    pytest.importorskip("llama_cpp")
    src = gguf_m1[0]
    no_types = rewrite_gguf(src, tmp_path / "t.gguf", drop=lambda k: k == "tokenizer.ggml.token_type")
    text = "the quick brown fox, hello mamba"
    assert open_runner(no_types, "torch").tokenizer.encode(text) == \
        open_runner(no_types, "llama.cpp", threads=1).tokenizer.encode(text)
    no_merges = rewrite_gguf(src, tmp_path / "m.gguf", drop=lambda k: k == "tokenizer.ggml.merges")
    from mamba_deploy.export.gguf_import import gguf_tokenizer, open_reader

    with pytest.warns(UserWarning, match="without tokenizer.ggml.merges, which llama.cpp refuses too"):
        assert gguf_tokenizer(open_reader(no_merges), no_merges) is None


def test_verify_of_a_model_without_a_conv_state(hf_checkpoint, tmp_path, capsys):
    """conv_kernel 1 (no conv state): verify died with "max(): Expected reduction dim" on the
    empty conv state, and the ONNX export's prefill returned the whole input as present_conv (a
    Slice from -0), which ONNX Runtime refused. Export (validated against PyTorch) and verify pass."""
    from conftest import build_hf_model
    from mamba_deploy.cli import main
    from mamba_deploy.export.onnx import export_onnx

    pytest.importorskip("onnxruntime")
    build_hf_model("mamba", conv_kernel=1).save_pretrained(tmp_path / "m")
    export_onnx(tmp_path / "m", tmp_path / "onnx")
    assert main(["verify", str(tmp_path / "m"), str(tmp_path / "onnx"), "--lengths", "4", "--batch", "1",
                 "--quiet"]) == 0
    assert "PASSED" in capsys.readouterr().out


def test_verify_against_a_folder_that_holds_the_same_rounding_uses_the_artifacts_own_limits(tmp_path, capsys):
    """A folder converted from a q8_0 GGUF records q8_0; an f32 GGUF exported from it records it
    too. verify of that pair took q8_0's limits though both sides hold the same float32 weights,
    so a tensor scaled by 1.5 passed. Now the shared rounding is the reference's own: fp32 limits
    (the untouched file passes them, the corrupted one fails)."""
    import gguf

    from mamba_deploy.cli import main
    from mamba_deploy.export.gguf import export_gguf

    q8 = export_gguf(DEMO2, tmp_path / "q8.gguf", outtype="q8_0")
    assert main(["convert", str(q8), str(tmp_path / "ckpt")]) == 0
    good = export_gguf(tmp_path / "ckpt", tmp_path / "f32.gguf", outtype="f32")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes())
    reader = gguf.GGUFReader(str(bad), "r+")
    next(t for t in reader.tensors if t.name == "blk.1.ssm_d").data[:] *= 1.5
    reader.data.flush()
    del reader
    common = ["--backend", "torch", "--lengths", "7", "--batch", "2", "--quiet"]
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "ckpt"), str(good), *common]) == 0
    assert "logits_rel" in (out := capsys.readouterr().out) and "limit <= 0.0001" in out
    assert main(["verify", str(tmp_path / "ckpt"), str(bad), *common]) != 0


def test_inspect_of_a_gguf_reads_no_weights(gguf_m1, monkeypatch, capsys):
    """inspect FILE.gguf dequantized the whole model to float32 to print its metadata (12.9 s and
    1.4 GB for a 135 MB Q4_0 file; ~28 GB for a 7B one). It reads the headers only now, and
    reports what the loaded model has."""
    import json

    from mamba_deploy.cli import main
    from mamba_deploy.export import gguf_import

    path = gguf_m1[0]
    model = load_model(path)

    def no_weights(*a, **k):
        raise AssertionError("inspect read the weights")

    monkeypatch.setattr(gguf_import, "load_gguf", no_weights)
    monkeypatch.setattr(gguf_import, "_fill", no_weights)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert (info["d_model"], info["n_layer"], info["vocab_size"]) == (model.config.d_model, model.config.n_layer,
                                                                      model.config.vocab_size)
