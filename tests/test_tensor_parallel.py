"""Tensor parallelism (tp.py) on CPU: 2 and 4 gloo ranks, one process each, against
transformers' unsharded model.

Tolerances (float32): logits within 1e-4 relative of transformers for prefills of 1, 7,
chunk_size + 1 and 40 tokens at batch 2 followed by 4 decode steps; every rank holds the same
logits bit for bit (the replicated part of the model runs in lockstep); the split gated norm within
1e-5 relative of the whole-row reference norm. What is split: Mamba1 and Falcon-Mamba by channel;
Mamba2 with ngroups 1 (the norm's group spans every rank), ngroups 2 over 2 ranks (one group each)
and over 4 ranks (a group spans two ranks). A sharded model decodes unfused (DecodePlan's
out_proj_local is False): the gated norm's per-row scale cannot follow a summed out_proj.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import build_hf_model, rel_err

LENGTHS = (1, 7, 17, 40)  # 17 = chunk_size + 1 of the tiny Mamba2 models
STEPS = 4
BATCH = 2
RUNS = {2: ("mamba", "falcon_mamba", "mamba2", "mamba2_g2", "mamba2_bias", "mamba2_gguf"),
        4: ("mamba", "mamba2", "mamba2_g2")}
# kinds built here (not conftest's): biases on in_proj / out_proj, which only rank 0 may add
OWN = {"mamba2_bias": ("mamba2", dict(use_bias=True))}
INFERENCE = "mamba2_bias_inference"  # mamba2_bias's folder, loaded under torch.inference_mode()


def _inputs(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, max(LENGTHS) + STEPS), generator=g)


def _norm_case(seed: int = 1):
    """y, z (3, 5, 32), weight (32,): a row of 2 groups of 16, for the split gated norm."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 5, 32, generator=g), torch.randn(3, 5, 32, generator=g), torch.randn(32, generator=g))


