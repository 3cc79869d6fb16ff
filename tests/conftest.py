"""Shared fixtures: tiny random checkpoints built and saved by transformers (the independent
reference), so no test touches the network."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def _signals_as_in_a_terminal() -> None:
    """A suite started under nohup (SIGHUP ignored) or as a background job of a script (SIGINT
    ignored) would hand those ignored signals to the CLI processes the signal tests start, and the
    CLI keeps an inherited ignore on purpose (nohup), so those tests would fail or hang; in this
    process, Ctrl-C tests need Python's KeyboardInterrupt. SIGINT gets Python's own handler and
    SIGHUP a no-op one (still ignored here); exec gives the children the default disposition."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda signum, frame: None)


_signals_as_in_a_terminal()

HF_GROUPED_NORM = (5, 23)  # transformers' Mamba2 gated RMSNorm normalises per group from 5.23 on


def pytest_report_header(config):
    """Say up front when the installed reference cannot pass the n_groups > 1 comparisons."""
    try:
        import transformers
    except ImportError:
        return "transformers: not installed (the tests' reference; pip install -e '.[dev]')"
    release = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if release < HF_GROUPED_NORM:
        return (f"transformers {transformers.__version__}: before 5.23 its Mamba2 gated RMSNorm ignores "
                "n_groups, so every n_groups > 1 comparison with it fails; pip install 'transformers>=5.23'")
    return None

# kind -> transformers config kwargs; sizes chosen so chunk boundaries are crossed cheaply
TINY = {
    "mamba": dict(cls="MambaForCausalLM", cfg="MambaConfig",
                  kw=dict(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2,
                          expand=2, conv_kernel=4, time_step_rank=4)),
    "falcon_mamba": dict(cls="FalconMambaForCausalLM", cfg="FalconMambaConfig",
                         kw=dict(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2,
                                 expand=2, conv_kernel=4, time_step_rank=4)),
    "mamba2": dict(cls="Mamba2ForCausalLM", cfg="Mamba2Config",
                   kw=dict(vocab_size=128, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
                           conv_kernel=4, head_dim=16, num_heads=4, n_groups=1, chunk_size=16)),
    "mamba2_g2": dict(cls="Mamba2ForCausalLM", cfg="Mamba2Config",
                      kw=dict(vocab_size=128, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
                              conv_kernel=4, head_dim=8, num_heads=8, n_groups=2, chunk_size=16,
                              tie_word_embeddings=False)),
    # Mamba2 with the dt clamp (HF `time_step_limit`, our cfg.dt_limit). time_step_min/max widen the
    # dt_bias init so softplus(dt) crosses both bounds in both layers: on the tiny model ~29%/4% of
    # dt are below 0.05 and 5%/10% above 0.5 (layers 0/1); transformers' logits move by 5e-2
    # relative without the clamp (1e-2 without only its lower bound, 5e-2 without only its upper).
    # Not in KINDS (CI time): only the parity tests that would catch a dropped clamp take it.
    "mamba2_dtlimit": dict(cls="Mamba2ForCausalLM", cfg="Mamba2Config",
                           kw=dict(vocab_size=128, hidden_size=32, state_size=16, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, head_dim=16, num_heads=4, n_groups=1, chunk_size=16,
                                   time_step_limit=(0.05, 0.5), time_step_min=0.01, time_step_max=1.0)),
}
DT_LIMIT_KIND = "mamba2_dtlimit"
KINDS = [k for k in TINY if k != DT_LIMIT_KIND]  # the kinds every parity test runs on


try:  # llama.cpp through llama-cpp-python: the independent reference of the GGUF tests
    import llama_cpp  # noqa: F401

    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def build_hf_model(kind: str, seed: int = 0, **overrides):
    """A transformers model with random weights perturbed away from their init (so A, D,
    dt_bias, norms are not at trivial values)."""
    import transformers

    spec = TINY[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, spec["cfg"])(**{**spec["kw"], **overrides})
    model = getattr(transformers, spec["cls"])(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "A_log" in name or "dt" in name else 0.05))
    return model


