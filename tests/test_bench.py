"""bench: runs end to end on tiny checkpoints and writes a well-formed JSON, table and plots.
Timings are not asserted (they depend on the machine), only their shape and sanity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mamba_deploy import bench as B
from mamba_deploy.argtypes import int_list
from mamba_deploy.cli import main
from mamba_deploy.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo-mamba1"
TINY = ["--batch", "1,2", "--prompt-len", "3,8", "--gen-len", "2", "--warmup", "1", "--repeats", "2", "--quiet"]


def _check_outputs(out: Path, n_results: int) -> dict:
    for name in B.OUTPUT_FILES.values():
        assert (out / name).is_file(), name
    for png in ("throughput_vs_batch.png", "latency_vs_prompt_len.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp"))
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == B.SCHEMA
    assert set(data) == {"schema", "settings", "system", "targets", "results"}
    assert len(data["results"]) == n_results
    for r in data["results"]:
        assert set(r) == set(B.RESULT_KEYS)
        for key in ("prefill_ms", "decode_ms_per_token"):
            assert set(r[key]) == set(B.STAT_KEYS)
            assert 0 < r[key]["median"] <= r[key]["p95"] < math.inf
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["peak_rss_bytes"] > 0 and r["peak_cuda_bytes"] is None  # CPU only here
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == n_results + 2  # header, rule, rows
    return data


def test_bench_cli_two_tiny_models(hf_checkpoint, tmp_path):
    (m1, _), (m2, _) = hf_checkpoint("mamba"), hf_checkpoint("mamba2")
    out = tmp_path / "bench"
    assert main(["bench", f"{m1},{m2}", "--backends", "torch", "--out", str(out), *TINY]) == 0
    data = _check_outputs(out, 2 * 2 * 2)  # models x batches x prompt lengths
    assert [(t["artifact"], t["backend"], t["error"]) for t in data["targets"]] == \
        [(str(m1), "torch", None), (str(m2), "torch", None)]
    got = {(r["artifact"], r["batch"], r["prompt_len"]) for r in data["results"]}
    assert got == {(str(m), b, p) for m in (m1, m2) for b in (1, 2) for p in (3, 8)}
    assert data["settings"] == dict(batches=[1, 2], prompt_lens=[3, 8], gen_len=2, warmup=1, repeats=2, seed=0,
                                    threads=None)


def test_bench_keeps_going_past_a_bad_target(hf_checkpoint, tmp_path, capsys):
    m1, _ = hf_checkpoint("mamba")
    out = tmp_path / "bench"
    missing = tmp_path / "no-such-model"
    assert main(["bench", str(m1), str(missing), "--out", str(out), *TINY]) == 1  # measured, but not all
    data = _check_outputs(out, 4)
    assert data["targets"][1]["error"].startswith("ModelNotFoundError")
    assert "no-such-model" in (out / "results.md").read_text()
    # nothing measurable at all is an error exit that writes nothing (an empty table is no result)
    assert main(["bench", str(missing), "--out", str(tmp_path / "none"), *TINY]) != 0
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


@pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="models/demo-mamba1 has not been built")
def test_bench_demo_model(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", str(DEMO), "--out", str(out), "--batch", "1", "--prompt-len", "8",
                 "--gen-len", "2", "--repeats", "1", "--quiet"]) == 0
    _check_outputs(out, 1)


def test_parse_targets():
    assert B.parse_targets(["a", "b.gguf"]) == [("a", "torch"), ("b.gguf", "llama.cpp")]
    assert B.parse_targets(["a,b"], ["onnx"]) == [("a", "onnx"), ("b", "onnx")]
    assert B.parse_targets(["a"], ["torch", "onnx"]) == [("a", "torch"), ("a", "onnx")]
    assert B.parse_targets(["a", "b"], ["onnx", "torch"]) == [("a", "onnx"), ("b", "torch")]
    with pytest.raises(ConfigError, match="3 artifacts but 2 backends"):
        B.parse_targets(["a,b,c"], ["onnx", "torch"])
    with pytest.raises(ConfigError, match="tensorflow"):
        B.parse_targets(["a"], ["tensorflow"])


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100):
        xs = torch.rand(n, generator=gen).tolist()
        for q in (0, 50, 95, 100):
            assert B.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_peak_memory_sees_a_large_allocation():
    B.reset_peak_memory()
    before, _ = B.peak_memory()
    x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, written so it is resident
    after, _ = B.peak_memory()
    assert after >= x.numel() * 4
    assert after >= before
    del x


def test_bad_settings_are_user_errors(hf_checkpoint, tmp_path):
    m1, _ = hf_checkpoint("mamba")
    with pytest.raises(SystemExit) as e:  # refused by argparse
        main(["bench", str(m1), "--batch", "0", "--out", str(tmp_path / "o"), "--quiet"])
    assert e.value.code == 2 and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="--batch '1,x' has 'x', which is not an integer; give comma-separated integers"):
        int_list("1,x", "--batch", "1,8")
    assert int_list([1, 8], "--batch", "1,8") == [1, 8]  # the list argparse's type= already read
    with pytest.raises(ConfigError, match=r"--batch '1,0' has 0, which is below 1; give comma-separated integers >= 1, e.g. 1,8"):
        int_list([1, 0], "--batch", "1,8")
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        B.write_outputs({"results": []}, f)


def test_bench_torch_and_onnx_guessed_backends(hf_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from mamba_deploy.export.onnx import export_onnx

    folder, _ = hf_checkpoint("mamba2")
    onnx = export_onnx(folder, tmp_path / "onnx")
    out = tmp_path / "bench"
    assert main(["bench", str(folder), str(onnx), "--out", str(out), "--batch", "1,3", "--prompt-len", "5",
                 "--gen-len", "2", "--repeats", "1", "--quiet"]) == 0
    data = _check_outputs(out, 2 * 2)
    assert [t["backend"] for t in data["targets"]] == ["torch", "onnx"]
    assert all(t["error"] is None for t in data["targets"])


def test_failed_bench_leaves_earlier_results_untouched(hf_checkpoint, tmp_path, capsys):
    """A run that measures nothing (every target missing) must not replace a good run's files in
    the same --out with an empty table and empty plots."""
    m1, _ = hf_checkpoint("mamba")
    out = tmp_path / "bench"
    assert main(["bench", str(m1), "--out", str(out), *TINY]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == set(B.OUTPUT_FILES.values())
    capsys.readouterr()
    missing = tmp_path / "no-such-model"
    assert main(["bench", str(missing), f"{missing}.gguf", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "nothing was written" in err and str(missing) in err and f"{missing}.gguf (llama.cpp)" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporaries left either
    _check_outputs(out, 4)


def test_outputs_are_rendered_before_any_file_is_replaced(hf_checkpoint, tmp_path, monkeypatch):
    """A failure while drawing the plots leaves the previous set whole: no new table beside old
    plots, no temporary files."""
    m1, _ = hf_checkpoint("mamba")
    out = tmp_path / "bench"
    assert main(["bench", str(m1), "--out", str(out), *TINY]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data = json.loads((out / "results.json").read_text())
    data["settings"]["gen_len"] = 99  # a different run, so a rewrite would show

    def broken_plot(data, x_key, *args):
        if x_key == "prompt_len":  # the second plot, after the table and the first plot are drawn
            raise RuntimeError("drawing failed")
        return real_plot(data, x_key, *args)

    real_plot = B._plot
    monkeypatch.setattr(B, "_plot", broken_plot)
    with pytest.raises(RuntimeError, match="drawing failed"):
        B.write_outputs(data, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(B, "_plot", real_plot)
    B.write_outputs(data, out)
    assert json.loads((out / "results.json").read_text())["settings"]["gen_len"] == 99
    assert not list(out.glob(".*"))


@pytest.mark.parametrize("flags,pattern", [
    (["--batch", ""], r"usage: (.|\n)*argument --batch: '' names no value"),
    (["--prompt-len", ","], r"argument --prompt-len: ',' names no value"),
])
def test_empty_setting_lists_are_user_errors(hf_checkpoint, tmp_path, capsys, flags, pattern):
    import re

    m1, _ = hf_checkpoint("mamba")
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:  # refused by argparse
        main(["bench", str(m1), "--out", str(out), *TINY, *flags])
    assert e.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(ConfigError, match="must be >= 1"):
        B.run_bench([(str(m1), "torch")], [], [8], 2, progress=False)


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--gen-len", "-1"), ("--warmup", "-1")])
def test_bad_counts_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "m", flag, value])
    assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_torch_only_flags_need_a_torch_target_and_are_recorded(hf_checkpoint, tmp_path, capsys):
    """--dtype / --device / --state-dtype were silently ignored when no target ran on torch (generate,
    eval, serve and verify refuse them), and results never said which dtype a torch target ran in."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from mamba_deploy.export.onnx import export_onnx

    folder, _ = hf_checkpoint("mamba2")
    onnx = export_onnx(folder, tmp_path / "onnx")
    small = ["--batch", "1", "--prompt-len", "3", "--gen-len", "1", "--repeats", "1", "--warmup", "0", "--quiet"]
    for flag in (["--dtype", "bf16"], ["--state-dtype", "bf16"], ["--device", "meta"]):
        assert main(["bench", str(onnx), "--out", str(tmp_path / "no"), *flag, *small]) == 2
        err = capsys.readouterr().err
        assert flag[0] in err and "torch" in err and "only" in err and "onnx" in err, err
        assert not (tmp_path / "no").exists()
    out = tmp_path / "yes"
    assert main(["bench", str(folder), str(onnx), "--dtype", "bf16", "--out", str(out), *small]) == 0
    targets = json.loads((out / "results.json").read_text())["targets"]
    assert [(t["backend"], t.get("dtype"), t.get("state_dtype")) for t in targets] == \
        [("torch", str(torch.bfloat16).removeprefix("torch."), "float32"), ("onnx", None, None)]