def _worker(rank: int, world: int, init_file: str, folders: dict, out_dir: str):
    import torch.distributed as dist

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.cuda_graph import DecodePlan, fast_decode_step
    from mamba_deploy.tp import SplitGatedNorm, apply_tensor_parallel, load_sharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        folders = {**folders, INFERENCE: folders["mamba2_bias"]} if "mamba2_bias" in folders else folders
        for kind, folder in folders.items():
            if kind == INFERENCE:  # its tensors then refuse in-place edits outside inference_mode
                with torch.inference_mode():
                    model = load_model(folder)
                model = apply_tensor_parallel(model)
            else:  # what open_torch(tensor_parallel=True) opens: a rank's slices read from the files
                model = load_sharded(folder)
            ids = _inputs(model.config.padded_vocab_size)
            runs, fused = {}, {}
            plan = DecodePlan(model)
            with torch.inference_mode():
                for L in LENGTHS:
                    state = model.new_state(BATCH)
                    logits = [model(ids[:, :L], state).logits]
                    again = state.clone()
                    for t in range(STEPS):
                        logits.append(model.step(ids[:, L + t], state).unsqueeze(1))
                    runs[L] = torch.cat(logits, 1)
                    # the step CUDA graphs capture (fused ops, their twins on CPU), from the same prefill
                    fused[L] = torch.stack([fast_decode_step(plan, ids[:, L + t], again) for t in range(STEPS)], 1)
            results[kind] = dict(logits=runs, fused=fused, ssm=tuple(state.ssm.shape), conv=tuple(state.conv.shape))
        results["rand"] = torch.rand(4)  # unseeded draws: the same on every rank (apply seeds them alike)
        # the norm alone: 2 groups of 16 channels, each rank holding 32 / world of them
        y, z, w = _norm_case()
        width = 32 // world
        sl = slice(rank * width, (rank + 1) * width)
        group = rank * width // 16
        norm = SplitGatedNorm(None, 2, group, 16)
        results["norm"] = {nbg: norm(y[..., sl], z[..., sl], w[sl], 1e-5, nbg) for nbg in (False, True)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank closes its connections while another still reads from them
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(RUNS))
def sharded(request, hf_checkpoint, ckpt, tmp_path_factory):
    """world -> (per-rank results, {kind: transformers model})."""
    import torch.multiprocessing as mp

    world = request.param
    out = tmp_path_factory.mktemp(f"tp{world}")
    made = {}
    for kind in RUNS[world]:
        if kind == "mamba2_gguf":  # load_sharded's other path: a file loaded whole, then sliced
            from mamba_deploy.export.gguf import export_gguf

            folder, hf = ckpt("mamba2")  # a GGUF needs a tokenizer
            made[kind] = (export_gguf(folder, out / "m.gguf", outtype="f32"), hf)
        elif kind in OWN:
            base, overrides = OWN[kind]
            made[kind] = (out / kind, build_hf_model(base, **overrides))
            made[kind][1].save_pretrained(made[kind][0])
        else:
            made[kind] = hf_checkpoint(kind)
    folders = {k: str(folder) for k, (folder, _) in made.items()}
    mp.start_processes(_worker, args=(world, str(out / "pg"), folders, str(out)), nprocs=world, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    refs = {k: model for k, (_, model) in made.items()}
    if "mamba2_bias" in refs:
        refs[INFERENCE] = refs["mamba2_bias"]
    return world, ranks, refs


def test_logits_match_transformers(sharded):
    world, ranks, hf = sharded
    for kind, model in hf.items():
        ids = _inputs(model.config.vocab_size)
        with torch.no_grad():
            ref = model(ids).logits
        for L in LENGTHS:
            ours = ranks[0][kind]["logits"][L][..., :ref.shape[-1]]
            err = rel_err(ours, ref[:, :L + STEPS])
            assert err < 1e-4, f"{kind} over {world} ranks, prefill {L} + {STEPS} steps: {err:.2e}"
            fused = ranks[0][kind]["fused"][L][..., :ref.shape[-1]]
            err = rel_err(fused, ref[:, L:L + STEPS])
            assert err < 1e-4, f"{kind} over {world} ranks, fast_decode_step after prefill {L}: {err:.2e}"
            for r in range(1, world):
                assert torch.equal(ranks[r][kind]["logits"][L], ranks[0][kind]["logits"][L]), (kind, world, L, r)


def test_unseeded_draws_agree_over_ranks(sharded):
    world, ranks, _ = sharded
    for r in range(1, world):
        assert torch.equal(ranks[r]["rand"], ranks[0]["rand"])


def test_state_holds_this_ranks_slice(sharded):
    world, ranks, hf = sharded
    for kind, model in hf.items():
        c = model.config
        assert kind in ranks[0], kind
        layers = c.num_hidden_layers
        d = c.expand * c.hidden_size
        if kind.startswith("mamba2"):
            groups = max(1, c.n_groups // world)
            assert ranks[0][kind]["ssm"] == (layers, BATCH, c.num_heads // world, c.head_dim, c.state_size)
            assert ranks[0][kind]["conv"] == (layers, BATCH, d // world + 2 * groups * c.state_size, c.conv_kernel - 1)
        else:
            assert ranks[0][kind]["ssm"] == (layers, BATCH, d // world, c.state_size)
            assert ranks[0][kind]["conv"] == (layers, BATCH, d // world, c.conv_kernel - 1)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_split_gated_norm_matches_whole_row(sharded, norm_before_gate):
    from mamba_deploy.ops.reference import rmsnorm_gated_ref

    world, ranks, _ = sharded
    y, z, w = _norm_case()
    ours = torch.cat([r["norm"][norm_before_gate] for r in ranks], -1)
    ref = rmsnorm_gated_ref(y.double(), z.double(), w.double(), 1e-5, 16, norm_before_gate)
    assert rel_err(ours, ref) < 1e-5


# ---- sizes that do not split, and models it refuses ---------------------------------------------

def test_local_config_refuses_sizes_that_do_not_split():
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.tp import local_config

    m2 = MambaConfig(arch="mamba2", d_model=32, n_layer=1, vocab_size=16, headdim=8, ngroups=2)  # 8 heads
    assert (local_config(m2, 2).nheads, local_config(m2, 2).ngroups) == (4, 1)
    assert (local_config(m2, 4).nheads, local_config(m2, 4).ngroups) == (2, 1)
    with pytest.raises(ConfigError, match=r"nheads=8 cannot be split over 3 ranks.*\(1, 2, 4, 8\)"):
        local_config(m2, 3)
    m2g = MambaConfig(arch="mamba2", d_model=48, n_layer=1, vocab_size=16, headdim=8, ngroups=3)  # 12 heads
    with pytest.raises(ConfigError, match=r"ngroups=3 cannot be split over 2 ranks.*\(1, 3, 6, 12\)"):
        local_config(m2g, 2)
    m1 = MambaConfig(arch="mamba1", d_model=24, n_layer=1, vocab_size=16)  # d_inner 48
    assert local_config(m1, 3).d_inner == 16
    with pytest.raises(ConfigError, match="d_inner=48 cannot be split over 5 ranks"):
        local_config(m1, 5)


def test_apply_refuses_without_a_process_group_and_quantized_models(hf_checkpoint):
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.errors import ConfigError, QuantizationError
    from mamba_deploy.quant import quantize
    from mamba_deploy.tp import apply_tensor_parallel, init_distributed

    model = load_model(hf_checkpoint("mamba")[0])
    with pytest.raises(ConfigError, match="torch.distributed is not initialized.*torchrun"):
        apply_tensor_parallel(model)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        assert k not in os.environ, "the test process itself must not look like a torchrun rank"
    with pytest.raises(ConfigError, match="RANK, WORLD_SIZE, LOCAL_RANK is not set.*torchrun --nproc-per-node"):
        init_distributed()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="shards unquantized models.*QuantLinear projections: load the unquantized"):
            apply_tensor_parallel(quantize(load_model(hf_checkpoint("mamba")[0]), "int8"))
        sharded = apply_tensor_parallel(load_model(hf_checkpoint("mamba")[0]))  # one rank: the whole model
        with pytest.raises(ConfigError, match="already sharded over 1 ranks"):
            apply_tensor_parallel(sharded)
        with pytest.raises(QuantizationError, match="tensor-parallel model .rank 0 of 1.*quantize the model loaded"):
            quantize(sharded, "int8")
        # a rank's slice written as if it were the model: a smaller, wrong checkpoint (before: no error)
        from mamba_deploy.checkpoint import save_checkpoint
        from mamba_deploy.errors import CheckpointError, ExportError
        from mamba_deploy.export.onnx import export_onnx

        out = hf_checkpoint("mamba")[0].parent / "sharded_out"
        with pytest.raises(CheckpointError, match="tensor-parallel model .* saving in the hf layout needs the whole"):
            save_checkpoint(sharded, out)
        with pytest.raises(ExportError, match="tensor-parallel model .* exporting needs the whole model"):
            export_onnx(sharded, out)
        if importlib.util.find_spec("gguf") is not None:  # the GPU machine has no gguf package
            from mamba_deploy.export.gguf import export_gguf

            with pytest.raises(ExportError, match="tensor-parallel model .* exporting needs the whole model"):
                export_gguf(sharded, out.with_suffix(".gguf"))
        assert not out.exists() and not out.with_suffix(".gguf").exists()
    finally:
        dist.destroy_process_group()


def test_generate_under_torchrun_matches_one_process(hf_checkpoint, tiny_tokenizer, tmp_path):
    """`torchrun --nproc-per-node 2 -m mamba_deploy generate --tensor-parallel` prints what one
    process without it prints (greedy), once (rank 0 only)."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(hf_checkpoint("mamba2")[0], folder)
    for f in tiny_tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["generate", str(folder), "--prompt", "hello world", "--max-new-tokens", "12", "--temperature", "0"]
    one = subprocess.run([sys.executable, "-m", "mamba_deploy", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "mamba_deploy", *args, "--tensor-parallel"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.strip()


# ---- lifecycle under torchrun: failures end the job, runners share the group, rank 0 speaks ------

def _torchrun(*args, timeout=120, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, env=env, timeout=timeout, **kw)


@pytest.fixture
def tp_folder(hf_checkpoint, tiny_tokenizer, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(hf_checkpoint("mamba2")[0], folder)
    for f in tiny_tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_one_rank_failing_ends_the_job(tp_folder, tmp_path):
    """Two sharded runners share the group (closing one leaves the other working); then rank 1
    fails while rank 0 steps on: rank 1 must not wait for rank 0 at exit, so torchrun sees it fail
    and stops rank 0 (before, the job hung until gloo's 30-minute timeout)."""
    script = tmp_path / "fail.py"
    script.write_text(f"""
import os, torch
from mamba_deploy.runners import open_runner
a = open_runner({str(tp_folder)!r}, "torch", tensor_parallel=True)
b = open_runner({str(tp_folder)!r}, "torch", tensor_parallel=True)
a.close()
state = b.new_state(1)
b.prefill(torch.tensor([[1, 2, 3]]), state)
print("b ok", flush=True)
if os.environ["RANK"] == "1":
    raise SystemExit("rank 1 fails here")
for t in range(10**6):
    b.step(torch.tensor([1]), state)
""")
    done = _torchrun(str(script), timeout=240)
    assert done.returncode != 0
    assert done.stdout.count("b ok") == 2, done.stderr[-2000:]
    assert "rank 1 fails here" in done.stderr


def test_rank0_output_closed_ends_the_job(tp_folder):
    """`... | head -c 20`: rank 0's stdout closes; it leaves at once (141) and the job ends."""
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "mamba_deploy", "generate", str(tp_folder), "--prompt", "hello world",
                             "--max-new-tokens", "100000", "--tensor-parallel"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    head = proc.stdout.read(20)
    proc.stdout.close()
    start = time.monotonic()
    try:
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert head and code != 0 and time.monotonic() - start < 120


def test_errors_and_progress_under_torchrun(tp_folder):
    """A user error shows at most once per rank, rank 1's marked (a rank may be stopped by
    torchrun before it prints, once another failed); progress bars are rank 0's only."""
    base = ["-m", "mamba_deploy", "generate", str(tp_folder), "--prompt", "hello world", "--tensor-parallel"]
    bad = _torchrun(*base, "--stop", "99999")
    assert bad.returncode != 0
    lines = [ln for ln in bad.stderr.splitlines() if "outside the vocabulary" in ln]
    prefixes = [ln.split("error:")[0] for ln in lines]
    assert prefixes and set(prefixes) <= {"", "rank 1: "}, bad.stderr[-2000:]
    assert prefixes.count("") <= 1 and prefixes.count("rank 1: ") <= 1, bad.stderr[-2000:]
    ok = _torchrun(*base, "--max-new-tokens", "2", "--prefill-chunk", "1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stderr.count("prefill:") == 1, ok.stderr[-2000:]


def test_an_error_before_the_group_is_joined_is_marked_by_rank_and_not_followed_by_noise(tp_folder):
    """Errors raised before the group is joined were printed unmarked by both ranks (the rank was
    read from the group, not torchrun's RANK), and each rank torchrun then stopped printed
    "terminated" into the shared stderr."""
    bad = _torchrun("-m", "mamba_deploy", "generate", str(tp_folder), "--prompt", "x", "--tensor-parallel",
                    "--backend", "onnx")
    assert bad.returncode != 0
    prefixes = [ln.split("error:")[0] for ln in bad.stderr.splitlines() if "applies to the torch backend only" in ln]
    assert prefixes and set(prefixes) <= {"", "rank 1: "} and len(prefixes) == len(set(prefixes)), bad.stderr[-2000:]
    assert "terminated" not in bad.stderr, bad.stderr[-2000:]


def test_a_quantized_checkpoint_is_refused_before_it_loads(tp_folder, tmp_path, monkeypatch):
    """load_sharded of a quantized checkpoint loaded the whole quantized model on every rank's CPU,
    only for apply_tensor_parallel to refuse it; it is refused from its config now."""
    import torch.distributed as dist

    from mamba_deploy import cli
    from mamba_deploy.errors import ConfigError, QuantizationError
    from mamba_deploy.quant import runtime
    from mamba_deploy.tp import load_sharded

    assert cli.main(["quantize", str(tp_folder), str(tmp_path / "q"), "--method", "int8"]) == 0

    def loaded(*a, **k):
        raise AssertionError("the quantized model was loaded before it was refused")

    monkeypatch.setattr(runtime, "load_quantized", loaded)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="q is a quantized checkpoint: load the unquantized checkpoint"):
            load_sharded(tmp_path / "q")
        # another tool's format is read by no process: not told to run it in one
        foreign = tmp_path / "falcon-mamba-4bit"
        shutil.copytree(tp_folder, foreign)
        raw = json.loads((foreign / "config.json").read_text())
        raw["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (foreign / "config.json").write_text(json.dumps(raw))
        with pytest.raises(QuantizationError, match="quantized with 'bitsandbytes'") as e:
            load_sharded(foreign)
        assert "one process" not in str(e.value)
    finally:
        dist.destroy_process_group()


def test_flag_refusals(tp_folder, capsys, monkeypatch):
    from mamba_deploy import cli
    from mamba_deploy.errors import BackendUnavailableError, ConfigError
    from mamba_deploy.tp import init_distributed

    code = cli.main(["generate", str(tp_folder), "--prompt", "x", "--backend", "onnx", "--tensor-parallel"])
    assert code == 2
    assert "error: --tensor-parallel applies to the torch backend only" in capsys.readouterr().err
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="sees no CUDA GPU here; use --device cpu"):
            init_distributed("cuda")
    else:  # every rank would be told the same GPU (before: silently replaced by cuda:LOCAL_RANK)
        with pytest.raises(ConfigError, match="'cuda:0': under tensor parallelism each rank runs on the GPU of its "
                                              "LOCAL_RANK.*--device cuda"):
            init_distributed("cuda:0")
    # the rank variables set by hand, the launcher's address not: a typed error, not torch's ValueError
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="rank 0 of 2 cannot join the process group: .*MASTER_ADDR.*torchrun"):
        init_distributed("cpu")


def test_runner_left_on_an_error_lets_go_of_the_group(tp_folder, monkeypatch):
    """`with open_runner(..., tensor_parallel=True)` left by an exception closes the group
    without waiting for other ranks (one rank of one here), so the holder count stays right."""
    import torch.distributed as dist

    from mamba_deploy.runners import open_runner

    _one_rank_env(monkeypatch)
    try:
        with pytest.raises(KeyError, match="boom"):
            with open_runner(tp_folder, "torch", tensor_parallel=True) as runner:
                assert runner.model.tp.world == 1 and dist.is_initialized()
                raise KeyError("boom")
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bench_and_eval_under_torchrun(tp_folder, tmp_path):
    """`bench --tensor-parallel` measures the sharded model on every rank and rank 0 alone writes
    and prints; `eval --tensor-parallel` prints the perplexity one process prints (within 1e-5:
    the sums over ranks add in another order), once."""
    import json

    out = tmp_path / "bench"
    bench = _torchrun("-m", "mamba_deploy", "bench", str(tp_folder), "--tensor-parallel", "--batch", "1,2",
                      "--prompt-len", "3,17", "--gen-len", "2", "--warmup", "0", "--repeats", "1", "--out", str(out),
                      timeout=240)
    assert bench.returncode == 0, bench.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert [t["tensor_parallel"] for t in data["targets"]] == [2] and not data["targets"][0]["error"]
    assert sorted((r["batch"], r["prompt_len"]) for r in data["results"]) == [(1, 3), (1, 17), (2, 3), (2, 17)]
    assert all(r["decode_ms_per_token"]["median"] > 0 for r in data["results"])
    assert bench.stdout.count("# mamba-deploy bench") == 1 and "sharded over 2 ranks" in bench.stdout
    # one progress bar, rank 0's: one first draw (tqdm may draw its 100% twice, at the last update and at close)
    assert len(re.findall(r"bench: +0%\|.*\| 0/\d+ \[00:00<\?, \?run/s\]", bench.stderr)) == 1, bench.stderr[-2000:]

    text = tmp_path / "t.txt"
    text.write_text("hello world, the quick brown fox jumps over the lazy dog. " * 12)
    args = ["eval", str(tp_folder), "--text", str(text), "--window", "7", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "mamba_deploy", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = _torchrun("-m", "mamba_deploy", *args, "--tensor-parallel", timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # one JSON object: rank 0's only
    assert a["tokens"] == b["tokens"] > 100
    assert abs(a["nll"] - b["nll"]) <= 1e-5 * abs(a["nll"]), (a, b)


def test_bench_tensor_parallel_takes_one_model(tp_folder, tmp_path, capsys):
    from mamba_deploy import cli

    code = cli.main(["bench", str(tp_folder), str(tp_folder), "--tensor-parallel", "--out", str(tmp_path / "b")])
    assert code == 2
    assert "--tensor-parallel benchmarks one model on the torch backend" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def _one_rank_env(monkeypatch):
    import socket

    from mamba_deploy import tp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(tp._group, "joined", tp._group["joined"])  # this test process is no rank afterwards


def test_an_interrupt_while_a_runner_drops_its_captures_still_lets_go_of_the_group(tp_folder, monkeypatch):
    """A Ctrl-C (or torchrun's SIGTERM) landing in close()'s synchronize left the runner counted
    as a holder with the group open, and a second close() never released it."""
    import torch.distributed as dist

    from mamba_deploy import tp
    from mamba_deploy.runners import open_runner

    _one_rank_env(monkeypatch)
    try:
        runner = open_runner(tp_folder, "torch", tensor_parallel=True)
        syncs = []

        def interrupted(sync=True):
            syncs.append(sync)
            raise KeyboardInterrupt

        runner._drop_captures = interrupted
        with pytest.raises(KeyboardInterrupt):
            runner.close()
        assert syncs == [True] and not list(tp._holders) and not tp._group["opened"] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_closing_the_group_first_drops_the_captures_of_runners_never_closed(tp_folder, monkeypatch):
    """tp.close_group at interpreter exit (a script that never closed its runner, or one an
    uncaught error's traceback keeps alive) destroyed the group while a CudaGraphRunner's graphs,
    which hold captured all-reduces, were alive: on 2 GPUs that hung at exit."""
    import torch.distributed as dist

    from mamba_deploy import tp
    from mamba_deploy.runners import open_runner

    _one_rank_env(monkeypatch)
    try:
        runner = open_runner(tp_folder, "torch", tensor_parallel=True)
        order = []
        runner._drop_captures = lambda sync=True: order.append(("drop", sync, dist.is_initialized()))
        tp.close_group(wait=False)  # what atexit runs
        assert order == [("drop", False, True)] and not list(tp._holders) and not dist.is_initialized()
        runner.close()  # nothing left to release: no error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_bug_under_torchrun_ends_each_rank_without_interpreter_teardown(tp_folder, tmp_path):
    """An unexpected exception (an NCCL error, a bug) escaped the console script, and the
    interpreter's exit then destroyed the group while the runner, kept alive by the traceback, still
    held its captured all-reduces. Now the rank prints the traceback and ends at once (exit 1): no
    exit callback runs."""
    script = tmp_path / "bug.py"
    script.write_text(f"""
import atexit, sys
from mamba_deploy import entry, generation
atexit.register(lambda: print("exit callbacks ran", file=sys.stderr, flush=True))
def broken(*a, **k):
    raise RuntimeError("a bug inside generate")
generation.generate = broken
sys.exit(entry.main(["generate", {str(tp_folder)!r}, "--prompt", "x", "--tensor-parallel"]))
""")
    done = _torchrun(str(script), timeout=240)
    assert done.returncode != 0
    assert "RuntimeError: a bug inside generate" in done.stderr, done.stderr[-2000:]
    assert "exit callbacks ran" not in done.stderr, done.stderr[-2000:]
    assert "rank 1: unexpected error" in done.stderr or done.stderr.count("a bug inside generate") == 2
