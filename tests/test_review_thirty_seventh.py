"""Thirty-seventh session: verify's recording of the reference keeps large answers on disk
(bounded memory), ..."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from test_runners import export_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return export_artifacts(tmp_path_factory.mktemp("runners37"))


def _spy_spill(monkeypatch):
    """Every _Spill made, with what it kept on disk and in memory."""
    from mamba_deploy import verify_replay as R

    made = []
    real_keep = R._Spill.keep

    def keep(self, value):
        out = real_keep(self, value)
        if self not in made:
            made.append(self)
        self.seen = getattr(self, "seen", []) + [(out, self.folder and sorted(os.listdir(self.folder)))]
        return out

    monkeypatch.setattr(R._Spill, "keep", keep)
    return made


def test_cli_verify_keeps_large_answers_on_disk_and_reports_the_same(artifacts, tmp_path, monkeypatch):
    """With every answer past the spill limit, the CLI's report is the one verify() gives with both
    runners open (the same numbers to the last bit), nothing large was held in memory, and the
    temporary folder is gone afterwards."""
    from mamba_deploy import verify as V
    from mamba_deploy import verify_replay as R
    from mamba_deploy.cli import main

    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(R, "SPILL_BYTES", 0)
    made = _spy_spill(monkeypatch)
    args = ["--lengths", "1,9", "--batch", "1,2", "--decode-steps", "3"]
    assert main(["verify", str(artifacts["torch"]), str(artifacts["onnx"]), *args, "--quiet",
                 "--json", str(tmp_path / "v.json")]) == 0
    (spill,) = made
    kept = [v for v, _ in spill.seen]
    assert kept and all(isinstance(v, R._OnDisk) for v in kept)
    assert any(v.is_state for v in kept) and any(not v.is_state for v in kept)
    assert len(spill.seen[-1][1]) == len(kept)  # one file per answer while recording
    assert not os.path.exists(spill.folder)
    ref, art, label = V.open_pair(artifacts["torch"], artifacts["onnx"])
    want = V.verify(ref, art, (1, 9), (1, 2), 3, label=label, progress=False).to_dict()
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["checks"] == json.loads(json.dumps(want["checks"])) and got["passed"] is True
    assert got["cases"] == json.loads(json.dumps(want["cases"]))


def test_small_answers_stay_in_memory(artifacts, monkeypatch):
    """Below the limit (the default 8 MiB; these logits are a few KB) no folder is made."""
    from mamba_deploy.cli import main

    made = _spy_spill(monkeypatch)
    assert main(["verify", str(artifacts["torch"]), str(artifacts["torch"]), "--lengths", "3", "--batch", "1",
                 "--decode-steps", "1", "--quiet"]) == 0
    assert made and all(s.folder is None for s in made)
    assert all(torch.is_tensor(v) or hasattr(v, "ssm") for s in made for v, _ in s.seen)


def test_a_full_disk_while_recording_is_an_output_path_error_and_leaves_no_folder(artifacts, monkeypatch, capsys):
    """torch.save failing (ENOSPC) says where the answers went and how to give them room; the
    folder goes with the failed run."""
    from mamba_deploy import verify_replay as R
    from mamba_deploy.cli import main

    monkeypatch.setattr(R, "SPILL_BYTES", 0)
    made = _spy_spill(monkeypatch)
    calls = []
    real_save = torch.save

    def save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(["verify", str(artifacts["torch"]), str(artifacts["torch"]), "--lengths", "3", "--batch", "1",
                 "--decode-steps", "1", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "No space left on device" in err and "TMPDIR" in err and made[0].folder in err
    assert not os.path.exists(made[0].folder)


# ---- quantize --calib FILE: a large file is read in windows, not tokenized whole -----------------

def _prose(n_lines: int, seed: int = 0) -> str:
    """Lines of seeded random words, each line starting with a letter (a window starting after a
    line break then tokenizes as the whole file does from that point)."""
    import random

    rng = random.Random(seed)
    words = ["state", "space", "model", "token", "scan", "layer", "decode", "chunk", "mamba", "head",
             "gate", "norm", "export", "graph", "weight", "quant"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ".\n" for _ in range(n_lines))


def _contains(seq: list[int], sub: list[int]) -> int:
    i = -1
    while True:
        try:
            i = seq.index(sub[0], i + 1)
        except ValueError:
            return -1
        if seq[i:i + len(sub)] == sub:
            return i


def test_a_large_calibration_file_is_tokenized_in_windows_spread_over_it(tmp_path, monkeypatch):
    """Reference: the tokenizer run on the whole file. Each window's ids are a run of the whole
    file's ids, the runs are spread from its start to its end, and no call tokenized more than
    a window's worth of text (the whole file was one call of 10x that)."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.quant import calib as C

    from test_review_twenty_fourth import DEMO2

    model = load_model(DEMO2)
    text = _prose(25000)
    f = tmp_path / "big.txt"
    f.write_bytes(text.encode())
    whole = model.tokenizer.encode(text)
    n_seq, seq_len = 6, 48
    span = C.WINDOW_BYTES_PER_TOKEN * (seq_len + C.PREFIX_MARGIN)
    assert len(text) > 4 * n_seq * span
    lengths = []
    real = type(model.tokenizer).encode
    monkeypatch.setattr(type(model.tokenizer), "encode",
                        lambda self, t, **k: lengths.append(len(t)) or real(self, t, **k))
    ids = C.calibration_ids(model, str(f), n_seq, seq_len)
    assert ids.shape == (n_seq, seq_len) and lengths and max(lengths) <= span
    at = [_contains(whole, row) for row in ids.tolist()]
    assert at[0] == 0 and all(a > 0 for a in at[1:]), at
    # the last window starts in the file's last `span` bytes (the text is ASCII: bytes = characters)
    assert at == sorted(at) and at[-1] >= len(real(model.tokenizer, text[:len(text) - span])) - 2


