"""Command-line mistakes and interruptions: every one is a typed error (exit 2) or a clean stop
(130 / 143), raised before long work where it can be, and leaves no file behind."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from mamba_deploy.cli import main

DEMO = str(Path(__file__).resolve().parents[1] / "models" / "demo-mamba1")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("verb", [
    ["export", "onnx", DEMO, "{f}/x"],
    ["export", "gguf", DEMO, "{f}/x.gguf"],
    ["quantize", DEMO, "{f}/q", "--method", "int8"],
    ["convert", DEMO, "{f}/c"],
])
def test_output_under_a_file_is_a_user_error(verb, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main([a.format(f=tmp_path / "f") for a in verb]) == 2
    assert "is a file, not a folder; choose an output path under a folder" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []


def test_a_failed_command_leaves_no_empty_output_folders(tmp_path, capsys):
    """The output path is checked (its folders made) before the long work; when that work then
    fails, the folders made for it are removed again if still empty. Before: an empty out/a was
    left. A folder that existed before, or that holds an output, stays."""
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "out" / "a" / "b", tmp_path / "kept" / "new" / "b"):
        assert main(["convert", str(tmp_path / "no-such-model"), str(out)]) == 2
        assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())
    out = tmp_path / "made" / "m.gguf"
    assert main(["export", "gguf", DEMO, str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()


def test_gguf_output_that_is_a_folder(tmp_path, capsys):
    pytest.importorskip("gguf")
    (tmp_path / "d").mkdir()
    assert main(["export", "gguf", DEMO, str(tmp_path / "d")]) == 2
    assert "names a folder; give a file name" in capsys.readouterr().err
    assert list((tmp_path / "d").iterdir()) == []


def test_quantize_checks_its_output_and_options_before_work(tmp_path, capsys, monkeypatch):
    import mamba_deploy.checkpoint as ck

    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    monkeypatch.setattr(ck, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    assert main(["quantize", DEMO, str(tmp_path / "q"), "--method", "int8"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["quantize", DEMO, str(tmp_path / "q2"), "--method", "int8", "--group-size", "32"]) == 2
    assert "drop --group-size" in capsys.readouterr().err
    for bad in (["--group-size", "0"], ["--n-calib", "-2"], ["--calib-len", "x"]):
        with pytest.raises(SystemExit) as e:
            main(["quantize", DEMO, str(tmp_path / "q3"), "--method", "gptq", *bad])
        assert e.value.code == 2
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q3").exists()


@pytest.mark.parametrize("flags,code,needle", [
    (["--top-p", "2"], "argparse", "argument --top-p: 2 must be in (0, 1]"),
    (["--min-p", "1.5"], "argparse", "argument --min-p: 1.5 must be in [0, 1]"),
    (["--temperature", "-1"], "argparse", "must be >= 0"),
    (["--temperature", "nan"], "argparse", "not a finite number"),
    (["--repetition-penalty", "0"], "argparse", "must be > 0"),
    (["--max-new-tokens", "-3"], "argparse", "must be >= 0"),
    (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], 2, "cuda"),
    (["--device", "tpu"], 2, "unknown device 'tpu'"),
])
def test_generate_bad_settings(flags, code, needle, capsys):
    argv = ["generate", DEMO, "--prompt", "def f(", "--max-new-tokens", "2", *flags]
    if code == "argparse":
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("t", ["1e-45", "1e-300", "5e-324"])
def test_tiny_temperature_is_greedy(capsys, t):
    """logits / 1e-45 overflowed to inf and the softmax to NaN (torch.multinomial raised); below
    float32's smallest number (1e-300, the smallest double) T itself rounded to 0 (0 / 0)."""
    base = ["generate", DEMO, "--prompt", "import os", "--max-new-tokens", "6", "--json"]
    assert main(base) == 0
    greedy = capsys.readouterr().out
    assert main([*base, "--temperature", t, "--seed", "1"]) == 0
    assert capsys.readouterr().out == greedy