def random_lm(cfg, dtype=torch.float32, seed: int = 0, device="cpu"):
    """Our MambaLM with random weights away from init (A_log, D, dt_bias, norms non-trivial), for
    the options transformers has no model for."""
    from mamba_deploy.model import MambaLM

    torch.manual_seed(seed)
    m = MambaLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
        for layer in m.backbone.layers:
            layer.mixer.A_log.copy_(torch.rand_like(layer.mixer.A_log) * 2)
    return m.to(device=device, dtype=dtype).eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(kind) -> (folder, transformers model); cached per session."""
    cache = {}

    def make(kind: str):
        if kind not in cache:
            model = build_hf_model(kind)
            folder = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(folder)
            cache[kind] = (folder, model)
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def onnx_export(hf_checkpoint, tmp_path_factory):
    """onnx_export(kind, dtype="fp32") -> (ONNX folder, HF folder, transformers model), exported
    once per session and shared by the ONNX Runtime, OpenVINO and TensorRT tests."""
    from mamba_deploy.export.onnx import export_onnx

    cache = {}

    def make(kind: str, dtype: str = "fp32"):
        if (kind, dtype) not in cache:
            folder, hf = hf_checkpoint(kind)
            out = tmp_path_factory.mktemp(f"onnx_{kind}_{dtype}") / "out"
            export_onnx(folder, out, dtype=dtype)
            cache[kind, dtype] = (out, folder, hf)
        return cache[kind, dtype]

    return make


@pytest.fixture(scope="session")
def ckpt(hf_checkpoint, tiny_tokenizer, tmp_path_factory):
    """ckpt(kind) -> (folder with weights + the tiny BPE tokenizer, transformers model); the GGUF
    and llama.cpp tests export these (a GGUF needs a tokenizer)."""
    cache = {}

    def make(kind):
        if kind not in cache:
            src, hf = hf_checkpoint(kind)
            dst = tmp_path_factory.mktemp(f"gguf_src_{kind}") / "model"
            shutil.copytree(src, dst)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tiny_tokenizer / f, dst / f)
            cache[kind] = (dst, hf)
        return cache[kind]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(ckpt, tmp_path_factory):
    """The tiny Mamba1 (ckpt("mamba")) exported to F32, quietly (its fallback warnings are tested
    where they matter); tests read it or edit copies of it."""
    import warnings

    from mamba_deploy.export.gguf import export_gguf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_gguf(ckpt("mamba")[0], tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf")


def finish_gguf(w) -> None:
    """Write a gguf.GGUFWriter's header, metadata and tensors, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rewrite_gguf(src, dst, drop=lambda key: False, edit=None, tensors=None, arch=None):
    """A copy of the GGUF `src` without the metadata keys `drop` selects, with `edit` (key -> value
    of the same type, or (value, type[, sub_type]); a key the source lacks is added) applied, tensors replaced by `tensors` (name ->
    array) and general.architecture set to `arch` ((value, type[, sub_type])): files as other
    converters write them, or damaged ones."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    if arch is not None:
        w.kv_data[0]["general.architecture"] = gguf.gguf_writer.GGUFValue(arch[0], arch[1], *arch[2:])
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or drop(name):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        value, vtype = f.contents(), f.types[0]
        if name in (edit or {}):
            new = edit[name]
            value, vtype, sub = new if isinstance(new, tuple) else (new, vtype, sub)
        w.add_key_value(name, value, vtype, sub_type=sub)
    for name, new in (edit or {}).items():  # keys the source lacks: added, (value, type[, sub_type])
        if name not in r.fields:
            w.add_key_value(name, new[0], new[1], sub_type=new[2] if len(new) > 2 else None)
    for t in r.tensors:
        if t.name in (tensors or {}):
            w.add_tensor(t.name, tensors[t.name])
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    finish_gguf(w)
    return dst


def edited_copy(src, dst, name: str, **changes):
    """A copy of the folder `src` at `dst` whose JSON file `name` has `changes` applied: an edited
    config.json or manifest.json, the rest of the folder as it was."""
    import json
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text())
    data.update(changes)
    (dst / name).write_text(json.dumps(data))
    return dst


def hf_cache(out):
    """The recurrent cache a transformers Mamba forward returned: `cache_params` (<= 5.2x), or
    `cache`, the name its deprecation warning announces for 5.40."""
    cache = getattr(out, "cache_params", None)
    return cache if cache is not None else out.cache


def hf_cached_step(hf, ids, cache, position: int):
    """transformers' cached forward of ids (b, 1) at `position` -> (logits, cache). The cache goes
    under whichever keyword this transformers' forward names (`cache_params`, later `cache`): an
    unknown keyword would be swallowed by **kwargs and the step run from a zero state."""
    import inspect

    key = "cache_params" if "cache_params" in inspect.signature(hf.forward).parameters else "cache"
    out = hf(ids, use_cache=True, cache_position=torch.tensor([position]), **{key: cache})
    return out.logits, hf_cache(out)


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# A byte-level BPE of < 100 tokens with an EOS, small enough for the tiny models' 128-row vocab
# (so a GGUF vocab is padded with unused tokens up to the embedding rows).
BPE_TEXTS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
             "hello world, hello mamba! state spaces are fun"] * 10
BPE_EOS = "<|endoftext|>"


def write_tiny_bpe(folder) -> None:
    """tokenizer.json + tokenizer_config.json (eos_token) of the tiny BPE into `folder`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(BPE_TEXTS, trainers.BpeTrainer(vocab_size=100, special_tokens=[BPE_EOS],
                                                           show_progress=False))
    assert tok.get_vocab_size() < 128
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": BPE_EOS}))


