"""The Runner contract on every CPU backend (torch, onnx, openvino, llama.cpp): a closed runner
refuses work with a typed error (a freed llama.cpp context used to crash the process), masks
must be 0/1 left padding, padding needs a fresh state (or, on llama.cpp, is dropped), and
`to_torch_state` is a snapshot. References: transformers' model on the same checkpoint, or
the same backend fed the unpadded rows."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import finish_gguf, rel_err

from mamba_deploy.errors import RunnerClosedError, ShapeError
from mamba_deploy.runners import open_runner

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
BACKENDS = ["torch", "onnx", "openvino", "llama.cpp"]
NEEDS = {"onnx": "onnxruntime", "openvino": "openvino", "llama.cpp": "llama_cpp"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return export_artifacts(tmp_path_factory.mktemp("runners"))


def export_artifacts(tmp: Path) -> dict:
    """backend -> path of the shipped demo Mamba2 model (it has a tokenizer, which GGUF needs) in
    that backend's format, exported under `tmp`."""
    paths = {"torch": DEMO}
    try:
        from mamba_deploy.export.onnx import export_onnx

        paths["onnx"] = paths["openvino"] = export_onnx(DEMO, tmp / "onnx")
    except ImportError:
        pass
    try:
        from mamba_deploy.export.gguf import export_gguf

        paths["llama.cpp"] = export_gguf(DEMO, tmp / "m.gguf", outtype="f32")
    except ImportError:
        pass
    return paths