def test_generate_prefill_chunk_feeds_pieces_with_a_progress_bar(capsys, monkeypatch):
    """--prefill-chunk reaches generate: the prompts go in pieces (a bar on stderr) and the
    greedy answer is the one-piece answer (tests/test_prefill_chunks.py checks the pieces
    against transformers)."""
    from mamba_deploy.runners.torch_runner import TorchRunner

    widths = []
    real = TorchRunner.prefill
    monkeypatch.setattr(TorchRunner, "prefill", lambda self, ids, *a, **kw: widths.append(ids.shape[1])
                        or real(self, ids, *a, **kw))
    base = ["generate", DEMO, "--prompt", "import os\nimport sys\n\ndef main(argv):", "--prompt", "x = 1",
            "--max-new-tokens", "6", "--json"]
    assert main(base) == 0
    whole, err = capsys.readouterr()
    assert len(widths) == 1 and "prefill" not in err
    assert main([*base, "--prefill-chunk", "3"]) == 0
    pieces, err = capsys.readouterr()
    assert pieces == whole and "prefill" in err
    assert widths[1:] == [3] * (widths[0] // 3) + ([widths[0] % 3] if widths[0] % 3 else [])


def test_sigterm_mid_export_cleans_up(tmp_path, monkeypatch, capsys):
    """SIGTERM is raised like Ctrl-C, so the export's temporary folder is removed (exit 143)."""
    pytest.importorskip("onnxruntime")
    import mamba_deploy.export.onnx as ex

    real = ex.write_manifest

    def killed(*a, **k):
        real(*a, **k)
        # at this thread: os.kill picks any thread of the process, which under load may run the
        # handler only after the export has finished
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    monkeypatch.setattr(ex, "write_manifest", killed)
    assert main(["export", "onnx", DEMO, str(tmp_path / "o")]) == 143
    assert "terminated" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


@pytest.mark.filterwarnings("ignore:.*row length")  # the tiny model's K-quant fallbacks
def test_interrupt_inside_llamacpp_quantize_is_not_lost(tmp_path, monkeypatch):
    """Ctrl-C during llama.cpp's quantizer landed in its ctypes log callback, where it was
    dropped, and the export went on to write its file. Now it stops once the call returns."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")

    def quantize(src, dst, params):
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # arrives while "inside" the C call
        with open(dst, "wb") as f:
            f.write(b"GGUF")
        return 0

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", quantize)
    assert main(["export", "gguf", DEMO, str(tmp_path / "m.gguf"), "--outtype", "q4_k_m"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_onnx_backend_on_a_checkpoint_names_the_export_command(capsys):
    assert main(["generate", DEMO, "--backend", "onnx", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "is a checkpoint, not an ONNX export" in err and f"export onnx {DEMO} {DEMO}-onnx" in err


_WITHOUT_EXTRAS = """
import sys
for m in ("gguf", "onnx", "onnxruntime", "llama_cpp", "matplotlib", "transformers", "openvino", "tensorrt", "triton"):
    sys.modules[m] = None  # `import m` now raises ModuleNotFoundError, as on an install without extras
from mamba_deploy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_works_without_optional_packages(tmp_path):
    """`pip install mamba-deploy` without extras: every verb that needs no optional package still
    runs (the CLI used to die at start-up importing `gguf` for `export gguf`), and a verb that does
    is a typed error naming the package and the extra to install."""
    import subprocess
    import sys

    def run(*argv):
        return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *argv], capture_output=True, text=True,
                              timeout=300)

    r = run("generate", DEMO, "--prompt", "def", "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout.startswith("def"), r.stderr[-2000:]
    r = run("inspect", DEMO)
    assert r.returncode == 0 and "mamba1" in r.stdout, r.stderr[-2000:]
    r = run("export", "gguf", DEMO, str(tmp_path / "m.gguf"))
    assert r.returncode == 2 and "needs the package 'gguf'" in r.stderr and "mamba-deploy[gguf]" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "m.gguf").exists()
    r = run("export", "onnx", DEMO, str(tmp_path / "o"))
    assert r.returncode == 2 and "'onnx'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------- bad input found by review

