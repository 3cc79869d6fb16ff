"""Coverage round (review 45, part D): user-facing behaviour of cli.py's error handling and
runners/base.py's default Runner methods that the whole suite's in-process coverage run left
unexercised (the rest of those modules' missing lines are reached by llama.cpp / OpenVINO tests,
by tests that run the CLI in a subprocess, or are defensive). CLI paths are driven in-process
through `main(argv, build=...)`, the hook `python -m mamba_deploy.train` uses, with a one-verb
parser whose verb raises what a real verb would; numerics are checked against transformers in
float64. CPU only, no network."""

from __future__ import annotations

import argparse
import copy
import errno
import io
import json
import os
import signal
import sys
import threading
import warnings

import pytest
import torch

from conftest import in_thread, rel_err
from mamba_deploy.cli import main
from mamba_deploy.errors import ShapeError
from mamba_deploy.runners.base import Runner


def _one_verb(action, verb: str = "probe"):
    """A build= parser with one verb whose func runs `action(args)` (stands for a real verb)."""
    def build():
        p = argparse.ArgumentParser(prog="mamba-deploy")
        sub = p.add_subparsers(dest="command", required=True)
        s = sub.add_parser(verb)
        s.set_defaults(func=action)
        return p
    return build


def _raise(exc):
    def action(args):
        raise exc
    return action


def _from_ctrl_c(exc):
    """`exc` as a Ctrl-C that arrives while a package imports leaves it: raised from the
    KeyboardInterrupt."""
    def action(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise exc from ki
    return action


# ----------------------------------------------------------------------------- cli.py: _main's errors

def test_missing_optional_package_inside_a_verb_is_one_line_naming_its_extra(capsys):
    """cli.py 494-500: a verb that imports an optional package (onnxruntime) only when it runs gets
    `error: \\`mamba-deploy VERB\\` needs the package ...: pip install 'mamba-deploy[onnx]'`, exit 2,
    no traceback (the [onnx] extra is pyproject's, read independently)."""
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("onnxruntime") for d in extras["onnx"]), extras["onnx"]
    err = ModuleNotFoundError("No module named 'onnxruntime.capi'", name="onnxruntime.capi")
    assert main(["probe"], build=_one_verb(_raise(err))) == 2
    out = capsys.readouterr()
    assert out.err.splitlines()[0].startswith("error: `mamba-deploy probe` needs the package 'onnxruntime'"), out.err
    assert "pip install 'mamba-deploy[onnx]'" in out.err and "Traceback" not in out.err and out.out == ""


def test_missing_core_module_inside_a_verb_keeps_its_traceback(capsys):
    """cli.py 497-498: a ModuleNotFoundError for a module that is no optional package (a bug, a
    broken install) propagates with its traceback instead of a misleading "pip install" line."""
    err = ModuleNotFoundError("No module named 'mamba_deploy._no_such_helper'", name="mamba_deploy._no_such_helper")
    with pytest.raises(ModuleNotFoundError, match="_no_such_helper"):
        main(["probe"], build=_one_verb(_raise(err)))
    assert "needs the package" not in capsys.readouterr().err


def test_ctrl_c_while_an_optional_package_imports_is_an_interrupt(capsys):
    """cli.py 495-496: Ctrl-C during `import onnxruntime` surfaces as a ModuleNotFoundError raised
    from the KeyboardInterrupt; it is reported as `interrupted`, exit 130 (128 + SIGINT), not as
    a missing package."""
    err = ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
    assert main(["probe"], build=_one_verb(_from_ctrl_c(err))) == 128 + 2
    got = capsys.readouterr().err
    assert got.strip() == "interrupted", got


def test_ctrl_c_surfacing_as_a_permission_error_is_an_interrupt(capsys):
    """cli.py 511-513: a PermissionError raised out of a Ctrl-C (a path check interrupted) is
    reported as `interrupted`, exit 130, not as a file to fix the permissions of."""
    err = PermissionError(errno.EACCES, "Permission denied", "/some/model")
    assert main(["probe"], build=_one_verb(_from_ctrl_c(err))) == 130
    got = capsys.readouterr().err
    assert got.strip() == "interrupted" and "permissions" not in got, got


