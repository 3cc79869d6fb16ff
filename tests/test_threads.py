"""--threads / `threads=`: one CPU-thread option for every backend, read back from each backend's
own settings (torch's thread count, the ORT session's options, llama.cpp's context, OpenVINO's
compiled-model property); without it, llama.cpp gets one thread per physical core, not 2."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from mamba_deploy.cli import main
from mamba_deploy.errors import ConfigError, MambaDeployError
from mamba_deploy.runners import open_runner
from mamba_deploy.runners.base import default_threads, max_threads

DEMO = str(Path(__file__).resolve().parents[1] / "models" / "demo-mamba2")


def _topology(root: Path, cpu: int, package: int, core: int) -> None:
    d = root / f"cpu{cpu}" / "topology"
    d.mkdir(parents=True)
    (d / "physical_package_id").write_text(f"{package}\n")
    (d / "core_id").write_text(f"{core}\n")


def test_default_threads_counts_physical_cores(tmp_path):
    # 2 packages x 2 cores x 2 hyperthreads; same core ids repeat across packages
    for cpu in range(8):
        _topology(tmp_path, cpu, package=cpu // 4, core=(cpu // 2) % 2)
    assert default_threads(range(8), str(tmp_path)) == 4
    assert default_threads([0, 1], str(tmp_path)) == 1  # two hyperthreads of one core
    assert default_threads([0, 2, 4], str(tmp_path)) == 3
    assert default_threads([0, 1, 9], str(tmp_path)) == 3  # cpu9 has no topology: count CPUs instead
    quota = tmp_path / "cpu.max"
    quota.write_text("250000 100000\n")  # a container allowed 2.5 CPUs: 3 threads at most
    assert default_threads(range(8), str(tmp_path), str(quota)) == 3
    assert default_threads([0, 2], str(tmp_path), str(quota)) == 2
    quota.write_text("max 100000\n")
    assert default_threads(range(8), str(tmp_path), str(quota)) == 4
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= default_threads() <= usable


@pytest.fixture
def restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_torch_threads(restore_torch_threads):
    target = 1 if torch.get_num_threads() != 1 else 2
    with open_runner(DEMO, "torch", threads=target):
        assert torch.get_num_threads() == target


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_threads_is_a_typed_error(bad, restore_torch_threads):
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        open_runner(DEMO, "torch", threads=bad)


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_absurd_thread_counts_are_refused_before_any_thread_starts(backend, tiny_gguf, restore_torch_threads):
    """100000 threads segfaulted torch and llama.cpp, and hung ONNX Runtime past SIGTERM."""
    too_many = max_threads() + 1
    with pytest.raises(ConfigError, match=f"threads {too_many} is more than this machine can use"):
        open_runner(DEMO if backend == "torch" else tiny_gguf, backend, threads=too_many)
    open_runner(DEMO, "torch", threads=max_threads()).close()  # the limit itself is allowed


@pytest.mark.parametrize("argv,match", [
    (["generate", DEMO, "--prompt", "hi", "--threads", "100000"], "argument --threads: threads 100000 is more"),
    (["generate", DEMO, "--prompt", "hi", "--temperature", "1", "--seed", str(2**70)], "argument --seed: seed"),
    (["bench", DEMO, "--seed", "-1", "--out", "{tmp}/bench"], "argument --seed: seed -1 is outside"),
    (["verify", DEMO, DEMO, "--seed", str(2**64)], "argument --seed: seed"),
])
def test_cli_thread_and_seed_ranges_are_usage_errors(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err)


def test_onnx_threads(onnx_export):
    pytest.importorskip("onnxruntime")
    out, _, _ = onnx_export("mamba2")
    with open_runner(out, "onnx", threads=1) as r:
        assert r.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ConfigError, match="threads"):
        open_runner(out, "onnx", threads=0)


def test_openvino_threads(onnx_export):
    pytest.importorskip("openvino")
    out, _, _ = onnx_export("mamba2")
    r = open_runner(out, "openvino", threads=1)
    assert int(r.compiled.get_property("INFERENCE_NUM_THREADS")) == 1


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from mamba_deploy.export.gguf import export_gguf

    return export_gguf(DEMO, tmp_path_factory.mktemp("gguf") / "demo.gguf", outtype="f32")


def test_llamacpp_threads(tiny_gguf):
    import llama_cpp

    with open_runner(tiny_gguf, "llama.cpp", threads=1) as r:
        assert llama_cpp.llama_n_threads(r._ctx) == 1 and llama_cpp.llama_n_threads_batch(r._ctx) == 1
    with open_runner(tiny_gguf, "llama.cpp") as r:  # was a fixed 2 before
        assert llama_cpp.llama_n_threads(r._ctx) == default_threads()
    with open_runner(tiny_gguf, "llama.cpp", n_threads=1) as r:  # llama.cpp's own name still works
        assert llama_cpp.llama_n_threads(r._ctx) == 1
    with pytest.raises(ConfigError, match="disagree"):
        open_runner(tiny_gguf, "llama.cpp", threads=1, n_threads=2)
    loads = []
    real = llama_cpp.llama_model_load_from_file
    llama_cpp.llama_model_load_from_file = lambda *a: loads.append(a) or real(*a)
    try:
        with pytest.raises(ConfigError, match="threads must be an integer"):
            open_runner(tiny_gguf, "llama.cpp", threads=0)
    finally:
        llama_cpp.llama_model_load_from_file = real
    assert loads == []  # refused before the model was loaded


class _Stop(MambaDeployError):
    pass


@pytest.mark.parametrize("argv", [
    ["generate", "X.gguf", "--prompt", "a"],
    ["eval", "X.gguf", "--corpus", "stdlib-val"],
    ["serve", "X.gguf", "--port", "0"],
    ["verify", DEMO, "X.gguf", "--lengths", "1", "--batch", "1", "--decode-steps", "1", "--quiet"],
    ["bench", "X.gguf", "--out", "{tmp}/b"],
])
def test_cli_threads_reach_every_backend(argv, tmp_path, monkeypatch):
    """`--threads 3` is passed to the runner of a non-torch artifact (and to verify's torch
    reference); without it each backend gets None, its own default."""
    import mamba_deploy.runners as runners

    calls, real = [], runners.open_runner

    def fake_open(path, backend=None, **opts):
        backend = backend or runners.guess_backend(path)
        calls.append((backend, opts.get("threads", "missing")))
        if backend == "torch":  # verify's reference (its pass runs before the artifact opens), on torch's
            return real(path, "torch")  # threads as they are: a threads option would set them process-wide
        raise _Stop("stop here")

    monkeypatch.setattr(runners, "open_runner", fake_open)
    # the empty X.gguf holds no model: verify's header check before its reference pass would refuse it
    monkeypatch.setattr("mamba_deploy.runners.preflight.artifact_config", lambda *a: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "X.gguf").write_bytes(b"")  # verify refuses a missing artifact before its reference pass
    argv = [a.format(tmp=tmp_path) for a in argv]
    for flag, want in ((["--threads", "3"], 3), ([], None)):
        calls.clear()
        assert main(argv + flag) == 2
        assert calls and all(t == want for _, t in calls), calls
        assert calls[-1][0] == "llama.cpp"


def test_demo_threads_reach_its_runners(monkeypatch, restore_torch_threads):
    """run_demo(threads=1): the ONNX Runtime runner it builds gets 1 intra-op thread, and torch
    (the reference and the torch rows) runs on 1 thread."""
    import mamba_deploy.runners as runners
    from mamba_deploy.demo import run_demo

    real, seen = runners.open_runner, []

    def spy(path, backend=None, **opts):
        r = real(path, backend, **opts)
        seen.append((backend, r.session.get_session_options().intra_op_num_threads))
        return r

    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(runners, "open_runner", spy)
    rows, passed = run_demo([DEMO], only=["onnx fp32"], log=lambda *a: None, threads=1)
    assert passed and seen == [("onnx", 1)]
    assert torch.get_num_threads() == 1