def test_gguf_export_refuses_to_overwrite_a_file_of_its_source(tmp_path, capsys):
    pytest.importorskip("gguf")
    import shutil

    src = tmp_path / "victim"
    shutil.copytree(DEMO, src)
    weights = next(src.glob("*.safetensors"))
    before = weights.read_bytes()
    assert main(["export", "gguf", str(src), str(weights)]) == 2
    assert "is a file of the model being exported" in capsys.readouterr().err
    assert weights.read_bytes() == before  # was silently replaced by GGUF bytes
    assert main(["export", "gguf", str(src), str(tmp_path / "newdir") + os.sep]) == 2  # a trailing slash
    assert "names a folder" in capsys.readouterr().err and not (tmp_path / "newdir").exists()
    # a GGUF re-exported onto itself (q8_0 over its own f32 source: the source was lost)
    g = tmp_path / "src.gguf"
    assert main(["export", "gguf", str(src), str(g)]) == 0
    capsys.readouterr()
    before = g.read_bytes()
    assert main(["export", "gguf", str(g), str(g), "--outtype", "q8_0"]) == 2
    assert "is the GGUF being exported" in capsys.readouterr().err
    assert g.read_bytes() == before


def test_a_config_that_does_not_fit_its_weights_fails_before_allocating_it(tmp_path, capsys):
    """hidden_size 10**7 would allocate ~160 GB before the shape check (an out-of-memory traceback)."""
    import json
    import shutil

    src = tmp_path / "huge"
    shutil.copytree(DEMO, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=10**7, num_hidden_layers=1)
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(src), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert "does not match its config.json" in capsys.readouterr().err