def test_runtime_error_that_is_not_out_of_memory_keeps_its_traceback(capsys):
    """cli.py 501-503: only an allocation failure becomes the one-line "out of memory" error; any
    other RuntimeError (a bug) propagates unchanged."""
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        main(["probe"], build=_one_verb(_raise(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))))
    assert "out of memory" not in capsys.readouterr().err


def test_an_oserror_that_is_not_stdout_s_keeps_its_traceback(capsys):
    """cli.py 520-522: an OSError from something other than standard output (a file the verb
    reads) is not reported as "could not write the output ... to standard output"."""
    err = OSError(errno.EIO, os.strerror(errno.EIO), "/data/model.safetensors")
    with pytest.raises(OSError) as got:
        main(["probe"], build=_one_verb(_raise(err)))
    assert got.value is err
    assert "standard output" not in capsys.readouterr().err


class _FullDisk(io.TextIOBase):
    """A stdout redirected to a full disk: every write fails with ENOSPC; no descriptor."""

    def writable(self):
        return True

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):
        raise io.UnsupportedOperation("no descriptor")


def test_stdout_on_a_full_disk_in_process(monkeypatch, capsys):
    """cli.py 520-527, 547-549, 564-567 (in-process; the /dev/full subprocess test covers the
    same as a user runs it): a verb's print to a stdout that fails is one line naming standard
    output and the OS's reason, exit 2, and sys.stdout is the caller's stream again afterwards."""
    full = _FullDisk()
    monkeypatch.setattr(sys, "stdout", full)
    assert main(["probe"], build=_one_verb(lambda args: print("a result"))) == 2
    assert sys.stdout is full
    err = capsys.readouterr().err
    assert err.startswith("error: could not write the output of probe to standard output: "), err
    assert os.strerror(errno.ENOSPC) in err and "Traceback" not in err, err


def test_failure_while_the_command_line_is_read_names_the_program(capsys):
    """cli.py 598-600: an allocation failure before any verb is parsed (building the parser) is
    reported as "out of memory in mamba-deploy", naming the program (there is no verb yet)."""
    def build():
        raise MemoryError()
    assert main([], build=build) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory in mamba-deploy: MemoryError\n"), err


def test_warnings_print_as_one_line_without_source_location(capsys):
    """cli.py 418-421, 477, 529: a warning raised while a command runs is shown as
    `warning: MESSAGE` (no package file and line, no source line), and Python's own format is
    back once main returns. pytest records warnings instead of showing them; the test shows
    them as Python's documented default showwarning does: formatwarning's text on stderr."""
    default_format = warnings.formatwarning

    def show(message, category, filename, lineno, file=None, line=None):
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        rc = main(["probe"], build=_one_verb(lambda args: warnings.warn("the tokenizer is short", UserWarning)))
    assert rc == 0
    assert capsys.readouterr().err == "warning: the tokenizer is short\n"
    assert warnings.formatwarning is default_format


def test_main_runs_from_a_worker_thread(hf_checkpoint, capsys):
    """cli.py 441-443: main() called from a thread that is not the main thread (an embedding
    application, a notebook's worker) runs the command; signal handlers can be installed only
    from the main thread, and doing so raised ValueError."""
    folder, hf = hf_checkpoint("mamba")
    before = signal.getsignal(signal.SIGTERM)
    t, out = in_thread(main, ["inspect", str(folder), "--json"])
    t.join(120)
    assert not t.is_alive() and out == [0], out
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGTERM) is before
    got = json.loads(capsys.readouterr().out)
    flat = json.dumps(got)
    assert str(hf.config.num_hidden_layers) in flat and str(hf.config.hidden_size) in flat, got


# ----------------------------------------------------------------------------- runners/base.py defaults