def _open(artifacts, backend):
    if backend in NEEDS:
        pytest.importorskip(NEEDS[backend])
    return open_runner(artifacts[backend], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_runner_refuses_work_with_a_typed_error(artifacts, backend):
    r = _open(artifacts, backend)
    st = r.new_state(1)
    r.prefill(torch.tensor([[3, 4]]), st)
    r.close()
    r.close()  # twice is fine
    for call in (lambda: r.new_state(1), lambda: r.prefill(torch.tensor([[3, 4]]), st),
                 lambda: r.step(torch.tensor([5]), st), lambda: r.to_torch_state(st)):
        with pytest.raises(RunnerClosedError, match=f"the {r.name} runner is closed"):
            call()


def test_llamacpp_tokenizer_outlives_its_runner_and_refuses_after_close(artifacts):
    pytest.importorskip("llama_cpp")
    r = open_runner(artifacts["llama.cpp"], "llama.cpp")
    text = "hello world"
    ids = r.tokenizer.encode(text)
    tok = open_runner(artifacts["llama.cpp"], "llama.cpp").tokenizer  # its runner is garbage now
    gc.collect()
    assert tok.encode(text) == ids and tok.decode(ids) == r.tokenizer.decode(ids)  # crashed before
    kept = r.tokenizer
    r.close()
    with pytest.raises(RunnerClosedError, match="closed"):
        kept.encode(text)
    cyclic = open_runner(artifacts["llama.cpp"], "llama.cpp")
    cyclic.me, tok = cyclic, cyclic.tokenizer  # collected by the cycle GC, in any finalizer order
    del cyclic
    gc.collect()
    assert tok.encode(text) == ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask,match", [
    ([[1, 1, 0], [1, 1, 1]], "row 0 is \\[1, 1, 0\\].*left padding"),  # right padding
    ([[0, 1, 0], [1, 1, 1]], "row 0 .*left padding"),  # a hole
    ([[2, 2, 2], [1, 1, 1]], "0 \\(padding\\) and 1 \\(token\\)"),
    ([[0.5, 1, 1], [1, 1, 1]], "0 \\(padding\\) and 1 \\(token\\)"),
])
def test_masks_must_be_left_padding_of_zeros_and_ones(artifacts, backend, mask, match):
    r = _open(artifacts, backend)
    with pytest.raises(ShapeError, match=match):
        r.prefill(torch.tensor([[3, 4, 5], [6, 7, 8]]), r.new_state(2), attention_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_as_list_numpy_or_tensor_gives_the_unpadded_rows_logits(artifacts, backend):
    """Left-padded rows end with the logits of the same row alone, whatever type the mask has."""
    r = _open(artifacts, backend)
    ids = torch.tensor([[0, 0, 9, 4], [3, 4, 5, 6]])
    mask = [[0, 0, 1, 1], [1, 1, 1, 1]]
    alone, _ = r.prefill(torch.tensor([[9, 4]]), r.new_state(1), last_only=True)
    for m in (mask, np.array(mask, np.int32), torch.tensor(mask, dtype=torch.bool)):
        got, _ = r.prefill(ids, r.new_state(2), attention_mask=m, last_only=True)
        assert rel_err(got[0], alone[0]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
def test_padding_a_state_that_holds_tokens_is_refused(artifacts, backend):
    """The padding would decay the state and enter its conv window (1.77 max-abs logit error
    before): a typed error that says how to continue instead."""
    r = _open(artifacts, backend)
    st = r.new_state(2)
    r.prefill(torch.tensor([[3, 4, 5], [6, 7, 8]]), st)
    with pytest.raises(ShapeError, match=r"pads rows \[0\] of a state that already holds tokens"):
        r.prefill(torch.tensor([[0, 9], [10, 11]]), st, attention_mask=[[0, 1], [1, 1]])
    r.prefill(torch.tensor([[9], [10]]), st)  # equal-length rows continue as before


@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino"])
def test_padding_check_reads_the_live_state_without_a_copy(artifacts, backend, monkeypatch):
    """The check ran to_torch_state (a host copy of the whole state: 1.2 s instead of 45 ms for a
    batch-8 prefill of a 2.7b model on an H200); it reads the state where it lives."""
    r = _open(artifacts, backend)
    monkeypatch.setattr(r, "to_torch_state", lambda st: pytest.fail("copied the state"))
    got, _ = r.prefill(torch.tensor([[0, 9, 4], [3, 9, 4]]), r.new_state(2), attention_mask=[[0, 1, 1], [1, 1, 1]])
    assert torch.isfinite(got).all()


def test_quantized_state_runner_follows_the_mask_rules():
    from mamba_deploy import load_model
    from mamba_deploy.quant.state_cache import QuantizedStateRunner

    r = QuantizedStateRunner(load_model(DEMO), "int8")
    ids, mask = torch.tensor([[0, 9, 4], [3, 9, 4]]), [[0, 1, 1], [1, 1, 1]]
    want, _ = r.prefill(ids, r.new_state(2), attention_mask=torch.tensor(mask))
    got, st = r.prefill(ids, r.new_state(2), attention_mask=mask)  # a list: AttributeError before
    assert torch.equal(got, want)
    with pytest.raises(ShapeError, match="left padding"):
        r.prefill(ids, r.new_state(2), attention_mask=[[1, 0, 1], [1, 1, 1]])
    with pytest.raises(ShapeError, match="already holds tokens"):
        r.prefill(ids, st, attention_mask=mask)


def test_llamacpp_drops_padding_so_a_padded_continuation_is_exact(artifacts):
    pytest.importorskip("llama_cpp")
    r = open_runner(artifacts["llama.cpp"], "llama.cpp")
    a, b = r.new_state(2), r.new_state(1)
    r.prefill(torch.tensor([[3, 4, 5], [6, 7, 8]]), a)
    r.prefill(torch.tensor([[3, 4, 5]]), b)
    got, _ = r.prefill(torch.tensor([[0, 9], [10, 11]]), a, attention_mask=[[0, 1], [1, 1]], last_only=True)
    want, _ = r.prefill(torch.tensor([[9]]), b, last_only=True)
    assert rel_err(got[0], want[0]) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_torch_state_is_a_snapshot(artifacts, backend):
    r = _open(artifacts, backend)
    st = r.new_state(1)
    r.prefill(torch.tensor([[3, 4, 5]]), st)
    snap = r.to_torch_state(st)
    before = (snap.conv.clone(), snap.ssm.clone())
    r.step(torch.tensor([6]), st)
    assert torch.equal(snap.conv, before[0]) and torch.equal(snap.ssm, before[1])
    assert not torch.equal(r.to_torch_state(st).ssm, before[1])


def test_llamacpp_streamed_text_equals_the_final_text(artifacts):
    """llama_detokenize cleans up spaces ("it '" + "s" -> "it's", " ' " -> "'"), revising text a
    stream had already shown, so the stream dropped characters ("it ' fine", "a  b."). Decoding
    now joins token pieces, as llama.cpp's CLI streams them. References: the `tokenizers` library
    on the model's tokenizer.json, and the stream equals the final text."""
    pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    from mamba_deploy.generation import TextStream

    tok = open_runner(artifacts["llama.cpp"], "llama.cpp").tokenizer
    ref = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    texts = ["it 's fine", "a , b . c ! d ?", "I 'm here , we 're sure you 've", "do n't ' x ' y", "plain words only"]
    seqs = [tok.encode(t) for t in texts]
    g = torch.Generator().manual_seed(0)
    pieces = [tok.encode(p) for p in (" '", "s", " ,", " .", "m", " n't", "re", "ve", " a", " the", " !", " ?", "\n")]
    for _ in range(300):  # random mixes of the pieces the clean-up rules act on
        seqs.append([t for i in torch.randint(0, len(pieces), (12,), generator=g).tolist() for t in pieces[i]])
    for ids in seqs:
        ts = TextStream(tok)
        streamed = "".join(ts.push(t) for t in ids) + ts.finish()
        assert streamed == tok.decode(ids) == ref.decode(ids), ids


def _spm_gguf(src: Path, dst: Path) -> Path:
    """`src` with its vocabulary replaced by a small SentencePiece-style one ("llama" model, "▁"
    word starts, byte fallback, add_space_prefix), as llama.cpp's converter writes for
    Mamba-Codestral."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType

    rd = GGUFReader(str(src))
    arch = rd.fields["general.architecture"]
    w = GGUFWriter(str(dst), bytes(arch.parts[arch.data[0]]).decode())
    for k, f in rd.fields.items():
        if k.startswith(("GGUF.", "tokenizer.")) or k == "general.architecture" or f.types[0] == GGUFValueType.ARRAY:
            continue
        value = bytes(f.parts[f.data[0]]).decode() if f.types[0] == GGUFValueType.STRING else f.parts[f.data[0]][0]
        w.add_key_value(k, value, f.types[0])
    words = ["▁Hello", "▁world", "▁it", "'s", "▁"]
    toks = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * 5
    n = len(rd.fields["tokenizer.ggml.tokens"].data)  # the embedding's rows
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    toks += [f"[PAD{i}]" for i in range(len(toks), n)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_types([int(t) for t in types] + [int(TokenType.UNUSED)] * (n - len(types)))
    w.add_token_scores(scores + [-1e9] * (n - len(scores)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(True)
    for t in rd.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    finish_gguf(w)
    return dst


def test_llamacpp_sentencepiece_vocab_decodes_without_a_leading_space(artifacts, tmp_path):
    """Joining pieces of a SentencePiece vocabulary starts the text with the first word's space;
    decode drops it, as sentencepiece (and llama_detokenize) do: the text round-trips."""
    pytest.importorskip("llama_cpp")
    from mamba_deploy.generation import TextStream

    tok = open_runner(_spm_gguf(Path(artifacts["llama.cpp"]), tmp_path / "spm.gguf"), "llama.cpp").tokenizer
    for text in ["Hello world", "héllo 日本", "it's Hello"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        ts = TextStream(tok)
        assert "".join(ts.push(t) for t in ids) + ts.finish() == text


@pytest.mark.parametrize("backend", ["torch", "quantized-state"])
def test_padded_prefill_with_a_state_of_another_batch_is_a_shape_error(artifacts, backend):
    if backend == "torch":
        r = open_runner(artifacts["torch"], "torch")
    else:
        from mamba_deploy import load_model
        from mamba_deploy.quant.state_cache import QuantizedStateRunner

        r = QuantizedStateRunner(load_model(DEMO), "int8")
    with pytest.raises(ShapeError, match="batch 2"):  # an IndexError from the padding check before
        r.prefill(torch.tensor([[3, 4, 5], [6, 7, 8]]), r.new_state(1), attention_mask=[[1, 1, 1], [0, 1, 1]])
