"""Interrupts and full disks in long CLI work: Ctrl-C / SIGTERM end with one line (130 / 143) and
no traceback, a full disk is a typed error naming the output, and neither leaves a partial output
or a temporary beside it."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mamba_deploy import data, train
from mamba_deploy.errors import OutputPathError

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "models" / "demo-mamba1")
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cli(args, code="", limit=None, timeout=120):
    """`mamba-deploy ARGS` in a child Python, after running `code` there (a patch), under a
    file-size limit of `limit` bytes (writes past it fail with EFBIG, as on a full disk)."""
    def fsize():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    script = f"import sys\n{code}\nfrom mamba_deploy.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=fsize if limit else None)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ Ctrl-C / SIGTERM at start-up

# the signal arrives while the parser imports the stages' modules (a second or more of a real run)
_SIGNAL_WHILE_LOADING = """
import importlib, signal
real = importlib.import_module
def import_module(name, *a, **k):
    if name == "mamba_deploy.bench":
        signal.raise_signal(signal.{sig})
    return real(name, *a, **k)
importlib.import_module = import_module
"""


@pytest.mark.parametrize("sig,rc,word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_signal_while_the_command_line_is_read_is_one_line(sig, rc, word, tmp_path):
    """Before: the parser was built outside main's try, so Ctrl-C there was a KeyboardInterrupt
    traceback and SIGTERM killed the process without a word."""
    p = _cli(["export", "gguf", DEMO, str(tmp_path / "m.gguf")], _SIGNAL_WHILE_LOADING.replace("{sig}", sig))
    assert p.returncode == rc, p.stderr
    assert p.stderr.strip() == word and "Traceback" not in p.stderr
    assert _entries(tmp_path) == []


# Ctrl-C while torch is imported: the first second or more of every run
_CTRL_C_IN_TORCH_IMPORT = """
import runpy, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["mamba-deploy", "inspect", "models/demo-mamba1"]
runpy.run_module("mamba_deploy", run_name="__main__")
"""


def test_ctrl_c_while_torch_is_imported_is_one_line():
    """Before: `mamba_deploy/__init__` and the console script's module imported torch before any
    of the CLI's handlers existed: a KeyboardInterrupt traceback."""
    p = subprocess.run([sys.executable, "-c", _CTRL_C_IN_TORCH_IMPORT], env=ENV, capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert (p.returncode, p.stderr) == (130, "interrupted\n"), p.stderr


def test_the_console_script_imports_no_torch_before_its_main_runs():
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mamba-deploy"]
    module, func = target.split(":")
    code = f"import sys, {module} as m; assert callable(m.{func}); print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", (target, p.stdout, p.stderr)


# the terminal goes away once the export has written its folder's manifest, before the rename
_HANGUP_MID_EXPORT = """
import signal
import mamba_deploy.export.onnx as ex
{nohup}
real = ex.write_manifest
def write_manifest(*a, **k):
    real(*a, **k)
    signal.raise_signal(signal.SIGHUP)
ex.write_manifest = write_manifest
"""


def test_hangup_mid_export_cleans_up_like_sigterm(tmp_path):
    """Before: SIGHUP (a closed terminal or SSH session) killed the process at once and left the
    export's temporary folder .o.tmp-* behind."""
    pytest.importorskip("onnxruntime")
    p = _cli(["export", "onnx", DEMO, str(tmp_path / "o")], _HANGUP_MID_EXPORT.replace("{nohup}", ""))
    assert p.returncode == 128 + 1, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "hung up" and "Traceback" not in p.stderr
    assert _entries(tmp_path) == []


def test_hangup_under_nohup_is_still_ignored(tmp_path):
    pytest.importorskip("onnxruntime")
    p = _cli(["export", "onnx", DEMO, str(tmp_path / "o")],
             _HANGUP_MID_EXPORT.replace("{nohup}", "signal.signal(signal.SIGHUP, signal.SIG_IGN)"))
    assert p.returncode == 0, p.stderr
    assert _entries(tmp_path) == ["o"] and (tmp_path / "o" / "model.onnx").is_file()


# llama.cpp's quantizer, replaced by one that calls back into Python from C (as its log callback
# does) and the terminal closing while that callback runs: a Python exception there is printed
# and dropped by ctypes
_HANGUP_IN_A_C_CALLBACK = """
import ctypes, signal
import llama_cpp
libc = ctypes.CDLL(None)

@ctypes.CFUNCTYPE(None)
def log_callback():
    getattr(libc, "raise")(signal.SIGHUP)
    sum(range(1000))  # the handler runs here, inside the callback

def quantize(src, dst, params):
    log_callback()
    with open(dst, "wb") as f:
        f.write(b"GGUF")
    return 0
llama_cpp.llama_model_quantize = quantize
"""


def test_hangup_inside_llamacpp_quantize_is_not_lost(tmp_path):
    """Before: SIGINT and SIGTERM were held back during llama.cpp's call, SIGHUP was not: raised
    inside its log callback it was dropped, and the export went on to write its file."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    p = _cli(["export", "gguf", DEMO, str(tmp_path / "m.gguf"), "--outtype", "q4_k_m"], _HANGUP_IN_A_C_CALLBACK)
    assert p.returncode == 128 + 1, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == "hung up"
    assert _entries(tmp_path) == []


# ------------------------------------------------------------------ full disk, end to end

def test_gguf_export_onto_a_full_disk_keeps_the_previous_file(tmp_path):
    """Before: a traceback (numpy's "N requested and M written" OSError). Now: exit 2, one error
    naming the output and the fix; the earlier file is untouched, no temporary left."""
    pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"PREVIOUS")
    p = _cli(["export", "gguf", DEMO, str(out)], limit=1 << 20)  # the demo model's GGUF is ~7 MB
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert f"error: no space left to write {out}" in p.stderr and "Free space on that disk" in p.stderr
    assert out.read_bytes() == b"PREVIOUS"
    assert _entries(tmp_path) == ["m.gguf"]


def test_convert_onto_a_full_disk_leaves_no_folder(tmp_path):
    """safetensors reports a full disk as SafetensorError ("os error 27/28"), not OSError."""
    out = tmp_path / "c"
    p = _cli(["convert", DEMO, str(out)], limit=1 << 20)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and f"error: no space left to write {out}" in p.stderr
    assert _entries(tmp_path) == []


# ------------------------------------------------------------------ full disk, in process

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_verify_json_onto_a_full_disk_is_a_typed_error(tmp_path, monkeypatch):
    from mamba_deploy.atomic import write_json

    out = tmp_path / "v.json"
    out.write_text("PREVIOUS")
    monkeypatch.setattr(Path, "write_bytes", _enospc)
    with pytest.raises(OutputPathError, match="no space left to write .*v.json.*Free space"):
        write_json(out, {"a": 1})
    assert out.read_text() == "PREVIOUS" and _entries(tmp_path) == ["v.json"]


def test_bench_results_onto_a_full_disk_leave_no_empty_folder(tmp_path, monkeypatch):
    """Before: write_outputs made --out first, so a failed write left an empty folder there (and a
    raw OSError)."""
    pytest.importorskip("matplotlib")
    from mamba_deploy import bench as B

    monkeypatch.setattr(B, "_png", lambda fig: b"png")
    monkeypatch.setattr(B, "_plot", lambda *a, **k: None)
    monkeypatch.setattr(B, "markdown_table", lambda d: "table")
    monkeypatch.setattr(Path, "write_bytes", _enospc)
    out = tmp_path / "b"
    with pytest.raises(OutputPathError, match="no space left to write"):
        B.write_outputs({"settings": {"gen_len": 1}}, out)
    assert _entries(tmp_path) == []


# ------------------------------------------------------------------ train: its own writers

def _model():
    from mamba_deploy.model import MambaLM

    model = MambaLM(train.build_config("tiny-mamba2", 64, 0, 1))
    train.init_weights(model, 0)
    model.source_path = ROOT / "models" / "demo-mamba2"  # its tokenizer files go into the snapshot
    return model


def _save_state(path, model):
    opt = torch.optim.AdamW(model.parameters())
    train.save_training_state(path, model, opt, 1, np.random.default_rng(0), [], "tiny-mamba2")


def test_training_state_save_interrupted_leaves_no_temporary(tmp_path, monkeypatch):
    """Before: torch.save wrote train_state.pt.tmp, never removed when interrupted."""
    path = tmp_path / "train_state.pt"
    path.write_bytes(b"PREVIOUS")
    real = torch.save

    def interrupted(obj, f, *a, **k):
        real(obj, f, *a, **k)  # written in full, then Ctrl-C before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save_state(path, _model())
    assert path.read_bytes() == b"PREVIOUS" and _entries(tmp_path) == ["train_state.pt"]


def test_training_state_on_a_full_disk_is_a_typed_error(tmp_path, monkeypatch):
    def full(obj, f, *a, **k):  # torch's zip writer's own words for a short write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9600 vs 9494")

    monkeypatch.setattr(torch, "save", full)
    path = tmp_path / "train_state.pt"
    with pytest.raises(OutputPathError, match=f"no space left to write {path}"):
        _save_state(path, _model())
    assert _entries(tmp_path) == []


def test_snapshot_interrupted_while_writing_its_log_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Before: only the renames were guarded, so an interrupt while train_log.json was written
    left the whole new snapshot behind as .out.snap-*."""
    model, out = _model(), tmp_path / "out"
    train.save_snapshot(model, out, torch.float16, {"step": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.write_text

    def write_text(self, text, *a, **k):
        if self.name == "train_log.json":
            raise KeyboardInterrupt
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(KeyboardInterrupt):
        train.save_snapshot(model, out, torch.float16, {"step": 2})
    assert _entries(tmp_path) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_interrupted_ends_with_the_message_not_the_bar(tmp_path, monkeypatch, capfd):
    """Before: the progress bar, left open, was drawn again after "interrupted" when it was
    collected, so the message was not the last line."""
    from mamba_deploy.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(80):  # both splits get files
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 40)
    monkeypatch.setattr(data, "stdlib_root", lambda: corpus)
    calls = []
    real = train.train_step

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    rc = main(["train", "--preset", "tiny-mamba2", "--tokenizer", str(ROOT / "models" / "demo-mamba2"),
               "--out", str(tmp_path / "out"), "--data-cache", str(tmp_path / "cache"), "--steps", "10",
               "--batch", "2", "--seq-len", "16"])
    import gc

    gc.collect()  # where the bar used to be drawn again
    err = capfd.readouterr().err
    assert rc == 130
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1] == "interrupted", lines[-3:]
    # the two steps done were saved (thirty-fifth session; before, an interrupt kept nothing)
    assert any(ln.startswith("saved step 2 to") for ln in lines), lines[-4:]
    assert json.loads((tmp_path / "out" / "train_log.json").read_text())["steps"] == 2


# ------------------------------------------------------------------ encoding a corpus

class _CountingTokenizer:
    eos_token_id = 0

    def __init__(self):
        self.calls = []

    def encode(self, text):
        return [len(w) for w in text.split()]

    def encode_batch(self, texts):
        self.calls.append(len(texts))
        return [self.encode(t) for t in texts]


def test_encode_split_calls_the_tokenizer_in_pieces(tmp_path):
    """Before: the whole split went to encode_batch in one call (seconds in the Rust tokenizer on
    the stdlib, where Ctrl-C waited for it to end). The stream is the same as file by file."""
    for i in range(101):
        (tmp_path / f"m{i:03d}.py").write_text(f"x = {i}\n" + "y " * i)
    tok = _CountingTokenizer()
    ids = data.encode_split(tok, "train", tmp_path).tolist()
    files = data.corpus_files("train", tmp_path)
    want = [t for text in data.corpus_texts("train", tmp_path) for t in tok.encode(text) + [0]]
    assert ids == want
    assert len(tok.calls) > 1 and max(tok.calls) <= len(files) // 2 and sum(tok.calls) == len(files)


# ------------------------------------------------------------------ OpenVINO's temporary graph

def test_openvino_copy_of_an_external_data_graph_interrupted_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch):
    """OpenVINO reads a graph with external weights through a stripped copy written into the ONNX
    folder. Before: an interrupt (or a full disk) while that copy was written left it there."""
    pytest.importorskip("openvino")
    import onnx

    import mamba_deploy.export.onnx as onnx_export
    from mamba_deploy.runners.openvino_runner import open_openvino

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    folder, _ = hf_checkpoint("mamba")
    out = onnx_export.export_onnx(folder, tmp_path / "ext")
    before = _entries(out)

    def interrupted(proto, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        open_openvino(out)
    assert _entries(out) == before


_SLOW_EXIT = """
import atexit, sys, time
sys.path.insert(0, {src!r})
from mamba_deploy.entry import main
atexit.register(time.sleep, 30)  # a slow exit callback of a library the command imported
sys.exit(main(["inspect", {model!r}, "--json"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_command_ends_the_exit_quietly(sig):
    """A signal while the interpreter runs its exit callbacks: the command had finished, so the
    process ends at once with its status (0 here). A Ctrl-C printed "Exception ignored in atexit
    callback ... KeyboardInterrupt" before and the exit went on."""
    import json
    import signal
    import time

    root = Path(__file__).resolve().parents[1]
    code = _SLOW_EXIT.format(src=str(root / "src"), model=str(root / "models" / "demo-mamba1"))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = [p.stdout.readline()]
        while lines[-1] not in ("}\n", ""):  # the JSON object, printed indented
            lines.append(p.stdout.readline())
        assert json.loads("".join(lines))["architecture"] == "mamba1"  # the command is done
        time.sleep(0.5)  # into the exit callbacks
        t = time.perf_counter()
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert time.perf_counter() - t < 10  # the 30 s callback did not run to its end
    assert p.returncode == 0, (p.returncode, err)
    assert "Exception ignored" not in err and "Traceback" not in err, err