class _Plain(Runner):
    """A runner of the user's own (as the README's "runners" section invites): the abstract
    methods and to_torch_state only, over a torch runner."""

    name = "plain"

    def __init__(self, inner):
        self.inner, self.config = inner, inner.config

    def new_state(self, batch):
        return self.inner.new_state(batch)

    def prefill(self, ids, state, attention_mask=None, last_only=False):
        return self.inner.prefill(ids, state, attention_mask, last_only)

    def step(self, ids, state):
        return self.inner.step(ids, state)

    def to_torch_state(self, state):
        return self.inner.to_torch_state(state)


class _Loadable(_Plain):
    """As _Plain, plus load_torch_state: the base's gather_states / clone_state then work."""

    name = "loadable"

    def load_torch_state(self, state, src):
        self.inner.load_torch_state(state, src)


@pytest.fixture(scope="module")
def torch_runner(hf_checkpoint):
    from mamba_deploy.runners import open_runner

    r = open_runner(hf_checkpoint("mamba")[0], "torch")
    yield r
    r.close()


def _hf_last_logits(hf, seqs):
    """transformers float64: the last position's logits of each token sequence."""
    model = copy.deepcopy(hf).double()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])


def test_a_runner_that_cannot_load_a_state_says_so(torch_runner):
    """runners/base.py 325-329: a runner without load_torch_state reports can_gather_states False
    (the server then runs one request at a time) and load_torch_state / clone_state raise
    NotImplementedError naming the runner, instead of returning a state never written."""
    r = _Plain(torch_runner)
    assert r.can_gather_states is False
    st = r.new_state(1)
    _, st = r.prefill(torch.tensor([[3, 5, 7]]), st)
    with pytest.raises(NotImplementedError, match="the plain runner cannot load a state"):
        r.load_torch_state(r.new_state(1), r.to_torch_state(st))
    with pytest.raises(NotImplementedError, match="the plain runner cannot load a state"):
        r.clone_state(st)


def test_default_state_arrays_guard_padding_of_a_used_state(torch_runner):
    """runners/base.py 353-360: the default state_arrays (batch-first views of to_torch_state)
    is what check_padding_on_fresh_state reads: left padding on a state that already holds
    tokens is refused naming the padded row; on a fresh state it is accepted."""
    r = _Plain(torch_runner)
    used = r.new_state(2)
    _, used = r.prefill(torch.tensor([[3, 5, 7], [9, 11, 13]]), used)
    arrays = r.state_arrays(used)
    ref = torch_runner.to_torch_state(used)
    assert [a.shape[0] for a in arrays] == [2, 2]
    assert torch.equal(arrays[0][1], ref.conv[:, 1]) and torch.equal(arrays[1][0], ref.ssm[:, 0])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ShapeError, match=r"pads rows \[1\] of a state that already holds tokens"):
        r.check_padding_on_fresh_state(mask, used)
    r.check_padding_on_fresh_state(mask, r.new_state(2))  # a fresh state: accepted


def test_default_gather_states_moves_rows_that_decode_as_transformers(torch_runner, hf_checkpoint):
    """runners/base.py 307-323: the base's gather_states (a runner with load_torch_state only)
    joins row 1 of one batch with all of another, in that order; a step on the gathered state
    gives, per row, transformers' float64 logits of that row's whole sequence, and the input
    states are consumed."""
    _, hf = hf_checkpoint("mamba")
    r = _Loadable(torch_runner)
    assert r.can_gather_states is True
    a_ids, b_ids = [[3, 5, 7], [9, 11, 13]], [[20, 21, 22]]
    _, a = r.prefill(torch.tensor(a_ids), r.new_state(2))
    _, b = r.prefill(torch.tensor(b_ids), r.new_state(1))
    g = r.gather_states([(a, [1]), (b, None)])
    nxt = [40, 41]
    logits, g = r.step(torch.tensor(nxt), g)
    want = _hf_last_logits(hf, [a_ids[1] + [nxt[0]], b_ids[0] + [nxt[1]]])
    assert logits.shape == want.shape
    assert rel_err(logits, want) < 1e-4, rel_err(logits, want)
    with pytest.raises(ShapeError):
        r.step(torch.tensor([1, 2]), a)  # consumed: its memory may be the gathered state's
