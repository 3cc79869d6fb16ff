"""Forty-first session: the last note's leftovers and this session's reviews, each test failing on
the code before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO1, DEMO2 = ROOT / "models" / "demo-mamba1", ROOT / "models" / "demo-mamba2"


# ----------------------------------------------------------------------------- CLI spelling

@pytest.mark.parametrize("argv, said", [
    (["generate", "m", "--prompt", "x", "--temprature", "1"], "did you mean --temperature?"),
    (["genrate", "m"], "did you mean 'generate'?"),
    (["export", "onnxx", "a", "b"], "did you mean 'onnx'?"),
    (["export", "onnx", "a", "b", "--opsett=17"], "did you mean --opset?"),
])
def test_a_mistyped_verb_or_flag_gets_a_did_you_mean_from_its_own_verb(argv, said, capsys):
    """A mistyped flag was reported under the top-level usage (the verb list) with no suggestion;
    it is now reported by the verb it was given to, with the closest flag it has."""
    from mamba_deploy.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert said in err, err
    if argv[0] == "generate":  # the verb's usage, which lists its flags, not the verb list
        assert "usage: mamba-deploy generate" in err and "{inspect,generate" not in err, err


def test_choice_flags_take_any_case():
    """`--outtype Q8_0` (llama.cpp's own spelling) and `--dtype BF16` were refused as invalid
    choices."""
    from mamba_deploy.cli import build_parser

    p = build_parser()
    assert p.parse_args(["export", "gguf", "m", "o.gguf", "--outtype", "Q8_0"]).outtype == "q8_0"
    assert p.parse_args(["export", "onnx", "m", "o", "--dtype", "FP16"]).dtype == "fp16"
    assert p.parse_args(["quantize", "m", "o", "--method", "INT8"]).method == "int8"


def test_sampling_flags_at_temperature_zero_are_said_to_be_ignored():
    """--top-p / --seed with the default greedy temperature changed nothing, silently."""
    import warnings

    from mamba_deploy.cli import main

    argv = ["generate", str(DEMO1), "--prompt", "Once", "--max-new-tokens", "2", "--top-p", "0.5", "--seed", "3"]
    with pytest.warns(UserWarning, match=r"--top-p, --seed only apply when sampling.*--temperature > 0"):
        assert main(argv) == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(argv + ["--temperature", "0.7"]) == 0
    assert not [w for w in seen if "only apply" in str(w.message)]


def test_export_gguf_prints_sizes_in_one_unit(ckpt, tmp_path, capsys):
    """The existing file was shown in MiB and the written one in decimal MB."""
    from mamba_deploy.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(ckpt("mamba")[0]), str(out)]) == 0
    said = capsys.readouterr().out
    size = out.stat().st_size
    from mamba_deploy.progress import human_bytes

    assert f"({human_bytes(size)}, f32)" in said and " MB," not in said, said
    assert human_bytes(3 * 2**20) == "3.0 MiB" and human_bytes(512) == "512 B"


# ----------------------------------------------------------------------------- bench

def test_bench_with_a_failed_target_writes_the_rest_and_exits_1(hf_checkpoint, tmp_path, capsys):
    """One failed target of several exited 0, so a script took a table with a gap for a full one."""
    from mamba_deploy.cli import main

    m1 = hf_checkpoint("mamba")[0]
    out = tmp_path / "b"
    rc = main(["bench", str(m1), str(tmp_path / "missing"), "--out", str(out), "--batch", "1", "--prompt-len", "3",
               "--gen-len", "1", "--warmup", "0", "--repeats", "1", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 of 2 targets failed: " in err and "missing" in err, err
    data = json.loads((out / "results.json").read_text())
    assert len(data["results"]) == 1 and data["targets"][1]["error"]


# ----------------------------------------------------------------------------- chat template

def test_named_chat_templates_without_a_default_are_not_guessed(tmp_path, capsys):
    """With named templates and none called "default", the first was used (transformers refuses
    to guess, and the first may be a tool-use one). A chat prompt is now refused naming them; a
    --chat-template file or plain prompts go on without a word."""
    import shutil
    import warnings

    from mamba_deploy.chat import read_chat_template
    from mamba_deploy.cli import main

    folder = tmp_path / "m"
    shutil.copytree(DEMO1, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "{{ 'TOOLS' }}"}, {"name": "rag", "template": "R"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert read_chat_template(folder) is None
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "1", "--chat"]) == 2
    err = capsys.readouterr().err
    assert "named ['rag', 'tool_use'] and none named 'default'" in err and "--chat-template FILE" in err, err
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "1", "--chat",
                     "--chat-template", str(tmp_path / "t.jinja")]) == 0
        assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]) == 0
    cfg["chat_template"].append({"name": "default", "template": "{{ 'D' }}"})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert read_chat_template(folder) == "{{ 'D' }}"


# ----------------------------------------------------------------------------- verify Python API

def test_open_pair_with_an_export_as_reference_says_so(onnx_export):
    """The CLI said an ONNX REFERENCE looks swapped; verify.open_pair / open_reference from Python
    failed later with "no config.json"."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import ConfigError, ModelNotFoundError
    from mamba_deploy.verify import open_pair, open_reference

    out, folder, _ = onnx_export("mamba")
    with pytest.raises(ConfigError, match="is an ONNX export, not a checkpoint.*look swapped"):
        open_pair(out, folder)
    with pytest.raises(ConfigError, match="is an ONNX export, not a checkpoint"):
        open_reference(out)
    # what is not a path, or a path the system refuses, is left to open_runner's own typed errors
    for ref in ("x" * 300, load_model(DEMO1)):
        with pytest.raises(ModelNotFoundError):
            open_reference(ref)


def test_verify_checks_a_left_padded_batch(hf_checkpoint):
    """verify ran equal-length rows only, so an artifact whose runner ignored the attention_mask
    (padding read as tokens: what generate and the server send for prompts of different lengths)
    passed. The left-padded case compares it with each row run alone on the reference."""
    from mamba_deploy.runners import open_runner
    from mamba_deploy.verify import padded_lengths, verify

    folder = hf_checkpoint("mamba2")[0]
    ref = open_runner(folder, "torch")

    class MaskIgnored(type(ref)):
        def prefill(self, ids, state, attention_mask=None, last_only=False):
            return super().prefill(ids, state, last_only=last_only)

    good = verify(ref, open_runner(folder, "torch"), lengths=(1, 9), batches=(1, 3), decode_steps=2, progress=False)
    assert good.passed, good.table()
    padded = [c for c in good.cases if c.get("left_padded")]
    assert [c["left_padded"] for c in padded] == [padded_lengths(9, 3)] == [[9, 7, 5]]
    assert padded[0]["prefill"]["positions"] == 21 and padded[0]["decode"]["positions"] == 6
    assert "prefill l=9 b=3 padded" in good.table()

    bad_runner = open_runner(folder, "torch")
    bad_runner.__class__ = MaskIgnored
    bad = verify(ref, bad_runner, lengths=(1, 9), batches=(1, 3), decode_steps=2, progress=False)
    assert not bad.passed and "left-padded" in " ".join(bad.failures), bad.table()
    # a batch of 1 or length 1 has no rows of different lengths: no padded case
    assert not any(c.get("left_padded") for c in verify(ref, open_runner(folder, "torch"), lengths=(1, 9),
                                                           batches=(1,), decode_steps=1, progress=False).cases)


# ----------------------------------------------------------------------------- train / eval / model card

def _train_args(tmp, **kw):
    import argparse

    base = dict(preset="tiny-mamba2", tokenizer=str(DEMO2), out=str(tmp / "out"), work_dir=str(tmp / "work"),
                data_cache=None, steps=8, max_minutes=None, batch=2, seq_len=16, lr=3e-3, warmup=1,
                weight_decay=0.1, clip=1.0, amp=None, device="cpu", eval_every=2, eval_batch=2, eval_tokens=0,
                save_every=2, seed=0, resume=False, micro_batch=None)
    return argparse.Namespace(**{**base, **kw})


def _cli_train(out, *extra):
    from mamba_deploy.cli import main

    return main(["train", "--preset", "tiny-mamba2", "--tokenizer", str(DEMO2), "--out", str(out), "--steps", "4",
                 "--batch", "2", "--seq-len", "16", "--save-every", "2", "--eval-every", "2", "--eval-batch", "2",
                 "--warmup", "1", "--device", "cpu", *extra])


def test_a_symlinked_out_is_written_where_it_points(tmp_path, fake_data):
    """The first save renamed the link itself aside and the second failed (NotADirectoryError)."""
    import os

    (tmp_path / "big" / "run").mkdir(parents=True)
    os.symlink(tmp_path / "big" / "run", tmp_path / "out")
    assert _cli_train(tmp_path / "out", "--work-dir", str(tmp_path / "work")) == 0
    assert (tmp_path / "out").is_symlink() and (tmp_path / "big" / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("own_work_dir", [True, False])
def test_an_out_name_near_the_limit_trains_or_is_a_typed_error(tmp_path, fake_data, own_work_dir, capsys):
    """A valid 252-byte --out name: `.NAME.old` and the default NAME.work were raw ENAMETOOLONG."""
    out = tmp_path / ("m" * 252)
    if own_work_dir:
        assert _cli_train(out, "--work-dir", str(tmp_path / "work")) == 0
        assert (out / "model.safetensors").exists()
    else:
        assert _cli_train(out) == 2
        assert "--work-dir" in capsys.readouterr().err and not out.exists()


def test_a_kill_between_the_snapshot_renames_keeps_the_users_files(tmp_path, fake_data):
    """Killed after --out was renamed aside and before the new snapshot came in, the run left no
    --out; the next save then deleted `.out.old`, with the README the user kept in --out."""
    import os
    import signal
    import subprocess
    import sys

    from mamba_deploy import train

    train.train(_train_args(tmp_path, steps=4))
    (tmp_path / "out" / "README.md").write_text("my notes")
    child = f"""
import os, signal, numpy as np
from pathlib import Path
from mamba_deploy import train
from test_review_forty_first import _train_args
rng = np.random.default_rng(0)
d = (rng.integers(0, 4096, 20000).astype(np.int32), rng.integers(0, 4096, 5000).astype(np.int32))
train.load_data = lambda a: d
real = Path.rename
def rename(self, target):
    r = real(self, target)
    if str(target).endswith('.out.old'):
        os.kill(os.getpid(), signal.SIGKILL)
    return r
Path.rename = rename
train.train(_train_args(Path({str(tmp_path)!r}), steps=8, resume=True))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, env=env, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.old" / "README.md").exists()
    train.train(_train_args(tmp_path, steps=8, resume=True))
    assert (tmp_path / "out" / "README.md").read_text() == "my notes"
    assert not (tmp_path / ".out.old").exists()


def test_max_minutes_leaves_room_for_evaluations(tmp_path, fake_data, monkeypatch):
    """The step budget was fitted to the train-step time alone: with slow evaluations every 5
    steps a 6 s budget ran ~50 s."""
    import time

    from mamba_deploy import train

    real = train.quick_val_loss
    monkeypatch.setattr(train, "quick_val_loss", lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1])
    t = time.perf_counter()
    m = train.train(_train_args(tmp_path, steps=100000, max_minutes=0.1, eval_every=5, save_every=1000))
    took = time.perf_counter() - t
    assert took < 1.5 * 6.0 and m["steps"] >= 12, (took, m["steps"])


def test_model_card_claims(tmp_path, fake_data, monkeypatch):
    """The card said a --max-minutes run is repeated by --steps N even when the timed steps ran
    past the warmup; it counted only the last process's training time after --resume; and a run
    without --eval-tokens raised a raw KeyError."""
    import re
    import time

    from mamba_deploy import train
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.model_card import write_model_card

    m = train.train(_train_args(tmp_path / "plain", steps=2))
    with pytest.raises(ConfigError, match="--eval-tokens"):
        write_model_card(tmp_path / "plain" / "out", m)

    metrics = {**m, "validation": {"ppl": 1.0, "tokens": 9, "unigram_ppl": 2.0}, "command": "x --max-minutes 1"}
    for warmup, says in ((10, "trains a slightly different model"), (11, "instead to repeat it")):
        card = write_model_card(tmp_path / "plain" / "out", {**metrics, "warmup": warmup}).read_text()
        assert says in card, card

    real, n = train.train_step, []

    def step(*a, **k):
        n.append(1)
        if len(n) == 7:
            raise KeyboardInterrupt
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(train, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        train.train(_train_args(tmp_path, eval_tokens=100))
    m = train.train(_train_args(tmp_path, eval_tokens=100, resume=True))
    card = write_model_card(tmp_path / "out", m).read_text()
    secs = int(re.search(r"\| training time \| (\d+) s \|", card).group(1))
    assert secs >= 4, card  # 8 steps of >= 0.5 s; it said 1 s


def test_eval_text_expands_the_home_folder(tmp_path, monkeypatch):
    """`--text ~/t.txt` (as `--text=~/t.txt`, which the shell leaves alone) was "not a file"."""
    from mamba_deploy.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "t.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    assert main(["eval", str(DEMO2), "--text", "~/t.txt", "--json"]) == 0


def test_python_m_train_reports_errors_as_the_cli_does(tmp_path):
    """`python -m mamba_deploy.train` printed a traceback (exit 1) for a typed error."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "mamba_deploy.train", "train", "--tokenizer", str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "error: --tokenizer" in p.stderr, p.stderr[-500:]


# ----------------------------------------------------------------------------- batching / CUDA graphs

def test_a_long_prompt_is_not_starved_by_short_requests_arriving_every_step():
    """Each new one-piece prompt was fed before the long prompt's group (fewest positions left),
    so with a short request arriving at every decode step the long one waited until they stopped
    (its first piece went in at step 41 of 40 arrivals)."""
    import threading

    from mamba_deploy import load_model
    from mamba_deploy.batching import Scheduler
    from mamba_deploy.runners.torch_runner import TorchRunner

    class Feeder(TorchRunner):  # another client sends a short request at every decode step
        def __init__(self, model, n=40):
            super().__init__(model)
            self.sched, self.short, self.n, self.steps, self.long_fed_at = None, [], n, 0, []

        def prefill(self, ids, state, **kw):
            if ids.shape[1] > 2 and bool((ids == 7).all()):
                self.long_fed_at.append(self.steps)
            return super().prefill(ids, state, **kw)

        def step(self, ids, state):
            self.steps += 1
            if len(self.short) < self.n:
                self.short.append(self.sched.submit([11, 12], max_new_tokens=1, stop_token_ids=[]))
            return super().step(ids, state)

    r = Feeder(load_model(DEMO2))
    s = Scheduler(r, max_rows=16, prefill_chunk=4, thread=False)
    r.sched = s
    busy = s.submit([3, 4], max_new_tokens=60, stop_token_ids=[])  # keeps decode steps going
    long = s.submit([7] * 40, max_new_tokens=1, stop_token_ids=[])  # 10 pieces of 4
    threading.Thread(target=s.run, daemon=True).start()
    try:
        busy.follow(), long.follow()
        for j in r.short:
            j.follow()
    finally:
        s.close(10)
    # every piece of the long prompt went in at most MAX_OVERTAKES turns after the one before
    from mamba_deploy.batching import MAX_OVERTAKES

    gap = MAX_OVERTAKES + 1
    assert len(r.long_fed_at) == 10 and r.long_fed_at[0] <= gap, r.long_fed_at
    assert all(b - a <= gap for a, b in zip(r.long_fed_at, r.long_fed_at[1:])), r.long_fed_at


def _graph_runner():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA GPU (CI is CPU-only)")
    from mamba_deploy import load_model
    from mamba_deploy.cuda_graph import CudaGraphRunner

    return CudaGraphRunner(load_model(DEMO2, device="cuda"))


@pytest.mark.parametrize("rows, ids", [(3, 4), (4, 3)])
def test_cuda_graph_step_refuses_ids_of_another_batch_than_its_state(rows, ids):
    """On a bucket's lent view the replay ran unchecked: 4 ids on a 3-row state gave 4 rows of
    logits, 3 ids on a 4-row one stepped row 3 with a stale id. TorchRunner raises ShapeError."""
    import torch

    from mamba_deploy.errors import ShapeError

    r = _graph_runner()
    st = r.new_state(rows)  # a view of bucket 4
    with pytest.raises(ShapeError, match="rows"):
        r.step(torch.arange(1, ids + 1), st)


def test_threads_sharing_a_cuda_graph_runner_get_their_own_tokens():
    """Two threads decoding on one bucket (one holds the lent view, the other's state is copied
    through the same rows) got each other's tokens: 27 of 30 generations differed."""
    import threading

    from mamba_deploy.generation import generate

    r = _graph_runner()
    prompts = [[5, 6, 7], [100, 200, 300, 400]]
    want = [generate(r, p, max_new_tokens=48, stop_token_ids=[]).tokens for p in prompts]
    bad = []

    def work(p, w):
        for _ in range(15):
            if generate(r, p, max_new_tokens=48, stop_token_ids=[]).tokens != w:
                bad.append(p)

    ts = [threading.Thread(target=work, args=pw) for pw in zip(prompts, want)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not bad, f"{len(bad)} of 30 threaded generations differ from the prompt run alone"


# ----------------------------------------------------------------------------- quantization

ALL_INT8 = {"quant_cfg": {"*": {"format": "int8"}}}


def test_a_rules_file_that_is_not_utf8_is_a_typed_error_and_tilde_is_expanded(hf_checkpoint, tmp_path, monkeypatch):
    """A UTF-16 rules file was a raw UnicodeDecodeError (exit 1); `--config ~/r.json` was not found."""
    from mamba_deploy import load_model
    from mamba_deploy.cli import main
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    folder, _ = hf_checkpoint("mamba")
    rules = tmp_path / "rules.json"
    rules.write_bytes(b'\xff\xfe{"quant_cfg": {}}')
    with pytest.raises(QuantizationError, match="UTF-8"):
        quantize(load_model(folder), "int8", rules=str(rules), progress=False)
    assert main(["quantize", str(folder), str(tmp_path / "q"), "--method", "int8", "--config", str(rules)]) == 2
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.json").write_text(json.dumps(ALL_INT8))
    assert main(["quantize", str(folder), str(tmp_path / "q"), "--method", "int8", "--config", "~/r.json"]) == 0


@pytest.mark.parametrize("flags", [
    ["--method", "gptq", "--calib", "/nonexistent/calib.txt", "--act-order"],
    ["--method", "smoothquant", "--alpha", "0.9", "--n-calib", "3"],
    ["--method", "fp8", "--fp8-scaling", "tensor"],
])
def test_method_flags_are_refused_when_the_rules_leave_no_layer_of_the_method(hf_checkpoint, tmp_path, flags,
                                                                            capsys):
    """--calib / --act-order / --alpha / --fp8-scaling did nothing (exit 0, every layer int8) when
    the rules made no layer of the method's format; --group-size was already refused there."""
    from mamba_deploy.cli import main

    folder, _ = hf_checkpoint("mamba")
    rules = tmp_path / "r.json"
    rules.write_text(json.dumps(ALL_INT8))
    out = tmp_path / "q"
    assert main(["quantize", str(folder), str(out), *flags, "--config", str(rules)]) == 2
    assert "the rules leave none" in capsys.readouterr().err and not out.exists()


def test_a_rules_file_with_a_repeated_glob_or_another_key_is_refused(hf_checkpoint, tmp_path):
    """json.loads kept a repeated glob in its first place with its last value (against "later
    entries override earlier ones"); a top-level key other than quant_cfg was ignored."""
    from mamba_deploy import load_model
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    folder, _ = hf_checkpoint("mamba2")
    rules = tmp_path / "r.json"
    rules.write_text('{"quant_cfg": {"*.in_proj": {"format": "int8"}, "*": {"format": "fp8"}, '
                     '"*.in_proj": {"format": "int4"}}}')
    with pytest.raises(QuantizationError, match="'\\*.in_proj' appears twice"):
        quantize(load_model(folder), "int8", rules=str(rules), progress=False)
    with pytest.raises(QuantizationError, match="algorithm"):
        quantize(load_model(folder), "int8", rules={"quant_cfg": {"*.in_proj": {"format": "int8"}},
                                                    "algorithm": "awq"}, progress=False)


@pytest.mark.parametrize("method, kw", [("int4", {"group_size": 16}),
                                        ("smoothquant", {"alpha": 0.5, "n_calib": 2, "calib_len": 32})])
def test_numpy_option_values_save(hf_checkpoint, tmp_path, method, kw):
    """np.int64 / np.float32 options passed the checks and failed json.dumps in the save."""
    import numpy as np

    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize, save_quantized

    folder, _ = hf_checkpoint("mamba2")
    kw = {k: (np.int64(v) if isinstance(v, int) else np.float32(v)) for k, v in kw.items()}
    m = quantize(load_model(folder), method, progress=False, **kw)
    save_quantized(m, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == method


def test_a_dtype_cast_keeps_the_stored_codes_and_scales(hf_checkpoint, tmp_path):
    """`.float()` turned fp8 codes into float32 (4x the memory, and a save load_model refused);
    `.to(bf16)` rounded the fp16 scales for good."""
    import torch

    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize, save_quantized

    folder, _ = hf_checkpoint("mamba2")
    save_quantized(quantize(load_model(folder), "fp8", progress=False), tmp_path / "q")
    m = load_model(tmp_path / "q").float()
    lin = m.backbone.layers[0].mixer.in_proj
    assert lin.qweight.dtype == torch.float8_e4m3fn
    save_quantized(m, tmp_path / "q2")
    load_model(tmp_path / "q2")

    m = load_model(tmp_path / "q")
    scales = {n: b.clone() for n, b in m.named_buffers() if n.endswith("scales")}
    m.to(torch.bfloat16)
    after = dict(m.named_buffers())
    assert scales and all(torch.equal(after[n], s) and after[n].dtype == s.dtype for n, s in scales.items())
    m.to("meta")  # a device move still moves them
    assert all(b.device.type == "meta" for b in m.buffers())


def test_readme_rules_example_quantizes_as_it_says(tmp_path):
    """README's --config example: the last layer int8, out_proj left in float, the rest int4 / 64."""
    import re

    from mamba_deploy import load_model
    from mamba_deploy.quant import quantize

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Per-layer quantization rules"):]
    rules = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))
    m = quantize(load_model(DEMO2), "int4", rules=rules, progress=False)
    mods = m.quantization_config["modules"]
    last = m.config.n_layer - 1
    assert {k: mods["backbone.layers.0.mixer.in_proj"][k] for k in ("format", "group_size")} == \
        {"format": "int4", "group_size": 64}
    assert mods[f"backbone.layers.{last}.mixer.in_proj"]["format"] == "int8"
    assert not any(n.endswith("out_proj") for n in mods)


def test_a_temporary_of_another_pid_namespace_is_not_removed_as_stale(tmp_path, monkeypatch):
    """Temporaries were judged by host name and pid: a container sharing the host name (another
    pid namespace, where the pid means another process or none) had its live ones removed."""
    import os

    from mamba_deploy import atomic

    here = atomic._host()
    other = tmp_path / f".out.tmp-p999999999h{here.rsplit('n', 1)[0]}nffffff-abc"  # same host name, other namespace
    ours = tmp_path / f".out.tmp-p999999999h{here}-abc"  # this namespace, writer gone
    for p in (other, ours):
        p.mkdir()
    with pytest.warns(UserWarning, match="killed before it finished"):
        atomic.remove_stale_temps(tmp_path, "out")
    assert other.exists() and not ours.exists()
    if os.path.exists("/proc/self/ns/pid"):
        assert here != atomic.re.sub(r"[^A-Za-z0-9]", "", atomic.socket.gethostname())[:24]


def test_verify_feeds_a_padded_batch_in_pieces_to_a_runner_with_a_masked_length_cap():
    """The padded case sent one masked prompt of the longest length, which TensorRT refuses past
    its engine's max_seq (verify --lengths 4096 against a max_seq 2048 engine had passed before).
    prefill_pieces now cuts masked prompts to the runner's max_masked_length."""
    import torch

    from mamba_deploy.errors import ShapeError
    from mamba_deploy.runners import open_runner
    from mamba_deploy.verify import verify

    class Capped(type(open_runner(DEMO2, "torch"))):  # TensorRT's prefill rule, on the torch runner
        max_masked_length = 8

        def prefill(self, ids, state, attention_mask=None, last_only=False):
            if attention_mask is not None and ids.shape[1] > self.max_masked_length:
                raise ShapeError(f"a masked prompt of length {ids.shape[1]} exceeds max_seq 8")
            return super().prefill(ids, state, attention_mask, last_only)

    ref, art = open_runner(DEMO2, "torch"), open_runner(DEMO2, "torch")
    art.__class__ = Capped
    rep = verify(ref, art, lengths=(20,), batches=(3,), decode_steps=1, progress=False)
    assert rep.passed and rep.cases[-1]["left_padded"], rep.table()
    assert rep.cases[-1]["prefill"]["positions"] == sum(rep.cases[-1]["left_padded"])
    del torch


def test_work_dir_inside_a_symlinked_out_is_refused(tmp_path, fake_data):
    """The check compared the link's own path: the training state went into the model folder."""
    import os

    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "out")
    assert _cli_train(tmp_path / "out", "--work-dir", str(tmp_path / "real" / "work")) == 2
    assert not (tmp_path / "real" / "work").exists()


def test_gptq_flags_are_refused_when_only_the_head_would_be_int4(tmp_path, capsys):
    """GPTQ runs on the layers' linears only; an int4 lm_head (rounded) hid the refusal."""
    from mamba_deploy.cli import main

    rules = tmp_path / "r.json"
    rules.write_text(json.dumps({"quant_cfg": {"backbone.layers.*": {"format": "int8"}}}))
    assert main(["quantize", str(DEMO2), str(tmp_path / "q"), "--method", "gptq", "--calib", "/nonexistent/c.txt",
                 "--act-order", "--include", "lm_head", "--config", str(rules)]) == 2
    assert "the rules leave none" in capsys.readouterr().err


def test_a_repeated_key_inside_a_rule_is_named_plainly(tmp_path):
    from mamba_deploy import load_model
    from mamba_deploy.errors import QuantizationError
    from mamba_deploy.quant import quantize

    rules = tmp_path / "r.json"
    rules.write_text('{"quant_cfg": {"*.in_proj": {"format": "int8", "format": "int4"}}}')
    with pytest.raises(QuantizationError) as e:
        quantize(load_model(DEMO2), "int8", rules=str(rules), progress=False)
    assert "'format' appears twice" in str(e.value) and "UTF-8" not in str(e.value) and "column" not in str(e.value)


def test_bench_says_when_a_target_stopped_part_way(tmp_path, monkeypatch, capsys):
    from mamba_deploy import bench
    from mamba_deploy.cli import main

    real = bench.bench_config

    def cfg(runner, b, length, *a, **k):
        if b == 2:
            raise MemoryError("out of memory at batch 2")
        return real(runner, b, length, *a, **k)

    monkeypatch.setattr(bench, "bench_config", cfg)
    assert main(["bench", str(DEMO1), "--batch", "1,2", "--prompt-len", "3", "--gen-len", "1", "--warmup", "0",
                 "--repeats", "1", "--quiet", "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "1 of 1 targets failed (1 stopped part-way; the rows measured before are kept)" in err, err
    assert len(json.loads((tmp_path / "b" / "results.json").read_text())["results"]) == 1


def test_model_card_repeat_claim_at_warmup_11():
    """lr_at of the steps 0..11 does not depend on the total when warmup >= 11."""
    from mamba_deploy.model_card import TIMED_STEPS
    from mamba_deploy.train import lr_at

    assert all(lr_at(s, 100000, 1e-3, TIMED_STEPS - 1) == lr_at(s, 20, 1e-3, TIMED_STEPS - 1)
               for s in range(TIMED_STEPS))
    assert lr_at(TIMED_STEPS - 1, 100000, 1e-3, TIMED_STEPS - 2) != lr_at(TIMED_STEPS - 1, 20, 1e-3, TIMED_STEPS - 2)


def test_a_sentencepiece_tokenizer_encodes_long_text():
    """Text past LONG_TEXT characters goes through encode_batch, which the SentencePiece backend
    took without add_special_tokens: a TypeError for any prompt over 4096 characters."""
    import io
    import random

    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    from mamba_deploy.tokenizer import LONG_TEXT, Tokenizer, sentencepiece_tokenizer

    rng, buf = random.Random(0), io.BytesIO()
    words = ["def", "main", "return", "print", "hello", "world"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)),
        model_writer=buf, vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    tok = sentencepiece_tokenizer(buf.getvalue())
    assert isinstance(tok, Tokenizer)
    text = "hello world return " * (LONG_TEXT // 10)
    assert len(text) > LONG_TEXT
    assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


# ----------------------------------------------------------------------------- the Runner contract

@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino", "llama.cpp"])
@pytest.mark.parametrize("path", [None, 123, b"/tmp/x"])
def test_a_non_path_is_a_typed_error_on_every_backend_and_in_preflight(backend, path):
    """onnx / openvino / llama.cpp (and preflight for all) raised TypeError from Path(None)."""
    from mamba_deploy.errors import ModelNotFoundError
    from mamba_deploy.runners import open_runner
    from mamba_deploy.runners.preflight import artifact_config

    with pytest.raises(ModelNotFoundError, match="str or Path"):
        open_runner(path, backend)
    with pytest.raises(ModelNotFoundError, match="str or Path"):
        artifact_config(path, backend)


def _llama(path, **kw):
    import warnings

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from mamba_deploy.runners import open_runner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_runner(path, "llama.cpp", threads=1, **kw)


def test_llamacpp_reads_back_and_clones_a_state_of_no_rows(tiny_gguf):
    """torch.stack of no rows: a RuntimeError where the other backends answer an empty State."""
    r = _llama(tiny_gguf)
    st = r.new_state(0)
    assert r.to_torch_state(st).conv.shape[1] == 0
    assert r.to_torch_state(r.clone_state(st)).ssm.shape[1] == 0


def test_llamacpp_clone_keeps_positions_and_continues_as_the_original(tiny_gguf):
    """The clone went through load_torch_state, which restarted it at position 1: the n_ctx cap
    then counted another length than the sequence's (a fresh clone lost a position)."""
    import torch

    r = _llama(tiny_gguf, n_ctx=8)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    r.prefill(ids, r.clone_state(r.new_state(1)))  # a fresh clone takes all 8 positions, as a fresh state
    a = r.new_state(1)
    r.prefill(ids[:, :3], a)
    b = r.clone_state(a)
    assert b.pos == a.pos == [3]
    la, _ = r.step(torch.tensor([9]), a)
    lb, _ = r.step(torch.tensor([9]), b)
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6)


def test_a_meta_source_state_and_calls_after_close_are_typed(hf_checkpoint):
    """load_torch_state of a meta State was torch's NotImplementedError (what llama.cpp raises
    for "cannot load a state"); reserve_rows / state_arrays still answered after close()."""
    from mamba_deploy.errors import RunnerClosedError, ShapeError
    from mamba_deploy.runners import open_runner
    from mamba_deploy.state import State

    r = open_runner(hf_checkpoint("mamba")[0], "torch")
    with pytest.raises(ShapeError, match="meta device"):
        r.load_torch_state(r.new_state(1), State.zeros(r.config, 1, device="meta"))
    st = r.new_state(1)
    r.close()
    with pytest.raises(RunnerClosedError):
        r.reserve_rows(3)
    with pytest.raises(RunnerClosedError):
        r.state_arrays(st)


@pytest.mark.parametrize("with_default", [True, False])
def test_gguf_export_writes_named_chat_templates_as_llamacpp_converter(ckpt, tmp_path, with_default):
    """Named chat templates were dropped (none without a "default"; the others always). They are
    written as llama.cpp's converter writes them: the default as tokenizer.chat_template, each
    other as tokenizer.chat_template.NAME, their names in tokenizer.chat_templates (read back
    here with gguf-py's own reader)."""
    import shutil
    import warnings

    from gguf import GGUFReader

    from mamba_deploy.export.gguf import export_gguf

    src = tmp_path / "m"
    shutil.copytree(ckpt("mamba")[0], src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "{{ 'TOOLS' }}"}, {"name": "rag", "template": "{{ 'RAG' }}"}]
    cfg["chat_template"] = named + ([{"name": "default", "template": "{{ 'D' }}"}] if with_default else [])
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(src, tmp_path / "m.gguf")
    fields = GGUFReader(out).fields

    def text(key):
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode()

    assert text("tokenizer.chat_template.tool_use") == "{{ 'TOOLS' }}"
    assert text("tokenizer.chat_template.rag") == "{{ 'RAG' }}"
    f = fields["tokenizer.chat_templates"]
    assert sorted(bytes(f.parts[i]).decode() for i in f.data) == ["rag", "tool_use"]
    assert ("tokenizer.chat_template" in fields) == with_default
    if with_default:
        assert text("tokenizer.chat_template") == "{{ 'D' }}"
