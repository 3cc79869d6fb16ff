"""Regression tests for what the forty-third session found; each fails on the code before its fix."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mamba_deploy import atomic


def _slow_renames(monkeypatch, delay: float = 0.15):
    """Path.rename sleeps before it renames, so a second writer checks the folder while the
    first is still moving its entries in (the window a real race has, made wide)."""
    real = Path.rename

    def rename(self, target):
        time.sleep(delay)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_two_writers_into_one_empty_folder_never_mix(tmp_path, monkeypatch):
    """_move_into checked that the folder held nothing of another writer's and then moved its
    entries one by one: two writers that both checked before either moved both succeeded, and the
    folder held a mix of their files. With the folder locked over check and moves, one wins whole
    and the other is refused."""
    out = tmp_path / "shared"
    out.mkdir()
    _slow_renames(monkeypatch)
    ready = threading.Barrier(2)
    real_prepare = atomic.prepare_output_dir

    def prepare(*args, **kwargs):  # both find the folder empty before either puts its temporary there
        folder = real_prepare(*args, **kwargs)
        ready.wait(timeout=10)
        return folder

    monkeypatch.setattr(atomic, "prepare_output_dir", prepare)
    results = {}

    def writer(tag: str) -> None:
        try:
            with atomic.atomic_dir(out) as tmp:
                for i in range(3):
                    (tmp / f"{tag}{i}.bin").write_text(tag)
            results[tag] = "ok"
        except FileExistsError as e:
            results[tag] = e

    threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    oks = [tag for tag, r in results.items() if r == "ok"]
    assert len(oks) == 1, results
    refused = next(r for r in results.values() if r != "ok")
    assert "written by another process" in str(refused)
    assert sorted(p.name for p in out.iterdir()) == [f"{oks[0]}{i}.bin" for i in range(3)]


def _interrupt_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_renames_together_holds_a_ctrl_c_until_the_block_ends():
    """From hold() on, a SIGINT waits for the block's end and is raised there; before hold() it
    interrupts at once; after the block the default handler is back."""
    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with atomic.renames_together() as hold:
            hold()
            _interrupt_self()
            time.sleep(0.05)  # a handler that raised would have raised by now
            done.append("renamed")
    assert done == ["renamed"]
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        with atomic.renames_together():
            _interrupt_self()
            time.sleep(0.05)
            done.append("not held")
    assert done == ["renamed"]


def test_renames_together_lets_the_blocks_own_error_through():
    """An error inside the held part (a full disk on a rename) is what propagates, and the
    handler is put back even then; a Ctrl-C held meanwhile is not lost (it was, before a review
    of this session's diff), and is raised over the error, chained to it."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(OSError, match="disk"):
        with atomic.renames_together() as hold:
            hold()
            raise OSError("disk full")
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt) as e:
        with atomic.renames_together() as hold:
            hold()
            _interrupt_self()
            time.sleep(0.05)
            raise OSError("disk full")
    assert isinstance(e.value.__context__, OSError) and signal.getsignal(signal.SIGINT) is before


def test_renames_together_second_signal_and_in_place_targets_are_not_held(tmp_path):
    """A FIFO target's copy runs in the rename phase and blocks on its reader: holding signals
    there left only kill -9 (review of this session's diff). And a second Ctrl-C is delivered at
    once, for a rename that hangs."""
    fifo = tmp_path / "out.gguf"
    os.mkfifo(fifo)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with atomic.renames_together() as hold:
            hold(tmp_path / "regular.json", fifo)
            _interrupt_self()
            time.sleep(0.05)
            done.append("not held")
    assert done == []
    with pytest.raises(KeyboardInterrupt):
        with atomic.renames_together() as hold:
            hold(tmp_path / "regular.json")
            _interrupt_self()
            time.sleep(0.05)
            done.append("first held")
            _interrupt_self()
            time.sleep(0.05)
            done.append("second not held")
    assert done == ["first held"]


