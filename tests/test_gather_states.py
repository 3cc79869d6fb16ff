"""Runner.gather_states (rows of several states joined into one, as a continuous-batching server
does it) on every backend installed here, and reserve_rows / can_gather_states.

Reference: each gathered row against the same prompt prefilled alone at batch 1 by a fresh state
of the same runner, then stepped with the same tokens. Neither reference path goes through
gather_states: a wrong row, a row whose conv or ssm state (or int8 scales) was not carried over,
or a sequence mixed up with another shows as different logits. Tolerances: 1e-4 relative to
max |reference| for fp32 backends (batch-1 vs batch-3 arithmetic only); the quantized state
cache against its own batch-1 path, which rounds the same rows the same way (QUANT_TOL).
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from conftest import rel_err
from mamba_deploy.errors import ShapeError
from mamba_deploy.generation import left_pad
from mamba_deploy.runners import open_runner
from mamba_deploy.runners.base import Runner

FP32_TOL = 1e-4
# a value at a rounding boundary may round either way in the batched and the batch-1 paths:
# one fp16 ulp (2**-11 of the value), one int8 code (1/127 of its row's max)
QUANT_TOL = {"int8": 8e-3, "fp16": 1e-3}
BACKENDS = ["torch", "onnx", "openvino", "llama.cpp", "quant-int8", "quant-fp16"]
KINDS2 = ["mamba", "mamba2"]
# batch 2 and batch 3, lengths differ (left padding); 19 > Mamba2's chunk_size 16
P2 = [[5, 17, 3, 9, 22, 41, 7, 13, 2, 64, 8, 30, 31, 1, 19, 6, 44, 12, 3], [8, 2, 60, 4, 77]]
P3 = [[11, 4, 90, 33, 1, 25, 50, 7], [70, 6, 12, 44, 2, 9, 9, 30, 81, 3, 14], [9, 29, 30]]
N_STEPS = 4  # > conv kernel - 1: every conv-state column is read by the steps


@pytest.fixture(scope="module")
def runners(hf_checkpoint, onnx_export, ckpt, tmp_path_factory):
    """runners(backend, kind, twin=0) -> an open runner, cached for the module (twin: another
    runner of the same file)."""
    cache, ggufs = {}, {}

    def make(backend, kind):
        if backend == "torch":
            return open_runner(hf_checkpoint(kind)[0], "torch")
        if backend in ("onnx", "openvino"):
            if backend == "openvino":
                pytest.importorskip("openvino", reason="openvino is not installed: pip install -r requirements-ci.txt")
            return open_runner(onnx_export(kind)[0], backend)
        if backend == "llama.cpp":
            pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
            from mamba_deploy.export.gguf import export_gguf

            if kind not in ggufs:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ggufs[kind] = export_gguf(ckpt(kind)[0], tmp_path_factory.mktemp(f"gather_{kind}") / "m.gguf")
            # room for every test's live rows: a rebuild for more would invalidate live states
            return open_runner(ggufs[kind], "llama.cpp", n_threads=1, n_seq_max=16)
        from mamba_deploy.checkpoint import load_model
        from mamba_deploy.quant.state_cache import QuantizedStateRunner

        return QuantizedStateRunner(load_model(hf_checkpoint(kind)[0]), backend.removeprefix("quant-"))

    def get(backend, kind, twin=0):
        if (backend, kind, twin) not in cache:
            cache[backend, kind, twin] = make(backend, kind)
        return cache[backend, kind, twin]

    yield get
    for r in cache.values():
        r.close()


def tol(backend):
    return QUANT_TOL[backend.removeprefix("quant-")] if backend.startswith("quant-") else FP32_TOL


def prefilled(r, prompts):
    ids, mask = left_pad(prompts)
    st = r.new_state(len(prompts))
    _, st = r.prefill(ids, st, attention_mask=mask, last_only=True)
    return st


def step_tokens(n_rows, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (n_rows,), generator=g) for _ in range(N_STEPS)]


def reference(r, prompt, tokens):
    """One row alone: batch-1 prefill of its prompt, then the same steps -> [logits (V,)]."""
    st = prefilled(r, [prompt])
    return [r.step(t.reshape(1), st)[0][0] for t in tokens]


def check_rows(r, backend, state, prompts, seed=0, what=""):
    """Step `state` (whose rows hold `prompts`) N_STEPS tokens; each row against reference()."""
    tokens = step_tokens(len(prompts), seed)
    got = [r.step(t, state)[0] for t in tokens]
    for i, p in enumerate(prompts):
        want = reference(r, p, [t[i] for t in tokens])
        for k in range(N_STEPS):
            err = rel_err(got[k][i], want[k])
            assert err <= tol(backend), f"{what} row {i} (prompt of {len(p)}) step {k}: rel err {err:.2e}"


@pytest.mark.parametrize("kind", KINDS2)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_rows_step_as_if_prefilled_alone(runners, backend, kind):
    """[(s2, [1]), (s3, [2, 0])]: rows from two states, out of order, one from each length."""
    r = runners(backend, kind)
    assert r.can_gather_states
    assert r.reserve_rows(7) == (16 if backend == "llama.cpp" else 7)  # llama.cpp: already holds 16
    s2, s3 = prefilled(r, P2), prefilled(r, P3)
    g = r.gather_states([(s2, [1]), (s3, [2, 0])])
    check_rows(r, backend, g, [P2[1], P3[2], P3[0]], what="gathered")


def check_state_rows(r, backend, state, prompts, what):
    """to_torch_state of `state`, row by row, against each prompt prefilled alone."""
    got = r.to_torch_state(state)
    assert got.conv.shape[1] == got.ssm.shape[1] == len(prompts), what
    for i, p in enumerate(prompts):
        want = r.to_torch_state(prefilled(r, [p]))
        for name in ("conv", "ssm"):
            err = rel_err(getattr(got, name)[:, i], getattr(want, name)[:, 0])
            assert err <= tol(backend), f"{what} row {i} {name}: rel err {err:.2e}"


@pytest.mark.parametrize("kind", KINDS2)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_state_equals_the_rows_prefilled_alone(runners, backend, kind):
    """The state itself (to_torch_state) right after gathering: a join of all rows
    ([(s2, None), (s3, None)]), then a drop ([(joined, [4, 0, 2])]), which then steps."""
    r = runners(backend, kind)
    prompts = P2 + P3
    joined = r.gather_states([(prefilled(r, P2), None), (prefilled(r, P3), None)])
    check_state_rows(r, backend, joined, prompts, "joined")
    kept = [4, 0, 2]
    dropped = r.gather_states([(joined, torch.tensor(kept))])  # rows as a tensor, as a server may keep them
    check_state_rows(r, backend, dropped, [prompts[i] for i in kept], "dropped")
    check_rows(r, backend, dropped, [prompts[i] for i in kept], seed=1, what="dropped")


@pytest.mark.parametrize("backend", BACKENDS)
def test_join_all_rows_then_continue(runners, backend):
    """A server's join: [(running, None), (new, None)] after the running batch has decoded a few
    tokens: rows=None keeps all of a state's rows, in order, with their positions."""
    r = runners(backend, "mamba")
    running = prefilled(r, P2)
    first = step_tokens(2, seed=7)[:2]
    for t in first:
        r.step(t, running)
    g = r.gather_states([(running, None), (prefilled(r, P3), None)])
    # the running rows have seen their prompt and two steps: extend their "prompt" by those
    prompts = [P2[i] + [int(t[i]) for t in first] for i in range(2)] + P3
    check_rows(r, backend, g, prompts, seed=3, what="joined")