def test_out_of_memory_is_a_user_error(tmp_path, capsys, monkeypatch):
    import mamba_deploy.verify as verify_mod

    # with verify's size check out of the way: 10**18 tokens of ids are 8 EB, past any address
    # space, so the allocator refuses at once whatever the kernel's overcommit mode
    monkeypatch.setattr(verify_mod, "check_fits", lambda *a: None)
    assert main(["verify", DEMO, DEMO, "--lengths", str(10**18), "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: out of memory in verify" in err and "try smaller values" in err


def test_verify_larger_than_the_machine_is_refused_before_allocating(capsys):
    import os

    # 2 rows x 10**9 tokens x 4096 logits x 4 bytes x 2 sides = 65.5 TB: refused up front, not left to an
    # allocator that may overcommit (the GPU machine's pytest worker was killed by this request)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 2 * 10**9 * 4096 * 4 > ram
    assert main(["verify", DEMO, DEMO, "--lengths", "7," + str(10**9), "--batch", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "error: verify at batch 2 x length 1000000000 needs at least 61,035.2 GiB" in err, err
    assert f"this machine's {ram / 2**30:,.1f} GiB" in err and "--lengths / --batch" in err


@pytest.mark.parametrize("argv,match", [
    (["convert", "{onnx}", "{tmp}/c"], "it is an ONNX export; pass the checkpoint folder it was exported from"),
    (["generate", "{bare}", "--prompt", "hi"], "no model.onnx in"),
    (["inspect", "{file}"], "is a file; pass the checkpoint folder or a .gguf file"),
    (["inspect", DEMO + "/model.safetensors"], None),  # a file inside a checkpoint folder: its folder
    (["verify", DEMO, "{onnx}", "--json", "{tmp}"], "names a folder; give a file name \\(e.g. .*verify.json\\)"),
    (["demo", "--json", "{tmp}", "--only", "onnx fp32"], "names a folder; give a file name \\(e.g. .*demo.json\\)"),
])
def test_misplaced_paths_say_what_they_are(argv, match, tmp_path, capsys, onnx_export):
    import re
    import shutil

    pytest.importorskip("onnxruntime")
    onnx = onnx_export("mamba")[0]
    bare = tmp_path / "bare"
    shutil.copytree(onnx, bare)
    (bare / "model.onnx").unlink()
    (tmp_path / "f.txt").write_text("x")
    args = [a.format(onnx=onnx, bare=bare, tmp=tmp_path, file=tmp_path / "f.txt") for a in argv]
    if match is None:
        assert main(args) == 0
        return
    assert main(args) == 2
    out = capsys.readouterr()
    assert re.search(match, out.err), out.err
    assert "PASSED" not in out.out  # demo: the path is checked before the demo runs


def test_folder_outputs_that_are_files_say_so(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["convert", DEMO, str(tmp_path / "afile")]) == 2
    assert "is an existing file; choose a new path" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "mine"


def test_gguf_quantizer_threads_are_bounded(tmp_path, capsys):
    pytest.importorskip("gguf")
    with pytest.raises(SystemExit):
        main(["export", "gguf", DEMO, str(tmp_path / "m.gguf"), "--outtype", "q4_k_m", "--threads", "100000"])
    assert "threads 100000 is more" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()


def test_calibration_path_that_is_a_folder_says_so(tmp_path, capsys):
    assert main(["quantize", DEMO, str(tmp_path / "q"), "--method", "gptq", "--calib", str(tmp_path)]) == 2
    assert "is a folder; pass a text file" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_piped_output_that_stops_reading_ends_quietly(tmp_path):
    """`mamba-deploy inspect ... | head -1`: no BrokenPipeError traceback (exit 141 like a shell's
    SIGPIPE), whatever the verb prints."""
    import subprocess
    import sys

    from conftest import build_hf_model

    folder = tmp_path / "m"
    build_hf_model("mamba").save_pretrained(folder)
    cmd = [sys.executable, "-c", "import sys; from mamba_deploy.cli import main; sys.exit(main(sys.argv[1:]))",
           "inspect", str(folder)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("argv,flag", [
    (["generate", "DEMO", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "DEMO", "--prompt", "x", "--min-p", "1.5"], "--min-p"),
    (["export", "onnx", "DEMO", "OUT", "--opset", "3"], "--opset"),
    (["quantize", "DEMO", "OUT", "--method", "smoothquant", "--alpha", "-3"], "--alpha"),
    (["export", "tensorrt", "DEMO", "OUT", "--max-batch", "-1"], "--max-batch"),
    (["export", "tensorrt", "DEMO", "OUT", "--max-seq", "0"], "--max-seq"),
    (["generate", "DEMO", "--prompt", "x", "--prefill-chunk", "0"], "--prefill-chunk"),
    (["serve", "DEMO", "--prefill-chunk", "-2"], "--prefill-chunk"),
    # comma-separated lists of integers >= 1: refused by a ConfigError after parsing, without the usage line
    (["verify", "DEMO", "DEMO", "--lengths", "0", "--json", "OUT"], "--lengths"),
    (["verify", "DEMO", "DEMO", "--lengths", "1,,7", "--json", "OUT"], "--lengths"),
    (["verify", "DEMO", "DEMO", "--batch", "0", "--json", "OUT"], "--batch"),
    (["verify", "DEMO", "DEMO", "--batch", "1,x", "--json", "OUT"], "--batch"),
    (["bench", "DEMO", "--prompt-len", "0", "--out", "OUT"], "--prompt-len"),
    (["bench", "DEMO", "--prompt-len", "", "--out", "OUT"], "--prompt-len"),
    (["bench", "DEMO", "--batch", "0", "--out", "OUT"], "--batch"),
    (["bench", "DEMO", "--batch", "8,-1", "--out", "OUT"], "--batch"),
])
def test_numeric_flags_out_of_range_are_refused_by_the_parser(argv, flag, tmp_path, capsys):
    """README: numeric flags out of range are refused by argparse (exit 2, the usage line, the flag
    named) before any model loads; these were checked only later, after parsing."""
    argv = [str(DEMO) if a == "DEMO" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: mamba-deploy " in err and f"argument {flag}: " in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shard_mb", [2048, 0.02])  # one file; shards of ~20 kB (an index and several files)
def test_convert_shows_a_bar_for_a_large_model(hf_checkpoint, tmp_path, monkeypatch, capfd, shard_mb):
    """convert writes a bar over the bytes it saves on stderr, for models above the shared
    large-model rule (mamba_deploy.progress, also GGUF export's): lowered here to the tiny model.
    The result is still the source's weights (transformers' state dict the reference)."""
    import mamba_deploy.progress
    from mamba_deploy import load_model

    folder, hf = hf_checkpoint("mamba2_g2")
    main(["convert", str(folder), str(tmp_path / "small")])
    assert "writing checkpoint" not in capfd.readouterr().err  # below the threshold: no bar
    monkeypatch.setattr(mamba_deploy.progress, "LARGE_MODEL_PARAMS", 0)
    assert main(["convert", str(folder), str(tmp_path / "c"), "--max-shard-size", str(shard_mb)]) == 0
    captured = capfd.readouterr()
    assert "writing checkpoint" in captured.err and "writing checkpoint" not in captured.out
    assert (tmp_path / "c" / "model.safetensors.index.json").exists() == (shard_mb < 1)
    back, want = load_model(tmp_path / "c").state_dict(), hf.state_dict()
    assert back.keys() == want.keys()
    for k, v in back.items():
        assert torch.equal(v, want[k]), k