def _ctrl_c_after_first_replace(monkeypatch) -> list:
    """os.replace in atomic sends this process a SIGINT right after its first rename -> the
    renamed targets, in order."""
    real = os.replace
    calls = []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            _interrupt_self()
            time.sleep(0.05)  # a handler that raised would have raised by now

    monkeypatch.setattr(atomic.os, "replace", replace)
    return calls


def test_write_files_renames_every_file_or_none_on_ctrl_c(tmp_path, monkeypatch):
    """A Ctrl-C between two of write_files' renames left a new file beside an old one."""
    folder = tmp_path / "set"
    folder.mkdir()
    atomic.write_files(folder, {"a.json": b"old a", "b.json": b"old b"})
    calls = _ctrl_c_after_first_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_files(folder, {"a.json": b"new a", "b.json": b"new b"})
    assert len(calls) == 2
    assert sorted(p.read_bytes() for p in folder.iterdir()) == [b"new a", b"new b"]


def test_gguf_and_modelfile_are_renamed_together_on_ctrl_c(ckpt, tmp_path, monkeypatch):
    """export gguf --ollama renamed the GGUF and then the Modelfile: a Ctrl-C between the two left
    the new GGUF without its Modelfile."""
    from mamba_deploy.export import gguf as gguf_export

    folder, _ = ckpt("mamba")
    out = tmp_path / "m.gguf"
    calls = _ctrl_c_after_first_replace(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        gguf_export.export_gguf(folder, out, ollama=True)
    assert sorted(Path(c).name for c in calls) == ["Modelfile", "m.gguf"]
    assert f"FROM ./{out.name}" in (tmp_path / "Modelfile").read_text()
    assert out.stat().st_size > 0


def test_an_unopenable_weight_file_is_not_called_missing_or_corrupt(hf_checkpoint, tmp_path, monkeypatch):
    """safetensors reports every failure to open as "No such file or directory", so an unreadable
    model.safetensors was reported as missing and "truncated or corrupt"."""
    import shutil

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.errors import CheckpointError

    src, _ = hf_checkpoint("mamba")
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    weights = folder / "model.safetensors"
    real_open = open

    def guarded_open(file, *args, **kwargs):  # what open() does for a file of mode 000, as any non-root user
        if str(file) == str(weights):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    if hasattr(os, "geteuid") and os.geteuid() != 0:
        weights.chmod(0)  # the real thing
    else:  # root reads a mode-000 file
        monkeypatch.setattr("builtins.open", guarded_open)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "Permission denied" in str(e.value) and "chmod" in str(e.value)
    assert "corrupt" not in str(e.value)


# ----------------------------------------------------------------------------- the Python API's inputs


@pytest.fixture(scope="module")
def m1(hf_checkpoint):
    from mamba_deploy import load_model

    folder, _ = hf_checkpoint("mamba")
    return folder, load_model(folder)


def test_onnx_export_refuses_non_finite_weights_before_writing(m1, tmp_path):
    """An edited model with an inf weight was exported (validate=False) into a graph that returns
    NaN, or refused as "disagrees with PyTorch: nan"; GGUF export and save_checkpoint named it."""
    import copy

    from mamba_deploy.errors import ExportError
    from mamba_deploy.export.onnx import export_onnx

    model = copy.deepcopy(m1[1])
    model.backbone.layers[0].mixer.D.data[0] = float("inf")
    with pytest.raises(ExportError, match=r"NaN or inf values in backbone\.layers\.0\.mixer\.D"):
        export_onnx(model, tmp_path / "o", validate=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", [-1, 0, 1.5, "1GB", True])
def test_save_checkpoint_shard_size_is_a_positive_int(m1, tmp_path, size):
    """-1 / 0 / 1.5 wrote a shard per tensor; "1GB" raised a raw TypeError from the shard loop."""
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="max_shard_bytes must be a whole number of bytes >= 1"):
        save_checkpoint(m1[1], tmp_path / "o", max_shard_bytes=size)
    assert not (tmp_path / "o").exists()


def test_empty_output_path_and_dtype_names(m1, tmp_path, monkeypatch):
    """save_checkpoint(m, "") said "output folder . exists and is not empty"; load_model(dtype="bf16")
    was refused while the CLI and set_state_dtype take the name."""
    import torch

    from mamba_deploy import load_model
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.errors import OutputPathError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(OutputPathError, match="the output path is empty"):
        save_checkpoint(m1[1], "")
    assert load_model(m1[0], dtype="bf16").dtype == torch.bfloat16
    out = save_checkpoint(m1[1], tmp_path / "h", dtype="float16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("backbone.embeddings.weight").get_dtype() == "F16"


def test_state_that_requires_grad_is_refused_by_forward_and_step(m1):
    """forward raised autograd's raw "a view of a leaf Variable ... in-place"; step took the state."""
    import torch

    from mamba_deploy.errors import ShapeError

    model = m1[1]
    for call in (lambda st: model(torch.tensor([[1, 2, 3]]), state=st), lambda st: model.step(torch.tensor([1]), st)):
        st = model.new_state(1)
        st.ssm.requires_grad_()
        with pytest.raises(ShapeError, match="require grad"):
            call(st)


def test_constructors_given_the_wrong_type(m1):
    """AttributeError / TypeError from deep inside before."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ConfigError, ShapeError
    from mamba_deploy.model import MambaLM
    from mamba_deploy.state import State

    for bad in (None, [1], "config.json"):
        with pytest.raises(ConfigError, match="MambaConfig.from_dict takes"):
            MambaConfig.from_dict(bad)
        with pytest.raises(ConfigError, match="MambaConfig.from_own_dict takes"):
            MambaConfig.from_own_dict(bad)
    with pytest.raises(ConfigError, match="from_file takes a path"):
        MambaConfig.from_file(3)
    with pytest.raises(ConfigError, match="load_model"):
        MambaLM(str(m1[0]))
    with pytest.raises(ConfigError, match="MambaLM takes a MambaConfig"):
        MambaLM({"model_type": "mamba"})
    with pytest.raises(ShapeError, match="State.zeros takes a MambaConfig"):
        State.zeros({"n_layer": 2}, 1)


def test_state_stack_names_what_is_wrong(m1):
    import torch

    from mamba_deploy.errors import ShapeError
    from mamba_deploy.state import State

    st = m1[1].new_state(2)
    with pytest.raises(ShapeError, match="one conv tensor per layer"):
        State.stack([], [])
    with pytest.raises(ShapeError, match="one ssm tensor per layer"):
        State.stack(list(st.conv), list(st.ssm)[:1])
    with pytest.raises(ShapeError, match="of one shape"):
        State.stack([st.conv[0], st.conv[1][:1]], list(st.ssm))
    again = State.stack(list(st.conv), list(st.ssm))
    assert torch.equal(again.conv, st.conv) and torch.equal(again.ssm, st.ssm)


def test_quantize_rules_with_a_non_string_glob_and_gptq_damp_bounds(m1):
    import math

    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    with pytest.raises(QuantizationError, match="quant_cfg keys are module name globs"):
        quantize(m1[1], "int8", rules={"quant_cfg": {5: {"format": "int8"}}}, progress=False)
    for damp in (math.inf, 1e308, 2.0):  # said "Hessian stays singular ... use more calibration text"
        with pytest.raises(QuantizationError, match=r"must be in \(0, 1\]"):
            quantize(m1[1], "gptq", damp=damp, progress=False)


def test_uint64_ids_past_int64_are_named_as_they_are(m1):
    """2**63 + 1 was cast to int64 first and reported as id -9223372036854775807."""
    import numpy as np
    import torch

    from mamba_deploy.errors import ShapeError

    big = 2**63 + 1
    with pytest.raises(ShapeError, match=f"token id {big} outside"):
        m1[1](np.array([[big]], dtype=np.uint64))
    with pytest.raises(ShapeError, match=f"token id {big} outside"):
        m1[1](torch.tensor([[3, big]], dtype=torch.uint64))


def test_torch_runner_names_the_source_state_when_batches_differ(m1):
    """It said the *target* state was wrong for batch 1 (the source's batch); the other runners
    say the source's rows do not match the state."""
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.runners.torch_runner import TorchRunner
    from mamba_deploy.state import State

    r = TorchRunner(m1[1])
    with pytest.raises(ShapeError, match="the source state's rows have batch 1 but the state was made for batch 2"):
        r.load_torch_state(r.new_state(2), State.zeros(m1[1].config, 1))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (CI is CPU-only)")
def test_cuda_model_takes_cpu_ids_and_refuses_bad_gpu_ids_without_poisoning_the_context(m1):
    """On CUDA: CPU ids (README's example) failed in index_select; out-of-range ids already on the
    GPU ran a device-side assert (step) that broke every later CUDA call; a state whose last
    dimension is strided reached the Triton step's bare ValueError."""
    import torch

    from mamba_deploy import load_model
    from mamba_deploy.errors import ShapeError
    from mamba_deploy.state import State

    model = load_model(m1[0], device="cuda")
    want = model(torch.tensor([[1, 2, 3]], device="cuda")).logits
    assert torch.equal(model(torch.tensor([[1, 2, 3]])).logits, want)
    st = model.new_state(2)
    model.step(torch.tensor([1, 2]), st)
    for bad in (-5, model.config.padded_vocab_size):
        with pytest.raises(ShapeError, match=f"token id {bad} outside"):
            model.step(torch.tensor([bad, 3], device="cuda"), model.new_state(2))
    torch.cuda.synchronize()  # the context still works
    assert torch.equal(model(torch.tensor([[1, 2, 3]], device="cuda")).logits, want)
    strided = State(st.conv.transpose(-1, -2).contiguous().transpose(-1, -2),
                    st.ssm.transpose(-1, -2).contiguous().transpose(-1, -2))
    with pytest.raises(ShapeError, match="last dimension is contiguous"):
        model.step(torch.tensor([1, 2]), strided)
    with pytest.raises(ShapeError, match="last dimension is contiguous"):  # forward's one-token path
        model(torch.tensor([[1], [2]]), state=strided)


# ----------------------------------------------------------------------------- kills and signals while writing


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True)
    return int(p.stdout)


def test_a_writer_killed_while_moving_into_an_empty_folder_is_finished_by_the_next(tmp_path):
    """A kill -9 between two of _move_into's renames left a part of the set in the folder; the next
    run removed the killed writer's temporary (the rest) as stale and refused the folder as not
    empty: 1 of 4 shards and no config.json stayed. Now the next writer finishes the move."""
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from mamba_deploy import atomic
        real = Path.rename
        moved = []
        def rename(self, target):
            real(self, target)
            moved.append(target)
            if len(moved) == 2:
                os._exit(9)  # as kill -9: nothing of Python's cleanup runs
        Path.rename = rename
        with atomic.atomic_dir({str(out)!r}) as tmp:
            for i in range(5):
                (tmp / f"part{{i}}").write_text(str(i))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    assert len([e for e in out.iterdir() if not e.name.startswith(".")]) == 2  # the killed writer's part
    with pytest.warns(UserWarning, match="finished moving the output of an earlier run"):
        with pytest.raises(FileExistsError, match="exists and is not empty"):
            with atomic.atomic_dir(out):
                pass
    assert sorted(e.name for e in out.iterdir()) == [f"part{i}" for i in range(5)]
    assert [(out / f"part{i}").read_text() for i in range(5)] == [str(i) for i in range(5)]


def test_renames_together_holds_sigterm_too():
    """SIGTERM / SIGHUP (the CLI raises them as Terminated) waited for nothing."""
    class Terminated(BaseException):
        pass

    def on_term(signum, frame):
        raise Terminated

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        done = []
        with pytest.raises(Terminated):
            with atomic.renames_together() as hold:
                hold()
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append("renamed")
        assert done == ["renamed"] and signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGTERM, old)


def test_token_cache_killed_between_array_and_meta_is_encoded_again(tmp_path, monkeypatch, tiny_tokenizer):
    """load_split renamed the new {split}.npy, then wrote meta.json: a kill between the two left
    another tokenizer's ids beside a meta.json naming the old tokenizer, and they were loaded
    as its own (train then failed with an IndexError in the embedding)."""
    import shutil

    import numpy as np

    from mamba_deploy import data

    tok_a, tok_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "demo-mamba2", tok_a)
    shutil.copytree(tiny_tokenizer, tok_b)
    assert data.tokenizer_digest(tok_a) != data.tokenizer_digest(tok_b)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20 + "é" * i)
    cache = tmp_path / "cache"
    want_a = data.load_split(tok_a, "train", cache, root=corpus)
    real = data.write_bytes
    before = (cache / "train.npy").read_bytes()

    def write_bytes(path, payload):
        if (cache / "train.npy").read_bytes() != before:  # the first meta.json write after the new array
            raise KeyboardInterrupt
        return real(path, payload)

    monkeypatch.setattr(data, "write_bytes", write_bytes)
    with pytest.raises(KeyboardInterrupt):
        data.load_split(tok_b, "train", cache, root=corpus)
    monkeypatch.setattr(data, "write_bytes", real)
    assert not np.array_equal(np.load(cache / "train.npy"), want_a)  # B's ids are on disk
    assert np.array_equal(data.load_split(tok_a, "train", cache, root=corpus), want_a)