def test_calibration_windows_without_a_tokenizer_are_the_files_bytes(hf_checkpoint, tmp_path):
    """Reference: the file's bytes at each window's first line start, modulo the vocabulary."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.quant import calib as C

    folder, _ = hf_checkpoint("mamba2")
    model = load_model(folder)  # transformers' random checkpoint has no tokenizer
    raw = _prose(3000, seed=1).encode()
    (tmp_path / "c.txt").write_bytes(raw)
    n_seq, seq_len = 4, 40
    with pytest.warns(UserWarning, match="UTF-8 bytes"):
        ids = C.calibration_ids(model, str(tmp_path / "c.txt"), n_seq, seq_len)
    span = C.WINDOW_BYTES_PER_TOKEN * (seq_len + C.PREFIX_MARGIN)
    assert len(raw) > n_seq * span
    for row, start in zip(ids.tolist(), torch.linspace(0, len(raw) - span, n_seq).long().tolist()):
        s = start if start == 0 else raw.index(b"\n", start) + 1
        assert row == [b % model.config.vocab_size for b in raw[s:s + seq_len]]


def test_invalid_utf8_inside_a_calibration_window_names_the_file_and_offset(hf_checkpoint, tmp_path):
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.checkpoint import load_model

    folder, _ = hf_checkpoint("mamba")
    model = load_model(folder)
    raw = bytearray(_prose(3000, seed=2).encode())
    raw[100:102] = b"\xff\xfe"  # inside the first window
    (tmp_path / "bad.txt").write_bytes(bytes(raw))
    from mamba_deploy.quant.calib import calibration_ids

    with pytest.warns(UserWarning, match="UTF-8 bytes"), \
            pytest.raises(QuantizationError, match=r"bad\.txt.*as UTF-8 text.*from byte 0.*iconv"):
        calibration_ids(model, str(tmp_path / "bad.txt"), 4, 40)


# ---- llama.cpp: Ctrl-C during a load ---------------------------------------------------------------

def test_ctrl_c_during_a_llama_cpp_load_reaches_the_caller(tiny_gguf, monkeypatch):
    """SIGINT arriving while llama.cpp loads (here raised from its log callback, where Python code
    runs during the load) was turned into a KeyboardInterrupt inside the ctypes callback, which
    ctypes printed and dropped: the load went on. It now reaches the caller once llama.cpp
    returns, Python's handler is back, and the next load works."""
    import signal

    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp import _logger

    from mamba_deploy.runners import open_runner

    real = _logger.llama_log_callback
    fired = []

    @llama_cpp.llama_log_callback
    def forward(level, text, user_data):
        if not fired:
            fired.append(level)
            signal.raise_signal(signal.SIGINT)
        real(level, text, user_data)

    monkeypatch.setattr(_logger, "llama_log_callback", forward)
    try:
        with pytest.raises(KeyboardInterrupt):
            open_runner(tiny_gguf, "llama.cpp", threads=1)
    finally:
        llama_cpp.llama_log_set(real, None)
    assert fired and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(_logger, "llama_log_callback", real)
    r = open_runner(tiny_gguf, "llama.cpp", threads=1)
    logits, _ = r.prefill(torch.tensor([[1, 2, 3]]), r.new_state(1))
    assert torch.isfinite(logits).all()
    r.close()