def tiny_mamba_with_bpe(hf_checkpoint, tmp_path_factory, name: str):
    """A fresh copy of the tiny mamba checkpoint with the tiny BPE (< 128 tokens) beside it, for a
    module's own fixture (a copy per module: tests may write files into it)."""
    import shutil

    src, _ = hf_checkpoint("mamba")
    dst = tmp_path_factory.mktemp(name) / "tiny-mamba"
    shutil.copytree(src, dst)
    write_tiny_bpe(dst)
    return dst


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A folder holding the tiny BPE (write_tiny_bpe)."""
    folder = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_bpe(folder)
    return folder


def in_thread(fn, *args):
    """Runs fn(*args) in a daemon thread -> (thread, list that will hold its result)."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    t.start()
    return t, out


def wait_until(cond, what: str, timeout: float = 10.0) -> None:
    """Polls cond() every 10 ms; fails naming `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def scheduler_for(request):
    """scheduler_for(runner, **kw) -> a batching.Scheduler (its own thread), closed after the test."""
    from mamba_deploy.batching import Scheduler

    def make(runner, **kw):
        s = Scheduler(runner, **kw)
        request.addfinalizer(lambda: s.close(30))
        return s
    return make


@contextlib.contextmanager
def serving(runner, timeout: float = 10.0, **kw):
    """make_server(runner) on 127.0.0.1, a free port, quiet unless kw says otherwise, serving in a
    daemon thread; shut down, closed and joined when the block ends."""
    import threading

    from mamba_deploy.serve import make_server

    server = make_server(runner, "127.0.0.1", 0, **{"quiet": True, **kw})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout)


def start_server(runner, request, **kw):
    """serving(runner, **kw) for the rest of a test (stopped by a finalizer) -> the server."""
    cm = serving(runner, **kw)
    server = cm.__enter__()
    request.addfinalizer(lambda: cm.__exit__(None, None, None))
    return server


def post_json(server, body, path: str = "/v1/completions", headers=None, timeout: float = 10.0):
    """POST `body` as JSON -> (status, headers dict, body bytes)."""
    import http.client
    import json

    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                  **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def fake_data(monkeypatch):
    """Random token ids in place of `train`'s stdlib corpus (no encoding: training runs stay short)."""
    import numpy as np

    from mamba_deploy import train

    rng = np.random.default_rng(0)
    data = (rng.integers(0, 4096, 20000).astype(np.int32), rng.integers(0, 4096, 5000).astype(np.int32))
    monkeypatch.setattr(train, "load_data", lambda args: data)
