"""generate(prefill_chunk=N): prompts fed N positions at a time, on every CPU backend.

The reference is transformers, run on each prompt alone (no padding, one call). The batch's
prompts have lengths 3, 20 and 11, so with pieces of 4 or 7 the short row's padding outlasts
several pieces (it goes through them all-masked, and the next piece still pads it), and pieces
end inside the other rows' tokens. Tolerance: fp32, 1e-4 relative on the last logits (measured
~1e-7..5e-7), and the greedy continuations equal.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from mamba_deploy.errors import ConfigError
from mamba_deploy.generation import generate, left_pad, prefill_in_chunks
from mamba_deploy.runners import open_runner

LENGTHS = (3, 20, 11)
NEW = 5
KINDS = ["mamba", "mamba2", "mamba2_g2"]
NEEDS = {"onnx": "onnxruntime", "openvino": "openvino", "llama.cpp": "llama_cpp"}


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def artifact(hf_checkpoint, onnx_export, ckpt, tmp_path_factory):
    """(backend, kind) -> (path for open_runner, transformers model)."""
    def make(backend, kind):
        if backend in NEEDS:
            pytest.importorskip(NEEDS[backend])
        if backend == "torch":
            return hf_checkpoint(kind)
        if backend in ("onnx", "openvino"):
            out, _, hf = onnx_export(kind)
            return out, hf
        from mamba_deploy.export.gguf import export_gguf

        src, hf = ckpt(kind)
        return export_gguf(src, tmp_path_factory.mktemp(f"chunks_{kind}") / "m.gguf", outtype="f32"), hf
    return make


def _reference(hf, prompts):
    """transformers, each prompt alone: (last logits (b, V), greedy continuations)."""
    last, cont = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            last.append(hf(ids).logits[0, -1])
            out = hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
            cont.append(out[0, len(p):].tolist())
    return torch.stack(last), cont


@pytest.mark.parametrize("chunk", [4, 7])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "onnx", "openvino", "llama.cpp"])
def test_chunked_prefill_matches_transformers_on_each_prompt_alone(artifact, backend, kind, chunk):
    path, hf = artifact(backend, kind)
    prompts = _prompts(hf.config.vocab_size)
    ref_last, ref_cont = _reference(hf, prompts)
    with open_runner(path, backend) as r:
        ids, mask = left_pad(prompts)
        seen = []
        last, _ = prefill_in_chunks(r, ids, mask, r.new_state(len(prompts)), chunk, lambda d, t: seen.append((d, t)))
        assert rel_err(last, ref_last) < 1e-4
        total = max(LENGTHS)
        assert seen == [(min(e, total), total) for e in range(chunk, total + chunk, chunk)]
        res = generate(r, prompts, max_new_tokens=NEW, stop_token_ids=[], prefill_chunk=chunk)
    assert res.tokens == ref_cont


def test_a_chunk_longer_than_the_prompts_is_one_call(hf_checkpoint):
    folder, hf = hf_checkpoint("mamba2")
    prompts = _prompts(hf.config.vocab_size)
    calls = []
    with open_runner(folder, "torch") as r:
        real = r.prefill
        r.prefill = lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw)
        ids, mask = left_pad(prompts)
        prefill_in_chunks(r, ids, mask, r.new_state(3), 64)
        prefill_in_chunks(r, ids, mask, r.new_state(3), None)
    assert calls == [(3, max(LENGTHS))] * 2


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_prefill_chunk_is_a_config_error_before_any_work(hf_checkpoint, bad):
    folder, _ = hf_checkpoint("mamba")
    with open_runner(folder, "torch") as r:
        r.prefill = None  # the check comes first: a call would fail differently
        with pytest.raises(ConfigError, match=f"prefill_chunk must be an int >= 1.*got {bad!r}"):
            generate(r, [[1, 2, 3]], max_new_tokens=1, prefill_chunk=bad)


def test_on_prefill_can_abandon_the_request(hf_checkpoint):
    """A callback that raises stops the prefill after that piece (the server's gone-client check)."""
    folder, _ = hf_checkpoint("mamba")

    class Gone(Exception):
        pass

    calls = []
    with open_runner(folder, "torch") as r:
        real = r.prefill
        r.prefill = lambda *a, **kw: calls.append(1) or real(*a, **kw)

        def leave(done, total):
            if done >= 8:
                raise Gone

        with pytest.raises(Gone):
            generate(r, [list(range(1, 30))], max_new_tokens=4, prefill_chunk=4, on_prefill=leave)
    assert len(calls) == 2