# ---- Falcon-Mamba through llama.cpp: the stated bound over lengths and seeds -------------------

FALCON_LLAMA_TOL = 5e-3  # README's llama.cpp row: llama.cpp normalises dt/B/C with the layer eps


def _llama_errors(path, hf, lengths, seeds, steps=8, left_pad=False):
    """Worst relative logits error of llama.cpp on `path` against transformers `hf`, per case:
    prefill of each length at batch 3, then `steps` teacher-forced steps."""
    from conftest import rel_err
    from mamba_deploy.runners import open_runner

    worst = {}
    with open_runner(path, "llama.cpp", n_threads=1) as lr:
        for seed in seeds:
            for length in lengths:
                ids = torch.randint(0, 100, (3, length + steps), generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    want = hf(ids).logits.float()
                got, st = lr.prefill(ids[:, :length], lr.new_state(3))
                errs = [rel_err(got, want[:, :length])]
                for t in range(length, length + steps):
                    step, st = lr.step(ids[:, t], st)
                    errs.append(rel_err(step, want[:, t]))
                worst[seed, length] = max(errs)
    return worst


def test_falcon_mamba_on_llama_cpp_within_its_stated_bound_and_why(ckpt, tmp_path, tiny_tokenizer):
    """README said <= 1e-3 (one input per length); a review measured 3.7e-3 at length 1000 on
    another seed. Over lengths 1..1000 and three seeds it stays within 5e-3, the stated bound. The
    control: the same model with mixer_rms_eps equal to the layer eps meets F32's 1e-5, so the gap
    is llama.cpp's eps, not the export."""
    import shutil
    import warnings

    pytest.importorskip("llama_cpp")
    from conftest import build_hf_model
    from mamba_deploy.export.gguf import export_gguf

    folder, hf = ckpt("falcon_mamba")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_gguf(folder, tmp_path / "falcon.gguf")
    worst = _llama_errors(path, hf, (1, 7, 17, 257, 1000), (0, 1, 2))
    print({k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= FALCON_LLAMA_TOL, worst
    assert max(worst.values()) > 1e-5  # the eps gap is there to see: the control below removes it

    same = build_hf_model("falcon_mamba", mixer_rms_eps=hf.config.layer_norm_epsilon)
    same.save_pretrained(tmp_path / "same")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_tokenizer / f, tmp_path / "same" / f)
    path = export_gguf(tmp_path / "same", tmp_path / "same.gguf")
    control = _llama_errors(path, same, (7, 1000), (1,))
    assert max(control.values()) <= 1e-5, control


# ---- the Python API, as a library user calls it (review) ---------------------------------------

def test_copy_of_a_torch_state_is_a_fork(hf_checkpoint):
    """copy.copy(state) shared the tensors every step updates in place, so two branches gave
    different logits for the same token. Reference: transformers on each branch's whole sequence."""
    import copy

    from conftest import rel_err
    from mamba_deploy.runners import open_runner

    folder, hf = hf_checkpoint("mamba2")
    r = open_runner(folder, "torch")
    _, st = r.prefill(torch.tensor([[5, 6, 7]]), r.new_state(1))
    fork = copy.copy(st)
    assert fork.ssm.data_ptr() != st.ssm.data_ptr()
    a, _ = r.step(torch.tensor([10]), st)
    b, _ = r.step(torch.tensor([11]), fork)
    with torch.no_grad():
        want = hf(torch.tensor([[5, 6, 7, 10], [5, 6, 7, 11]])).logits[:, -1]
    assert rel_err(a[0], want[0]) < 1e-4 and rel_err(b[0], want[1]) < 1e-4


def test_set_tokenizer_loads_a_path_and_refuses_what_is_not_this_models(hf_checkpoint, tmp_path):
    """A path was stored as the tokenizer (the prompt then went to str.encode as an encoding name),
    and another model's larger tokenizer was taken and gave garbage. Reference for the path: the
    `tokenizers` library on the same tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer

    from conftest import write_tiny_bpe
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.runners import open_runner

    from test_review_twenty_fourth import DEMO2

    folder, _ = hf_checkpoint("mamba")  # vocab 128, no tokenizer files
    (tmp_path / "tok").mkdir()
    write_tiny_bpe(tmp_path / "tok")
    r = open_runner(folder, "torch")
    r.set_tokenizer(str(tmp_path / "tok"))
    want = HFTokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode("the state").ids
    assert r.tokenizer.encode("the state") == want
    with pytest.raises(ConfigError, match=r"4096 tokens, more than the model's vocabulary of 128"):
        r.set_tokenizer(str(DEMO2))
    with pytest.raises(ConfigError, match=r"set_tokenizer\(42\).*got int"):
        r.set_tokenizer(42)
    assert r.tokenizer.encode("the state") == want  # unchanged by the refused calls


def test_a_state_made_under_inference_mode_decodes_in_bf16_outside_it(hf_checkpoint):
    """The PyTorch step (16-bit models, 16-bit states, CUDA eager) wrote the state in place
    without the inference-mode guard the parallel path had: RuntimeError on the first step.
    Reference: transformers fp32 on the whole sequence, at bf16's 3e-2."""
    from conftest import rel_err
    from mamba_deploy import load_model

    for kind in ("mamba", "mamba2"):
        folder, hf = hf_checkpoint(kind)
        model = load_model(folder, dtype=torch.bfloat16)
        with torch.inference_mode():
            st = model.new_state(1)
            model(torch.tensor([[1, 2, 3]]), state=st)
        model(torch.tensor([[4, 5]]), state=st)
        got = model(torch.tensor([[6]]), state=st).logits[:, -1].float()
        with torch.no_grad():
            want = hf(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[:, -1]
        assert rel_err(got, want) < 3e-2, kind


def test_non_finite_weights_are_refused_before_a_gguf_or_checkpoint_is_written(ckpt, tmp_path):
    """export_gguf and save_checkpoint wrote a NaN weight; load_model then called the file corrupt
    and said to re-export it, which wrote the same file."""
    from mamba_deploy import load_model, save_checkpoint
    from mamba_deploy.errors import CheckpointError, ExportError
    from mamba_deploy.export.gguf import export_gguf

    model = load_model(ckpt("mamba2")[0])
    with torch.no_grad():
        model.backbone.layers[1].mixer.in_proj.weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"NaN or inf values in backbone\.layers\.1\.mixer\.in_proj\.weight"):
        export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match=r"NaN or inf values in backbone\.layers\.1\.mixer\.in_proj\.weight"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_save_checkpoint_of_something_else_is_a_checkpoint_error(hf_checkpoint, tmp_path):
    from mamba_deploy import save_checkpoint
    from mamba_deploy.errors import CheckpointError

    folder, hf = hf_checkpoint("mamba2")
    for bad in (str(folder), hf):
        with pytest.raises(CheckpointError, match="takes a mamba_deploy model"):
            save_checkpoint(bad, tmp_path / "out")


def test_llama_cpp_tokenizer_decodes_what_the_other_tokenizer_decodes(tiny_gguf):
    """decode(100) and decode of a (1, n) tensor failed with raw errors, and a float id was
    truncated; the tokenizer's class says "same interface as ours". Reference: `tokenizers` on
    the decode of a plain list of ids; past-vocabulary ids dropped, as `tokenizers` does."""
    pytest.importorskip("llama_cpp")
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.runners import open_runner

    r = open_runner(tiny_gguf, "llama.cpp", threads=1)
    lt = r.tokenizer
    ids = lt.encode("the state space")
    assert lt.decode(torch.tensor([ids])) == lt.decode(ids) == lt.decode(np_array(ids))
    assert lt.decode(ids[0]) == lt.decode([ids[0]])
    assert lt.decode(ids + [lt.vocab_size + 5]) == lt.decode(ids)  # past the vocabulary: nothing
    for bad in ([float(ids[0])], [[1, 2], [3, 4]], [-1]):
        with pytest.raises(ShapeError):
            lt.decode(bad)
    r.close()


def np_array(ids):
    import numpy as np

    return np.asarray(ids, dtype=np.int64)


def test_bench_refuses_targets_and_counts_it_cannot_measure(hf_checkpoint):
    """A bare path was unpacked into (artifact 'm', backend '2'), gen_len 2.0 was a TypeError,
    repeats=0 a StatisticsError, batch 1.7 ran as 1."""
    from mamba_deploy.bench import bench_config, run_bench
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.runners import open_runner

    folder, _ = hf_checkpoint("mamba2")
    with pytest.raises(ConfigError, match=r"\(artifact, backend\) pairs.*parse_targets"):
        run_bench([str(folder)], [1], [4], 2, progress=False)
    for kw, what in ((dict(gen_len=2.0), "gen_len"), (dict(batches=[1.7]), "batches"), (dict(repeats=0), "repeats")):
        args = dict(targets=[(str(folder), "torch")], batches=[1], prompt_lens=[4], gen_len=2, progress=False)
        with pytest.raises(ConfigError, match=what):
            run_bench(**{**args, **kw})
    r = open_runner(folder, "torch")
    with pytest.raises(ConfigError, match="repeats"):
        bench_config(r, 1, 4, 2, warmup=0, repeats=0)


def test_stop_token_ids_as_a_0d_tensor_stops_there(hf_checkpoint):
    """Reference: transformers' greedy first token; with it as the stop id, generation stops
    before any token is kept (a stop id is not part of the output)."""
    from mamba_deploy import load_model

    folder, hf = hf_checkpoint("mamba2")
    with torch.no_grad():
        first = int(hf(torch.tensor([[1, 2]])).logits[0, -1].argmax())
    model = load_model(folder)
    assert model.generate([[1, 2]], max_new_tokens=5, stop_token_ids=[]).tokens[0][0] == first
    assert model.generate([[1, 2]], max_new_tokens=5, stop_token_ids=torch.tensor(first)).tokens[0] == []


def test_a_missing_output_path_and_bad_reserve_rows_are_typed_errors(hf_checkpoint, tiny_gguf):
    from mamba_deploy.errors import OutputPathError, ShapeError
    from mamba_deploy.export.onnx import export_onnx
    from mamba_deploy.runners import open_runner

    folder, _ = hf_checkpoint("mamba2")
    with pytest.raises(OutputPathError, match="got NoneType None"):
        export_onnx(folder, None)
    runners = [open_runner(folder, "torch")]
    if pytest.importorskip("llama_cpp"):
        runners.append(open_runner(tiny_gguf, "llama.cpp", threads=1))
    for r in runners:
        for bad in ("4", -1, 2.5):
            with pytest.raises(ShapeError, match="batch must be an integer"):
                r.reserve_rows(bad)
        assert r.reserve_rows(2) >= 1
        r.close()


# ---- the same on a GPU (skip on CPU) -------------------------------------------------------------

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the reference's states live there and are read back on the CPU")
def test_cli_verify_on_cuda_keeps_large_answers_on_disk(artifacts, tmp_path, monkeypatch):
    """On CUDA the recorded states are on the GPU: spilled, they come back on the CPU, and the
    artifact's (on the GPU) is compared with them there. The same report as verify() with both
    runners open on the GPU."""
    from mamba_deploy import verify as V
    from mamba_deploy import verify_replay as R
    from mamba_deploy.cli import main

    monkeypatch.setattr(R, "SPILL_BYTES", 0)
    made = _spy_spill(monkeypatch)
    args = ["--lengths", "1,9", "--batch", "1,2", "--decode-steps", "3", "--device", "cuda"]
    assert main(["verify", str(artifacts["torch"]), str(artifacts["torch"]), *args, "--quiet",
                 "--json", str(tmp_path / "v.json")]) == 0
    assert made and any(isinstance(v, R._OnDisk) and v.is_state for v, _ in made[0].seen)
    ref, art, label = V.open_pair(artifacts["torch"], artifacts["torch"], device="cuda")
    want = V.verify(ref, art, (1, 9), (1, 2), 3, label=label, progress=False).to_dict()
    got = json.loads((tmp_path / "v.json").read_text())
    assert got["checks"] == json.loads(json.dumps(want["checks"])) and got["passed"] is True


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: its eager decode is the PyTorch step")
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_a_state_made_under_inference_mode_decodes_on_cuda(hf_checkpoint, kind):
    from conftest import rel_err
    from mamba_deploy import load_model

    folder, hf = hf_checkpoint(kind)
    model = load_model(folder, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        st = model.new_state(1)
        model(torch.tensor([[1, 2, 3]], device="cuda"), state=st)
    model(torch.tensor([[4, 5]], device="cuda"), state=st)
    got = model(torch.tensor([[6]], device="cuda"), state=st).logits[:, -1].float().cpu()
    with torch.no_grad():
        want = hf(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[:, -1]
    assert rel_err(got, want) < 3e-2


def test_llama_cpps_converter_takes_our_mamba_ssm_layout_mamba1(hf_checkpoint, tmp_path):
    """Our mamba_ssm layout wrote ssm_cfg.layer "Mamba1"; llama.cpp's converter named that
    Mamba1ForCausalLM and refused it. Reference: llama.cpp (through llama-cpp-python) on the
    converter's file against transformers."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    from conftest import build_hf_model, rel_err
    from mamba_deploy import load_model, save_checkpoint
    from mamba_deploy.runners import open_runner

    from test_gguf import _converter

    conv = _converter()
    if conv is None:
        pytest.skip("llama.cpp's converter not found: run `make install`")
    # the converter reads d_state and dt_rank from the top level only, where mamba_ssm has none: it
    # assumes mamba_ssm's defaults (16, ceil(d_model / 16)), so the model keeps them
    hf = build_hf_model("mamba", vocab_size=50280, state_size=16, time_step_rank=2)
    hf.save_pretrained(tmp_path / "hf")
    save_checkpoint(load_model(tmp_path / "hf"), tmp_path / "ssm", fmt="mamba_ssm")
    env = {**__import__("os").environ, "PYTHONPATH": str(conv.parent / "gguf-py")}
    run = subprocess.run([sys.executable, str(conv), str(tmp_path / "ssm"), "--outfile", str(tmp_path / "c.gguf"),
                          "--outtype", "f32"], cwd=conv.parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    with open_runner(tmp_path / "c.gguf", "llama.cpp", threads=1) as r:
        got, _ = r.prefill(ids, r.new_state(1))
    with torch.no_grad():
        want = hf(ids).logits
    assert rel_err(got, want) < 1e-4


def test_train_tokenizer_writes_only_its_result_to_a_redirected_stdout(tmp_path, capfd):
    """The tokenizers library's progress bar printed blank lines to stdout (file descriptor 1,
    outside Python's sys.stdout) even when it was not a terminal."""
    from mamba_deploy.cli import main

    assert main(["train-tokenizer", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    out = capfd.readouterr().out
    assert out.strip().startswith("wrote") and not out.startswith("\n"), repr(out[:80])


def test_a_spilled_answer_removed_during_the_run_is_an_output_path_error(artifacts, monkeypatch, capsys):
    """A tmp cleaner deleting verify's folder between the passes gave torch.load's raw error."""
    import shutil

    from mamba_deploy import verify_replay as R
    from mamba_deploy.cli import main

    monkeypatch.setattr(R, "SPILL_BYTES", 0)
    made = _spy_spill(monkeypatch)
    real = R.Replay.__init__

    def cleaned(self, recording):
        shutil.rmtree(recording.spill.folder)
        real(self, recording)

    monkeypatch.setattr(R.Replay, "__init__", cleaned)
    assert main(["verify", str(artifacts["torch"]), str(artifacts["torch"]), "--lengths", "3", "--batch", "1",
                 "--decode-steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not read back the reference's answer" in err and "TMPDIR" in err and made[0].folder in err


def test_an_unreadable_large_calibration_file_is_a_quantization_error(hf_checkpoint, tmp_path, monkeypatch):
    """The window reader opened the file itself: an OSError came out raw (read whole, it was typed)."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import calib as C

    folder, _ = hf_checkpoint("mamba")
    (tmp_path / "c.txt").write_bytes(_prose(3000).encode())

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(C, "open", denied, raising=False)
    with pytest.warns(UserWarning, match="UTF-8 bytes"), \
            pytest.raises(QuantizationError, match=r"cannot read calibration file .*c\.txt.*Permission denied"):
        C.calibration_ids(load_model(folder), str(tmp_path / "c.txt"), 4, 40)