def test_demo_out_is_left_as_it_was_when_interrupted(tmp_path, monkeypatch):
    """An interrupted `demo --out DIR` left DIR part-filled, and the re-run refused it."""
    from mamba_deploy import demo

    def run_model(d, work, formats, log, threads, label):
        (work / "onnx_fp32").mkdir(parents=True)
        (work / "onnx_fp32" / "model.onnx").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_model", run_model)
    models = [Path(__file__).resolve().parents[1] / "models" / "demo-mamba1"]
    for out, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if existed:
            out.mkdir()
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(models, out)
        assert out.is_dir() == existed and (not existed or not any(out.iterdir()))


def test_killed_runs_scratch_files_are_removed_by_the_next(tmp_path, monkeypatch):
    """The demo's scratch folder (without --out) and the CPU kernels' compile temporaries had
    anonymous names: a kill -9 left them for good."""
    import subprocess
    import tempfile

    from mamba_deploy import demo
    from mamba_deploy.ops import cpu_kernels

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = f"p{_dead_pid()}h{atomic._host()}"
    stale_demo = tmp_path / f".{demo.SCRATCH_NAME}.{dead}-abc"
    stale_demo.mkdir()
    with pytest.warns(UserWarning, match="killed before it finished"):
        fresh = demo._scratch_folder()
    assert not stale_demo.exists() and fresh.is_dir() and atomic.temp_owner() in fresh.name
    so = tmp_path / "cache" / "libmamba.so"
    so.parent.mkdir()
    stale = [so.parent / f".{so.name}.{dead}.xyz.so", so.parent / f".{so.name}.{dead}.xyz-0.o"]
    for f in stale:
        f.write_bytes(b"half")

    def fail(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(cpu_kernels.subprocess, "run", fail)
    with pytest.warns(UserWarning, match="killed before it finished"):
        with pytest.raises(subprocess.CalledProcessError):
            cpu_kernels._build(["cc"], [], so)
    assert not any(f.exists() for f in stale) and list(so.parent.iterdir()) == []


def test_a_ctrl_c_while_torch_imports_numpy_is_not_swallowed(tmp_path):
    """torch's C startup imports numpy and swallows any exception from it: a Ctrl-C there left
    numpy half made and the command ran on ("numpy has no attribute 'multiply'", a RecursionError,
    or a finished run as if no Ctrl-C came). The CLI imports numpy before torch."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import importlib.abc, sys
        class Interrupt(importlib.abc.MetaPathFinder):
            done = False
            def find_spec(self, name, path, target=None):
                if name in ("numpy._core.multiarray", "numpy.core.multiarray") and not Interrupt.done:
                    Interrupt.done = True
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupt())
        try:
            import mamba_deploy.cli
        except KeyboardInterrupt:
            print("interrupted")
        else:
            print("swallowed")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == "interrupted", (p.stdout, p.stderr[-2000:])


def test_journal_edge_cases(tmp_path, monkeypatch):
    """From a review of this session's diff: a folder name that is not UTF-8 failed to write its
    journal; a move that failed partway left a part in the folder and the next writer called it
    complete; a journal naming a link moved the link's target's files in."""
    out = tmp_path / os.fsdecode(b"out\xff")
    out.mkdir()
    with atomic.atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a"]

    out2 = tmp_path / "out2"
    out2.mkdir()
    real = Path.rename

    def rename(self, target):
        if Path(target).name == "p2" and Path(target).parent == out2:
            raise OSError(13, "Permission denied")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(FileExistsError):  # atomic_dir names a failed move as another writer's (its errno kept)
        with atomic.atomic_dir(out2) as tmp:
            for i in range(4):
                (tmp / f"p{i}").write_text(str(i))
    monkeypatch.setattr(Path, "rename", real)
    assert list(out2.iterdir()) == []  # the moved ones went back, and with the temporary they are gone

    out3, private = tmp_path / "out3", tmp_path / "private"
    out3.mkdir()
    private.mkdir()
    (private / "id_rsa").write_text("secret")
    dead = f"p{_dead_pid()}h{atomic._host()}"
    (out3 / "evil").symlink_to(private)
    (out3 / f".out3.tmp-{dead}-moving").write_bytes(b"evil")
    with pytest.warns(UserWarning, match="may hold a part of an earlier run's output"):
        atomic.finish_killed_moves(out3, "out3")
    assert (private / "id_rsa").exists() and not (out3 / "id_rsa").exists()


def test_bare_hub_ids_and_mappings_are_still_taken():
    """load_tokenizer("gpt2") was refused as a missing folder; a Mapping that is not a dict as a
    config was refused (both by this session's first checks)."""
    import types

    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ModelNotFoundError
    from mamba_deploy.tokenizer import _local_or_hub

    assert _local_or_hub("gpt2") == Path("gpt2")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        _local_or_hub("./gpt2")
    d = {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "state_size": 8}
    assert MambaConfig.from_dict(types.MappingProxyType(d)) == MambaConfig.from_dict(d)


# ----------------------------------------------------------------------------- long runs


def test_one_tokenizers_object_per_tokenizer_file(tmp_path):
    """Every load_model / open_runner built a new `tokenizers.Tokenizer`, and the library does not
    free a dropped BPE tokenizer's cache once it has encoded text (~1-2 MB): a loop of loads that
    encode (quantize's calibration) grew by 1.8 MB per iteration. One per file content now."""
    import shutil

    from mamba_deploy.tokenizer import load_tokenizer

    demo = Path(__file__).resolve().parents[1] / "models"
    shutil.copytree(demo / "demo-mamba2", tmp_path / "copy")
    a, b, c = (load_tokenizer(p) for p in (demo / "demo-mamba2", demo / "demo-mamba2", tmp_path / "copy"))
    assert a._tok is b._tok is c._tok  # the same bytes, wherever they are
    assert a.encode("def f(x):\n    return x") == c.encode("def f(x):\n    return x")
    text = (tmp_path / "copy" / "tokenizer.json").read_text()
    (tmp_path / "copy" / "tokenizer.json").write_text(text + "\n")  # other bytes: another object
    assert load_tokenizer(tmp_path / "copy")._tok is not a._tok


def test_folders_made_by_api_calls_are_not_removed_by_a_later_failed_command(m1, tmp_path):
    """atomic's list of created folders was emptied only by the CLI: a save through the Python API
    into a new nested folder left its folders listed, and a later in-process CLI command that
    failed removed them (once emptied)."""
    from mamba_deploy.checkpoint import save_checkpoint
    from mamba_deploy.cli import main

    out = save_checkpoint(m1[1], tmp_path / "api" / "nested" / "q")
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    assert main(["eval", str(tmp_path / "no-such-model"), "--max-tokens", "8"]) == 2
    assert (tmp_path / "api" / "nested").is_dir()