BAD_PARTS = [
    (lambda s, o: [(s, [0]), (s, [1])], "same state twice"),
    (lambda s, o: [(s, [2])], r"rows \[2\] are outside 0\.\.1"),
    (lambda s, o: [(s, [-1])], r"rows \[-1\] are outside"),
    (lambda s, o: [(s, [1, 1])], r"repeat a row"),
    (lambda s, o: [(s, [0.0])], "list of row indices"),
    (lambda s, o: [(s, 1)], "list of row indices"),
    (lambda s, o: [s], r"list of \(state, rows\) pairs"),
    (lambda s, o: (s, [0]), r"list of \(state, rows\) pairs"),
    (lambda s, o: [(s, [0], None)], r"list of \(state, rows\) pairs"),
    (lambda s, o: [(s, [0]), (o, [0])], "another|expected"),
]


@pytest.mark.parametrize("bad", range(len(BAD_PARTS)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_parts_are_refused_without_consuming_the_states(runners, backend, bad):
    """ShapeError naming the problem, and the state still holds its rows (nothing was taken)."""
    r = runners(backend, "mamba")
    other = other_runner_state(r, backend, runners)
    s = prefilled(r, P2)
    before = r.to_torch_state(s).clone()
    make, match = BAD_PARTS[bad]
    with pytest.raises(ShapeError, match=match):
        r.gather_states(make(s, other))
    after = r.to_torch_state(s)
    assert torch.equal(after.conv, before.conv) and torch.equal(after.ssm, before.ssm)
    r.step(torch.tensor([1, 2]), s)  # still a live state of this runner


def other_runner_state(r, backend, runners):
    """A batch-1 state this runner must refuse: another runner's (of another model, or for
    llama.cpp another runner of the same file, or for the quantized cache the other kind)."""
    if backend == "llama.cpp":
        return runners("llama.cpp", "mamba", twin=1).new_state(1)
    if backend.startswith("quant-"):
        return runners("quant-fp16" if backend == "quant-int8" else "quant-int8", "mamba").new_state(1)
    return runners(backend, "mamba2").new_state(1)


@pytest.mark.parametrize("backend", ["quant-int8", "quant-fp16"])
def test_quantized_state_of_another_model_is_refused(runners, backend):
    r = runners(backend, "mamba")
    with pytest.raises(ShapeError):
        r.gather_states([(prefilled(r, P2), None), (runners(backend, "mamba2").new_state(1), None)])


def test_can_gather_states_needs_gather_or_load():
    class Bare(Runner):
        def new_state(self, batch):
            return None

        def prefill(self, ids, state, attention_mask=None, last_only=False):
            return None, state

        def step(self, ids, state):
            return None, state

    class Loads(Bare):
        def load_torch_state(self, state, src):
            pass

    assert not Bare().can_gather_states
    assert Loads().can_gather_states
    with pytest.raises(NotImplementedError):
        Bare().gather_states([(None, None)])


# ---------------------------------------------------------------- llama.cpp sequences and context

@pytest.fixture
def llama(runners):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    gguf = runners("llama.cpp", "mamba").path
    opened = []

    def make(**kw):
        opened.append(open_runner(gguf, "llama.cpp", n_threads=1, **kw))
        return opened[-1]

    yield make
    for r in opened:
        r.close()


def test_llamacpp_gathers_return_dropped_sequences_to_the_pool(llama):
    """Many joins and drops with live states: the dropped rows' sequences are reused, so the
    context never grows (which would invalidate the live states) and the rows stay right."""
    r = llama(n_seq_max=4)
    generation, n_seq = r._generation, r._n_seq
    running = prefilled(r, P2)
    prompts = list(P2)
    for i in range(12):
        new = prefilled(r, [P3[i % 3]])  # 2 live rows + 1 new: fits in 4 only if drops were freed
        running = r.gather_states([(running, [1]), (new, None)])
        prompts = [prompts[1], P3[i % 3]]
        assert sorted(r._free + running.seq_ids) == list(range(n_seq))  # no sequence lost or doubled
    assert (r._generation, r._n_seq) == (generation, n_seq)
    check_rows(r, "llama.cpp", running, prompts, seed=5, what="after 12 gathers")
    assert (r._generation, r._n_seq) == (generation, n_seq)


def test_llamacpp_gathered_state_frees_its_sequences_when_dropped(llama):
    r = llama(n_seq_max=4)
    g = r.gather_states([(prefilled(r, P2), [0]), (prefilled(r, P3[:2]), [1])])
    assert len(r._free) == 2
    del g
    gc.collect()
    assert sorted(r._free) == [0, 1, 2, 3]
    generation = r._generation
    r.new_state(4)
    assert r._generation == generation


def test_llamacpp_consumed_state_is_empty_and_old_context_states_refused(llama):
    r = llama(n_seq_max=2)
    s = prefilled(r, P2)
    g = r.gather_states([(s, None)])
    assert s.batch_size == 0 and g.batch_size == 2  # the handle gave its sequences away
    old = g
    r.new_state(3)  # more than the context holds: it is rebuilt, and `old`'s sequences move along
    assert r.gather_states([(old, None)]).batch_size == 2
    # a llama.cpp that refuses a sequence back: the handles of the old context are refused by name
    r = llama(n_seq_max=2)
    old = prefilled(r, P2)
    r._set_seq_bytes = lambda seq, data: False
    r.new_state(3)
    with pytest.raises(ShapeError, match="older context.*n_seq_max"):
        r.gather_states([(old, None)])


def test_llamacpp_reserve_rows_keeps_earlier_states_live(llama):
    """After reserve_rows(6), six rows' worth of states fit without a rebuild: a state made
    first still steps correctly after the others are made."""
    r = llama(n_seq_max=1)
    assert r.reserve_rows(6) == 6
    generation = r._generation
    first = prefilled(r, [P3[1]])
    others = [prefilled(r, P2), prefilled(r, P3)]
    assert r._generation == generation
    r.step(torch.tensor([3]), first)  # still this context's handle
    del others  # room for check_rows' batch-1 references
    check_rows(r, "llama.cpp", first, [P3[1] + [3]], what="first of 6 reserved rows")
    assert r.reserve_rows(3) == 6  # never shrinks
    assert r.reserve_rows(10**6) == 256  # llama.cpp's LLAMA_MAX_SEQ
    # without the reserve, the same states grow the context, and the first one moves along
    r = llama(n_seq_max=1)
    first, others = prefilled(r, [P3[1]]), [prefilled(r, P2), prefilled(r, P3)]
    assert r._n_seq >= 6 and len(others) == 2  # grown for them
    r.step(torch.tensor([3]), first)
    del others
    check_rows(r, "llama.cpp", first, [P3[1] + [3]], what="first row, carried into the grown context")


# ---------------------------------------------------------------- CUDA graphs

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="CUDA graph replay needs a CUDA GPU (CPU keeps the eager runner)")
@pytest.mark.parametrize("kind", KINDS2)
def test_cuda_graph_runner_steps_gathered_states_by_replay(hf_checkpoint, kind):
    """Gathered rows step through a captured graph (the consumed states' buckets are freed, so
    the result takes one) and match the eager TorchRunner on the same GPU."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.cuda_graph import CudaGraphRunner
    from mamba_deploy.runners.torch_runner import TorchRunner

    from mamba_deploy.cuda_graph import make_runner

    model = load_model(hf_checkpoint(kind)[0], device="cuda")
    graph, eager = make_runner(model), TorchRunner(model)
    if not isinstance(graph, CudaGraphRunner):
        pytest.skip("CUDA graphs are off here (no Triton, or disabled): no CudaGraphRunner")
    g2, g3 = prefilled(graph, P2), prefilled(graph, P3)
    g = graph.gather_states([(g2, [1]), (g3, [2, 0])])
    assert any(bk.owns(g) for bk in graph._b.values()), "the gathered state got no bucket"
    e2, e3 = prefilled(eager, P2), prefilled(eager, P3)
    e = eager.gather_states([(e2, [1]), (e3, [2, 0])])
    ref = [prefilled(eager, [p]) for p in (P2[1], P3[2], P3[0])]
    for t in step_tokens(3, seed=0):
        got, want = graph.step(t, g)[0], eager.step(t, e)[0]
        assert rel_err(got, want) <= FP32_TOL
        for i, st in enumerate(ref):
            assert rel_err(got[i], eager.step(t[i:i + 1], st)[0][0]) <= FP32_TOL
