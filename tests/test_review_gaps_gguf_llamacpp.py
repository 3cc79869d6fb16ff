"""Gaps found by the mutation review of export/gguf.py, export/gguf_tables.py and
runners/llamacpp_runner.py (GGUF writer, its format tables, the llama.cpp runner).

References: llama.cpp itself through llama-cpp-python (its quantizer's tensor types, its own
model metadata, the logits of other llama.cpp sequences), the `gguf` package's reader, the
`tokenizers` library, and transformers' tiny models (conftest).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mamba_deploy.errors import ConfigError, ShapeError
from mamba_deploy.export.gguf import export_gguf

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(ckpt):
    """tiny_folder(kind) -> a transformers checkpoint folder with the tiny BPE beside it."""
    return lambda kind: ckpt(kind)[0]



def open_llama(path, **kw):
    from mamba_deploy.runners import open_runner

    return open_runner(path, "llama.cpp", n_threads=1, **kw)


def ids(n, seed=0, vocab=100):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- export

def test_bad_quantizer_threads_are_refused_before_any_work(tiny_folder, tmp_path):
    """n_threads is checked up front like every backend's threads, not handed to llama.cpp."""
    out = tmp_path / "k.gguf"
    for bad in (-1, 10**6):
        with pytest.raises(ConfigError, match="threads"):
            export_gguf(tiny_folder("mamba"), out, outtype="q4_k_m", n_threads=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("outtype", ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"])
def test_kquant_fallback_warning_names_the_types_llamacpp_wrote(outtype, tiny_folder, tmp_path):
    """The warning given before llama.cpp quantizes must say what llama.cpp's quantizer then
    really does with rows that do not fit its 256-wide K blocks (read back with GGUFReader)."""
    from mamba_deploy.export.gguf_tables import keep_f32

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_gguf(tiny_folder("mamba"), tmp_path / "k.gguf", outtype=outtype, n_threads=1)
    warned = set()
    for w in caught:
        m = re.search(r"row length (\d+) is not a multiple of the (\w+) block .*; using (\w+)", str(w.message))
        if m:
            warned.add((int(m[1]), m[2], m[3]))
    wrote = set()
    for t in gguf.GGUFReader(str(out)).tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type)
        if keep_f32(t.name, len(t.shape)):
            assert kind == gguf.GGMLQuantizationType.F32, t.name  # llama.cpp keeps these F32 too
            continue
        if t.name in ("token_embd.weight", "output.weight"):
            continue  # the output matrix (here the tied embedding): llama.cpp's K-quant mix picks its own type
        # none of the tiny model's rows (<= 128) fits a K block: every matrix fell back
        assert int(t.shape[0]) % 256, t.name
        wrote.add((int(t.shape[0]), kind.name))
    assert {(row, used) for row, _, used in warned} == wrote
    main = {w for _, w, _ in warned}
    assert len(main) == 1 and main.pop()[:2] == outtype[:2].upper()  # q4_k_m -> Q4_K


def test_tied_embeddings_write_no_output_tensor(tiny_folder, tmp_path):
    """As llama.cpp's converter: a tied lm_head is absent (llama.cpp then reuses token_embd);
    an untied one is written and equals transformers' lm_head."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tied = export_gguf(tiny_folder("mamba"), tmp_path / "tied.gguf")
        untied = export_gguf(tiny_folder("mamba2_g2"), tmp_path / "untied.gguf")
    assert transformers.AutoConfig.from_pretrained(tiny_folder("mamba")).tie_word_embeddings
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(tied)).tensors}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder("mamba2_g2"))
    out = {t.name: t for t in gguf.GGUFReader(str(untied)).tensors}["output.weight"]
    assert torch.equal(torch.from_numpy(out.data.copy()), hf.lm_head.weight.detach())


def test_llamacpp_trained_context_covers_the_runner_default(tiny_gguf):
    """llama.cpp warns when n_ctx exceeds the GGUF's context_length: the runner's default n_ctx
    (since the thirty-sixth session that context_length itself, at least 131072) must stay
    within what the export declares (llama.cpp reads it back itself)."""
    with open_llama(tiny_gguf) as r:
        assert llama_cpp.llama_model_n_ctx_train(r._model.ptr) >= r.n_ctx >= 131072


# ----------------------------------------------------------------------------- runner

_STEP_WIDER_THAN_N_BATCH = """
import sys, torch
from mamba_deploy.runners import open_runner
with open_runner(sys.argv[1], "llama.cpp", n_threads=1, n_batch=2) as r:
    prompt = torch.tensor([[5, 6, 7]])
    st = r.new_state(4)
    r.prefill(prompt.repeat(4, 1), st)
    got, st = r.step(torch.tensor([1, 2, 3, 4]), st)
    for i, t in enumerate([1, 2, 3, 4]):  # each row alone, in its own llama.cpp sequence
        one = r.new_state(1)
        r.prefill(prompt, one)
        want, one = r.step(torch.tensor([t]), one)
        assert torch.allclose(got[i], want[0], rtol=1e-4, atol=1e-5), i
print("ok")
"""


def test_step_of_more_rows_than_n_batch(tiny_gguf):
    """step decodes all rows in one llama_decode: with more rows than n_batch llama.cpp used to
    abort the whole process (GGML_ASSERT on n_outputs), hence the subprocess."""
    p = subprocess.run([sys.executable, "-c", _STEP_WIDER_THAN_N_BATCH, str(tiny_gguf)], capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


def test_reused_slot_starts_from_a_clear_state(tiny_gguf):
    """With one slot, a new state reuses the slot of a dropped one: its logits must be those of
    a fresh runner, not a continuation of the old sequence."""
    x, y = ids(7, 1), ids(5, 2)
    with open_llama(tiny_gguf, n_seq_max=1) as fresh:
        want, _ = fresh.prefill(y, fresh.new_state(1))
    with open_llama(tiny_gguf, n_seq_max=1) as r:
        old = r.new_state(1)
        r.prefill(x, old)
        del old
        got, _ = r.prefill(y, r.new_state(1))
    assert torch.equal(got, want)


def test_slots_of_dropped_states_return_without_rebuilding_the_context(tiny_gguf):
    """n_seq_max live states fit; a dropped state's slot is reused, so a live handle stays valid."""
    with open_llama(tiny_gguf, n_seq_max=3) as r:
        live = [r.new_state(1) for _ in range(3)]  # all n_seq_max slots, one context
        for i in range(3):
            r.prefill(ids(3), live[i])
        del live[2]  # its slot goes back to the pool
        ctx, builds = r._ctx, []
        make = r._make_context
        r._make_context = lambda n: (builds.append(n), make(n))[1]
        again = r.new_state(1)
        r.prefill(ids(3), again)
        r.step(torch.tensor([1]), live[0])  # still this context's handle
        assert builds == [] and r._ctx is ctx and r._n_seq == 3, "the dropped slot was not reused"


def test_growing_doubles_the_slots(tiny_gguf):
    """The rebuild for a larger batch leaves room (twice the slots), so a small state made
    right after does not rebuild again and invalidate the large one."""
    with open_llama(tiny_gguf, n_seq_max=4) as r:
        big = r.new_state(5)
        assert r._n_seq == 8, "grown to twice the slots, not to just enough"
        r.prefill(ids(3).repeat(5, 1), big)
        builds = []
        make = r._make_context
        r._make_context = lambda n: (builds.append(n), make(n))[1]
        small = r.new_state(1)
        r.prefill(ids(3), small)
        r.step(torch.tensor([1, 2, 3, 4, 5]), big)
        assert builds == [], "a small state after the large one rebuilt the context"


def test_n_ctx_caps_positions_exactly(tiny_gguf):
    """Positions 0 .. n_ctx-1 are usable; the next token is refused."""
    with open_llama(tiny_gguf, n_ctx=16) as r:
        st = r.new_state(1)
        r.prefill(ids(15), st)
        r.step(torch.tensor([3]), st)  # position 15 = n_ctx - 1
        with pytest.raises(ShapeError, match="n_ctx"):
            r.step(torch.tensor([3]), st)


def test_every_sequence_of_a_shared_context_may_use_all_n_ctx_positions(tiny_gguf, tiny_folder):
    """Newer llama.cpp splits n_ctx over n_seq_max sequences for attention caches (n_ctx_seq); a
    recurrent model's sequences each keep the whole n_ctx. Three rows in a context of 4
    sequences reach position n_ctx - 1 = 15 (4x n_ctx / n_seq_max), with the logits of the
    transformers model on the same tokens; the next token is refused and leaves the state."""
    from mamba_deploy.runners import open_runner

    prompts = torch.cat([ids(15, seed=s) for s in range(3)])
    last = torch.tensor([3, 5, 7])
    with open_llama(tiny_gguf, n_ctx=16, n_seq_max=4) as r:
        st = r.new_state(3)
        r.prefill(prompts, st)
        got, st = r.step(last, st)
        assert st.pos == [16, 16, 16]
        with pytest.raises(ShapeError, match="n_ctx=16"):
            r.step(last, st)
        assert st.pos == [16, 16, 16]
    ref = open_runner(tiny_folder("mamba"), "torch")
    logits, _ = ref.prefill(torch.cat([prompts, last[:, None]], 1), ref.new_state(3), last_only=True)
    assert torch.allclose(got, logits[:, 0], rtol=1e-4, atol=1e-4), (got - logits[:, 0]).abs().max()


def test_step_logits_survive_the_next_step(tiny_gguf):
    """The returned logits are the caller's: llama.cpp reuses its logits buffer on the next decode."""
    with open_llama(tiny_gguf) as r:
        st = r.new_state(1)
        r.prefill(ids(4), st)
        first, st = r.step(torch.tensor([7]), st)
        kept = first.clone()
        r.step(torch.tensor([9]), st)
        assert torch.equal(first, kept)


def test_quantizer_threads_reach_llamacpp(tiny_folder, tmp_path, monkeypatch):
    """n_threads is what llama.cpp's quantizer is given (nthread), not its default."""
    real, seen = llama_cpp.llama_model_quantize, []

    def spy(src, dst, params):
        seen.append(params.nthread)
        return real(src, dst, params)

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_gguf(tiny_folder("mamba"), tmp_path / "k.gguf", outtype="q6_k", n_threads=2)
    assert seen == [2]


def test_requantized_gguf_with_a_short_vocab_gets_a_full_one(tiny_folder, tmp_path):
    """A GGUF whose vocab is shorter than its embedding rows (another converter's) is re-exported
    with the tokenizer beside it, padded to the rows, which is what llama.cpp needs to load it."""
    import dataclasses

    from gguf import GGMLQuantizationType as QT
    from gguf import LlamaFileType as FT

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.export.gguf import write_gguf
    from mamba_deploy.export.gguf_vocab import find_tokenizer_file, read_vocab

    folder = tiny_folder("mamba")
    model = load_model(folder, dtype=torch.float32)
    full = read_vocab(find_tokenizer_file(None, folder), model.config.padded_vocab_size, {"eos": 0})
    short = dataclasses.replace(full, tokens=full.tokens[:100], types=full.types[:100])
    src = tmp_path / "src"
    src.mkdir()
    write_gguf(model, short, src / "short.gguf", FT.ALL_F32, QT.F32)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, src / f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(src / "short.gguf", tmp_path / "out.gguf", outtype="q8_0")
    r = gguf.GGUFReader(str(out))
    rows = int({t.name: t for t in r.tensors}["token_embd.weight"].shape[1])
    assert len(r.get_field("tokenizer.ggml.tokens").data) == rows
    with open_llama(out) as lr:
        assert lr.n_vocab == rows


@pytest.mark.parametrize("arch,option", [("mamba1", dict(bias=True)), ("mamba2", dict(norm_before_gate=True))])
def test_variants_llamacpp_cannot_run_are_refused(arch, option, tiny_tokenizer, tmp_path):
    """in/out_proj biases and Mamba2's norm-before-gate have no place in llama.cpp's graphs: a GGUF
    of them would load and silently compute another model, so the export refuses them."""
    from conftest import random_lm
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ExportError

    shape = dict(d_model=32, d_state=16, n_layer=2, vocab_size=100) | (dict(headdim=8) if arch == "mamba2" else {})
    model = random_lm(MambaConfig(arch=arch, **shape, **option))
    with pytest.raises(ExportError, match="bias" if arch == "mamba1" else "norm_before_gate"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_tokenizer)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind,clamped", [("mamba2_dtlimit", True), ("mamba2", False)])
def test_dt_limit_warning_only_for_a_clamped_model(kind, clamped, tiny_folder, hf_checkpoint, tmp_path):
    """llama.cpp has no dt clamp: exactly the models with transformers' time_step_limit narrower
    than (0, inf) are warned about."""
    _, hf = hf_checkpoint(kind)
    assert (tuple(hf.config.time_step_limit) != (0.0, float("inf"))) == clamped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gguf(tiny_folder(kind), tmp_path / "m.gguf")
    assert any("dt_limit" in str(w.message) for w in caught) == clamped


def test_state_of_another_runner_is_refused(tiny_gguf):
    """A state's sequence ids name slots of the runner that made it, not of another runner."""
    with open_llama(tiny_gguf) as a, open_llama(tiny_gguf) as b:
        st = a.new_state(1)
        with pytest.raises(ShapeError, match="another runner"):
            b.prefill(ids(3), st)


def test_left_padded_full_logits_land_on_the_real_positions(tiny_gguf):
    """last_only=False with left padding: each real token's logits sit at its own position (as
    llama.cpp gives them for the unpadded row), the padded positions are zero."""
    short, long = ids(3, 5), ids(6, 6)
    with open_llama(tiny_gguf) as r:
        want_short, _ = r.prefill(short, r.new_state(1))
        want_long, _ = r.prefill(long, r.new_state(1))
        batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
        mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
        got, _ = r.prefill(batch, r.new_state(2), attention_mask=mask)
    assert torch.allclose(got[0, 3:], want_short[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[0, :3], torch.zeros(3, got.shape[-1]))
    assert torch.allclose(got[1], want_long[0], rtol=1e-4, atol=1e-5)


def test_encode_without_special_tokens_adds_no_bos(tiny_folder, tiny_tokenizer, tmp_path):
    """A vocabulary that asks for BOS (tokenizer.ggml.add_bos_token, as SentencePiece ones do):
    add_special_tokens=False gives the bare tokens, as the `tokenizers` library encodes the text."""
    import dataclasses

    from gguf import GGMLQuantizationType as QT
    from gguf import LlamaFileType as FT
    from tokenizers import Tokenizer

    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.export.gguf import write_gguf
    from mamba_deploy.export.gguf_vocab import find_tokenizer_file, read_vocab

    folder = tiny_folder("mamba")
    model = load_model(folder, dtype=torch.float32)
    vocab = read_vocab(find_tokenizer_file(None, folder), model.config.padded_vocab_size, {"bos": 0, "eos": 0})
    write_gguf(model, dataclasses.replace(vocab, add_bos=True), tmp_path / "bos.gguf", FT.ALL_F32, QT.F32)
    text = "the quick brown fox"
    bare = Tokenizer.from_file(str(tiny_tokenizer / "tokenizer.json")).encode(text).ids
    with open_llama(tmp_path / "bos.gguf") as r:
        assert r.tokenizer.encode(text) == [0] + bare  # the GGUF's BOS, as llama.cpp adds it
        assert r.tokenizer.encode(text, add_special_tokens=False) == bare


def test_bf16_outtype_stores_bfloat16_matrices(tiny_folder, hf_checkpoint, tmp_path):
    """bf16 means BF16 tensors (not F16, which llama.cpp also runs, a little differently rounded):
    each matrix is transformers' weight rounded by torch to bfloat16."""
    _, hf = hf_checkpoint("mamba")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(tiny_folder("mamba"), tmp_path / "b.gguf", outtype="bf16")
    t = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}["blk.0.ssm_in.weight"]
    assert gguf.GGMLQuantizationType(t.tensor_type) == gguf.GGMLQuantizationType.BF16
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert torch.equal(got, hf.backbone.layers[0].mixer.in_proj.weight.detach().bfloat16().float())


def test_failed_llamacpp_quantizer_leaves_no_output(tiny_folder, tmp_path, monkeypatch):
    """llama.cpp returning an error after writing part of its file is a failure, not a GGUF."""
    from mamba_deploy.errors import ExportError

    def broken(src, dst, params):
        Path(dst.decode()).write_bytes(b"GGUF partial")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match="return code 1"):
            export_gguf(tiny_folder("mamba"), tmp_path / "k.gguf", outtype="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_dangling_modelfile_symlink_is_not_replaced(tiny_folder, tmp_path):
    """A Modelfile that is a link to a missing file is still someone's: --ollama refuses it."""
    from mamba_deploy.errors import OutputPathError

    link = tmp_path / "Modelfile"
    link.symlink_to(tmp_path / "elsewhere" / "Modelfile")
    with pytest.raises(OutputPathError, match="Modelfile"):
        export_gguf(tiny_folder("mamba"), tmp_path / "m.gguf", ollama=True)
    assert link.is_symlink() and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_file_type_names_the_type_of_the_matrices(outtype, tiny_folder, tmp_path):
    """general.file_type (llama.cpp's model description, its quantizer's default) must be the
    type the matrices are really stored in, as GGUFReader reads them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_gguf(tiny_folder("mamba"), tmp_path / "m.gguf", outtype=outtype)
    r = gguf.GGUFReader(str(out))
    ftype = gguf.LlamaFileType(int(r.get_field("general.file_type").contents()))
    stored = gguf.GGMLQuantizationType({t.name: t for t in r.tensors}["blk.0.ssm_in.weight"].tensor_type)
    assert ftype.name == "MOSTLY_" + stored.name


@pytest.mark.parametrize("post_processor_bos", [False, True])
def test_gguf_add_bos_follows_what_the_tokenizer_does_on_every_backend(post_processor_bos, tmp_path):
    """tokenizer.ggml.add_bos_token came from tokenizer_config.json's add_bos_token, which the
    tokenizer.json tokenizer (ours, transformers' generic one) does not follow: llama.cpp then
    added a BOS the checkpoint, the GGUF's torch backend and its ONNX export did not, and gave
    other tokens. It now follows the tokenizer's own post-processor, and a GGUF asking for a BOS
    gets one from the tokenizer.json rebuilt from it too. Reference: transformers on the folder."""
    import json

    transformers = pytest.importorskip("transformers")
    from mamba_deploy.runners import open_runner

    folder = tmp_path / "m"
    shutil.copytree(REPO / "models" / "demo-mamba2", folder)
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tcfg, "add_bos_token": not post_processor_bos}))
    if post_processor_bos:  # the BOS prepended by tokenizer.json itself, as Llama-style ones do
        tj = json.loads((folder / "tokenizer.json").read_text())
        tj["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>",
                                "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [
                                {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                                     "tokens": ["<|endoftext|>"]}}}
        (folder / "tokenizer.json").write_text(json.dumps(tj))
    text = "def main(x):\n    return x"
    want = transformers.AutoTokenizer.from_pretrained(str(folder))(text).input_ids
    assert (want[0] == 0) == post_processor_bos
    (tmp_path / "g").mkdir()
    out = export_gguf(folder, tmp_path / "g" / "m.gguf")  # alone: the GGUF's own vocabulary everywhere
    assert bool(gguf.GGUFReader(str(out)).get_field("tokenizer.ggml.add_bos_token").contents()) == post_processor_bos
    with open_llama(out) as r:
        assert r.tokenizer.encode(text) == want
    assert open_runner(out, "torch").tokenizer.encode(text) == want
    assert open_runner(folder, "torch").tokenizer.encode(text) == want
