"""`mamba-deploy verify REFERENCE ARTIFACT`: does an artifact compute what its checkpoint does?

Both sides are driven only through the Runner interface, so every backend gets verification:
the reference (PyTorch float32 or float64) and the artifact see the same random batches
(prefill, then N decode steps teacher-forced with the reference's greedy tokens) and one longer
sequence (a text, or the reference's own sampled continuation of a random prompt) scored for
perplexity. Each check compares a metric to a tolerance picked from the table below by the
artifact's dtype / quantization, which is read from the artifact itself.
"""

from __future__ import annotations

import math
import os
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .argtypes import backend_choice, int_list, is_seed, nonnegative_int, positive_int, seed, torch_generator
from .atomic import prepare_output_file, read_json_object, refuse_input_file, write_json
from .data import read_text_file
from .errors import BeyondToleranceError, ConfigError, MambaDeployError, VerificationError
from .eval import ppl_of
from .export.onnx_meta import MANIFEST_FILE
from .generation import prefill_pieces
from .inputs import check_fits, first_out_of_vocab, token_stream
from .pathnames import is_gguf
from .state import State
from .tolerances import (BITS_TO_ROW, LABEL_ALIASES, TOLERANCES, Tolerance,  # noqa: F401 (verify's names)
                         dtype_label, looser_label, make_tolerance, parse_overrides, tolerance_row)

DEFAULT_LENGTHS = (1, 7, 257, 1000)
DEFAULT_BATCHES = (1, 3)
DEFAULT_DECODE_STEPS = 8
PPL_PROMPT, PPL_CONTINUATION = 16, 64  # random prompt + reference-sampled tokens when no text
SEQ_CHUNK = 512  # long sequences are fed in chunks, carrying the state (bounded memory)
DIFF_ROWS = 256  # logits compared this many positions at a time in float64 (bounded memory)


class _NotRun:
    """What the CLI's reference pass (verify_replay.StandIn) answers in place of an artifact:
    nothing is compared with it, so that pass spends no time or memory on comparisons. A real
    runner cannot return this object, so its answers are always compared."""

    def __repr__(self) -> str:
        return "NOT_RUN"


NOT_RUN = _NotRun()


# ----------------------------------------------------------------------------- artifact type

def infer_artifact_dtype(path, reference=None) -> str:
    """The artifact's weight precision / quantization label, read from the artifact; 'fp32' when
    nothing says otherwise. ONNX: manifest.json "source_weights" / "quantization" / "dtype"; GGUF:
    general.file_type (`weights_label`); checkpoints: config.json source_weights (`convert` of a
    quantized GGUF), quantization_config, else the stored float dtype (`stored_dtype`).
    The recorded source rounding counts unless `reference` (a path) records the same one: then the
    reference holds those very weights, and only the artifact's own type differs from it."""
    path, reference = as_opened(path), as_opened(reference)
    own, recorded = artifact_labels(path)
    same = _same_codes_row(path, reference)
    if same is not None:
        return same
    if recorded and reference is not None and _recorded_or_none(reference) == recorded:
        return own
    return looser_label(own, recorded)


def _same_codes_row(path, reference) -> str | None:
    """The row for a quantized ONNX export checked against the checkpoint it was exported from (its
    manifest's codes_sha256 is the folder's codes_digest): both hold the same codes, so only the
    graph's compute differs (ORT's activation rounding at its accuracy level; W8A8's per-token
    rounding, which the graph leaves out, counts as int8). Else None: the weights' own row then.
    A quantized checkpoint against its export was held to the int4 row, which let an export with
    one layer's scales x1.5 pass (0.21 against the export's 0.026)."""
    if not isinstance(reference, (str, os.PathLike)) or not isinstance(path, (str, os.PathLike)):
        return None
    p, ref = Path(str(path)), Path(str(reference))
    q = read_json_object((p if p.is_dir() else p.parent) / MANIFEST_FILE).get("quantization")
    if not (isinstance(q, dict) and isinstance(q.get("codes_sha256"), str) and ref.is_dir()
            and isinstance(read_json_object(ref / "config.json").get("quantization_config"), dict)):
        return None
    from .quant.formats import folder_codes_digest
    from .quant.onnx_nbits import LEVEL_ROW

    if folder_codes_digest(ref) != q["codes_sha256"]:
        return None
    row = LEVEL_ROW.get(q.get("accuracy_level"), "int8")
    return looser_label(row, "int8" if "w8a8" in (q.get("formats") or []) else None)


def _recorded_or_none(reference):
    """The rounding the reference's weights carry: a folder's recorded source type, or a GGUF's own
    type (its dequantized weights are what the torch reference runs), else None."""
    try:  # a hub id or a loaded model records nothing here
        if not isinstance(reference, (str, os.PathLike)):
            return None
        own, recorded = artifact_labels(reference)
        p = Path(str(reference))
        return looser_label(own, recorded) if is_gguf(p) and p.is_file() else recorded
    except (MambaDeployError, OSError):
        return None


def artifact_labels(path) -> tuple[str, str | None]:
    """(the artifact's own weight type, the rounding it records for its source weights or None)."""
    p = Path(str(path))
    if is_gguf(p) and p.is_file():
        from .export.gguf_import import weights_labels

        return weights_labels(p)
    from .export.tensorrt import engine_file, sidecar_path

    if engine_file(p).is_file():  # an engine folder, as open_runner takes it
        p = engine_file(p)
    if p.suffix in (".engine", ".plan") and p.is_file():  # TensorRT: its sidecar holds the ONNX manifest and the build
        sidecar = read_json_object(sidecar_path(p))
        manifest, build = sidecar.get("manifest"), sidecar.get("build")
        own, recorded = _manifest_labels(manifest if isinstance(manifest, dict) else {}) or ("fp32", None)
        if isinstance(build, dict) and build.get("fp16") is True and own == "fp32":
            own = "fp16"  # built with BuilderFlag.FP16 from an fp32 graph: TensorRT rounds to fp16
        return own, recorded
    folder = p if p.is_dir() else p.parent
    labels = _manifest_labels(read_json_object(folder / MANIFEST_FILE))
    if labels is not None:
        return labels
    from .checkpoint import recorded_source_weights, stored_dtype

    cfg = read_json_object(folder / "config.json")
    if isinstance(cfg.get("quantization_config"), dict):
        own = _quant_label(cfg["quantization_config"])
    else:
        own = dtype_label(stored_dtype(folder))
    return own, recorded_source_weights(folder, cfg)  # `convert` (or quantize) of a quantized GGUF


def _manifest_labels(manifest: dict) -> tuple[str, str | None] | None:
    """artifact_labels of an ONNX export's manifest.json, or None when it says nothing."""
    sw = manifest.get("source_weights")  # an export of a quantized GGUF (or of a checkpoint quantized from one)
    recorded = sw.lower() if isinstance(sw, str) and sw.lower() not in ("", "none") else None
    if isinstance(manifest.get("quantization"), dict):  # quant.onnx_nbits: {"method": ..., ...}
        return _quant_label(manifest["quantization"]), recorded
    for key in ("quantization", "dtype"):
        if isinstance(manifest.get(key), str) and manifest[key].lower() not in ("", "none"):
            return manifest[key].lower(), recorded
    return ("fp32", recorded) if recorded else None


def _quant_label(qc: dict) -> str:
    from .quant.plan import module_formats

    fmts = module_formats(qc)  # this toolkit's mixed precision: the lowest-precision format stored decides
    if isinstance(qc.get("formats"), list):  # an ONNX export's manifest: the formats alone
        fmts |= {str(f).lower() for f in qc["formats"]}
    for f in ("int4", "fp8", "int8", "w8a8", "fp16"):  # loosest row first
        if f in fmts:
            return f
    for key in ("method", "quant_method", "format", "quant_type", "weight_dtype"):
        v = str(qc.get(key, "")).lower()
        if v in LABEL_ALIASES or v in TOLERANCES:
            return v
    for key in ("bits", "weight_bits", "w_bit", "nbits"):
        if isinstance(qc.get(key), int) and qc[key] in BITS_TO_ROW:
            return BITS_TO_ROW[qc[key]]
    if qc.get("load_in_4bit"):
        return "int4"
    return "int8" if qc.get("load_in_8bit") else "fp32"


# ----------------------------------------------------------------------------- comparing

class _Diff:
    """Running logits comparison: max / mean |error|, max |reference|, top-1 agreement."""

    def __init__(self):
        self.max_abs, self.sum_abs, self.count, self.ref_max = 0.0, 0.0, 0, 0.0
        self.agree, self.positions = 0, 0

    def add(self, ref: torch.Tensor, art: torch.Tensor, vocab: int) -> "_Diff":
        if art is NOT_RUN:
            return self
        if not torch.is_tensor(art):
            raise VerificationError(f"artifact returned {type(art).__name__} where the reference has logits "
                                    f"{tuple(ref.shape)}; the artifact's runner breaks the Runner contract")
        if ref.shape[:-1] != art.shape[:-1] or min(ref.shape[-1], art.shape[-1]) < vocab:
            raise VerificationError(
                f"artifact returned logits of shape {tuple(art.shape)} where the reference has "
                f"{tuple(ref.shape)} (vocab {vocab}); the artifact's runner breaks the Runner contract")
        # columns past the true vocab only pad the embedding; backends may drop or zero them
        ref, art = ref[..., :vocab].reshape(-1, vocab), art[..., :vocab].reshape(-1, vocab)
        for i in range(0, ref.shape[0], DIFF_ROWS):
            self._add_rows(ref[i:i + DIFF_ROWS].double(), art[i:i + DIFF_ROWS].double())
        return self

    def _add_rows(self, ref: torch.Tensor, art: torch.Tensor) -> None:
        err = (art - ref).abs()
        worst = _nanmax(err)  # Python's max() would silently drop a NaN, so keep it explicitly
        self.max_abs = worst if math.isnan(worst) or math.isnan(self.max_abs) else max(self.max_abs, worst)
        self.sum_abs += float(err.sum())
        self.count += err.numel()
        self.ref_max = max(self.ref_max, float(ref.abs().max()))
        self.agree += int((ref.argmax(-1) == art.argmax(-1)).sum())
        self.positions += ref.shape[0]

    def result(self) -> dict:
        if not self.count:
            return {}
        return dict(positions=self.positions, max_abs=self.max_abs, mean_abs=self.sum_abs / self.count,
                    rel=self.max_abs / max(self.ref_max, 1e-30), top1=self.agree / self.positions)


def _nanmax(t: torch.Tensor) -> float:
    return math.nan if bool(torch.isnan(t).any()) else float(t.max())


def _state_error(ref, art, ref_state, art_state):
    """{'conv': rel, 'ssm': rel, 'rel': worst} or None when the artifact hides its state.
    ref_state: the reference's state, or a list of batch-1 states, one per row of art_state."""
    try:
        a = art.to_torch_state(art_state)
    except NotImplementedError:
        return None
    if isinstance(ref_state, list):  # rows the reference ran one at a time (_run_padded_case)
        rows = [ref.to_torch_state(s) for s in ref_state]
        r = State(torch.cat([s.conv.cpu() for s in rows], 1), torch.cat([s.ssm.cpu() for s in rows], 1))
    else:
        r = ref.to_torch_state(ref_state)
    if a is NOT_RUN:
        return None
    out = {}
    for kind in ("conv", "ssm"):
        # on the CPU: a reference state read back from verify's recording is there, the artifact's may be on a GPU
        rt, at = getattr(r, kind).to("cpu", torch.float64), getattr(a, kind).to("cpu", torch.float64)
        if at.numel() != rt.numel():
            raise VerificationError(f"artifact {kind} state has shape {tuple(at.shape)}, reference "
                                    f"{tuple(rt.shape)}; its runner's to_torch_state is wrong")
        if not rt.numel():  # d_conv 1: a model without a conv state
            out[kind] = 0.0
            continue
        out[kind] = _nanmax((at.reshape(rt.shape) - rt).abs()) / max(float(rt.abs().max()), 1e-30)
    out["rel"] = max(out["conv"], out["ssm"]) if not math.isnan(out["conv"] + out["ssm"]) else math.nan
    return out


# What fixes a model's shapes: two configs that differ here cannot hold the same weights, so any
# later difference would be blamed on the artifact's runner instead of on the pairing. Numeric
# details an export may legitimately round or drop (eps, token ids, chunk size) are left out.
# Config attribute -> its name in messages.
MODEL_FIELDS = {"arch": "arch", "vocab_size": "vocabulary", "d_model": "d_model", "n_layer": "n_layer",
                "d_state": "d_state", "d_conv": "d_conv", "d_inner": "d_inner"}
ARCH_FIELDS = {"mamba1": {"resolved_dt_rank": "dt_rank"},
               "mamba2": {"headdim": "headdim", "nheads": "nheads", "ngroups": "ngroups"}}


def _check_same_model(ref, art) -> None:
    """VerificationError naming every differing config field when the two runners' models differ."""
    rc, ac = getattr(ref, "config", None), getattr(art, "config", None)
    if rc is None or ac is None:
        return
    names = {**MODEL_FIELDS, **(ARCH_FIELDS.get(rc.arch, {}) if rc.arch == ac.arch else {})}
    diff = {attr: label for attr, label in names.items() if getattr(rc, attr) != getattr(ac, attr)}
    if diff:
        mine = ", ".join(f"{label} {getattr(ac, attr)}" for attr, label in diff.items())
        theirs = ", ".join(f"{label} {getattr(rc, attr)}" for attr, label in diff.items())
        raise VerificationError(
            f"{_where(art)} is not the same model as {_where(ref)}: the artifact has {mine} where the reference "
            f"has {theirs}; verify an artifact against the checkpoint it was exported or quantized from")


def _check_artifact_config(ref, config, artifact, backend: str) -> None:
    """_check_same_model against the config read from the artifact's files (runners.preflight;
    None: nothing to compare yet), before the artifact is opened."""
    if config is not None:
        _check_same_model(ref, SimpleNamespace(config=config, artifact_path=Path(str(artifact)), name=backend))


def _run_case(ref, art, ids: torch.Tensor, decode_steps: int, vocab: int) -> dict:
    """Prefill `ids` on both sides, then decode teacher-forced with the reference's greedy tokens."""
    b, length = ids.shape
    rs, as_ = ref.new_state(b), art.new_state(b)
    rl, rs = ref.prefill(ids, rs)
    al, as_ = art.prefill(ids, as_)
    case = dict(length=length, batch=b, prefill=_Diff().add(rl, al, vocab).result(),
                state_after_prefill=_state_error(ref, art, rs, as_))
    nxt, decode = rl[:, -1, :vocab].argmax(-1), _Diff()
    for _ in range(decode_steps):
        rl, rs = ref.step(nxt, rs)
        al, as_ = art.step(nxt, as_)
        decode.add(rl, al, vocab)
        nxt = rl[:, :vocab].argmax(-1)
    case["decode"] = decode.result()
    case["state_after_decode"] = _state_error(ref, art, rs, as_) if decode_steps else None
    return case


def padded_lengths(length: int, b: int) -> list[int]:
    """Row lengths of the left-padded case: row 0 full, each next row shorter (at least 1 token)."""
    step = max(1, length // (b + 1))
    return [max(1, length - i * step) for i in range(b)]


def _run_padded_case(ref, art, ids: torch.Tensor, decode_steps: int, vocab: int) -> dict:
    """Rows of different lengths, left-padded into one batch as generate and the server send them:
    the artifact prefills the batch in one call with its attention_mask, the reference each row
    alone and unpadded, so the artifact's masking is what is checked. Only real positions are
    compared (logits at padding are unspecified, Runner.prefill); decoding goes on as one batch
    on the artifact and row by row on the reference."""
    b, length = ids.shape
    lens = padded_lengths(length, b)
    mask = (torch.arange(length) >= torch.tensor([length - n for n in lens])[:, None]).long()  # (b, l)
    pieces = list(prefill_pieces(art, ids * mask, mask, art.new_state(b), last_only=False))  # (TensorRT's cap)
    as_ = pieces[-1][2]
    al = NOT_RUN if any(lg is NOT_RUN for _, lg, _ in pieces) else torch.cat([lg for _, lg, _ in pieces], 1)
    prefill, rows = _Diff(), []  # rows: [next token (1,), state] per row
    for i, n in enumerate(lens):
        rl, rs = ref.prefill(ids[i:i + 1, length - n:], ref.new_state(1))
        prefill.add(rl, al if al is NOT_RUN else al[i:i + 1, length - n:], vocab)
        rows.append([rl[:, -1, :vocab].argmax(-1), rs])
    case = dict(length=length, batch=b, left_padded=lens, prefill=prefill.result(),
                state_after_prefill=_state_error(ref, art, [rs for _, rs in rows], as_))
    decode = _Diff()
    for _ in range(decode_steps):
        al, as_ = art.step(torch.cat([t for t, _ in rows]), as_)
        ref_logits = []
        for row in rows:
            rl, row[1] = ref.step(row[0], row[1])
            row[0] = rl[:, :vocab].argmax(-1)
            ref_logits.append(rl)
        decode.add(torch.cat(ref_logits), al, vocab)
    case["decode"] = decode.result()
    case["state_after_decode"] = _state_error(ref, art, [rs for _, rs in rows], as_) if decode_steps else None
    return case


def _sample_continuation(ref, prompt: torch.Tensor, n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """The reference's own sampled continuation (temperature 1): text the model finds likely, so
    its perplexity means something even without a text file."""
    state = ref.new_state(1)
    logits, state = ref.prefill(prompt, state, last_only=True)
    logits, out = logits[:, -1], []
    for i in range(n):
        tok = torch.multinomial(torch.softmax(logits[:, :vocab].double(), -1), 1, generator=gen)[:, 0]
        out.append(tok)
        if i < n - 1:
            logits, state = ref.step(tok, state)
    return torch.cat([prompt, torch.stack(out, 1)], 1)


def _score_sequence(ref, art, ids: torch.Tensor, start: int, vocab: int) -> dict:
    """Feed one sequence in chunks (state carried) to both sides; compare logits and compute the
    perplexity of tokens[start:] under each."""
    diff, nll, n = _Diff(), {"reference": 0.0, "artifact": 0.0}, 0
    rs, as_ = ref.new_state(1), art.new_state(1)
    length = ids.shape[1]
    for s in range(0, length - 1, SEQ_CHUNK):
        chunk = ids[:, s:min(s + SEQ_CHUNK, length - 1)]
        rl, rs = ref.prefill(chunk, rs)
        al, as_ = art.prefill(chunk, as_)
        diff.add(rl, al, vocab)
        targets = ids[0, s + 1:s + 1 + chunk.shape[1]]
        keep = torch.arange(s + 1, s + 1 + chunk.shape[1]) >= start
        for side, logits in (("reference", rl), ("artifact", al)):
            if logits is NOT_RUN:
                continue
            logp = torch.log_softmax(logits[0, :, :vocab].double(), -1)
            nll[side] -= float(logp.gather(-1, targets[:, None])[:, 0][keep].sum())
        n += int(keep.sum())
    ppl = {side: ppl_of(v / n) for side, v in nll.items()}
    return dict(length=length, scored_tokens=n, logits=diff.result(), ppl_reference=ppl["reference"],
                ppl_artifact=ppl["artifact"], ppl_rel=abs(ppl["artifact"] / ppl["reference"] - 1))


# ----------------------------------------------------------------------------- the report

@dataclass
class Check:
    name: str
    value: float
    limit: float
    passed: bool
    where: str  # which case gave the worst value (or what was aggregated)

    def describe(self) -> str:
        op = ">=" if self.name == "top1" else "<="
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name} = {self.value:.3g} (limit {op} {self.limit:.3g}; {self.where}) {verdict}"


@dataclass
class VerifyReport:
    tolerance: Tolerance
    cases: list = field(default_factory=list)
    sequence: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    reference: str = "?"
    artifact: str = "?"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [c.describe() for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return dict(passed=self.passed, reference=self.reference, artifact=self.artifact,
                    tolerance=asdict(self.tolerance), checks=[asdict(c) for c in self.checks],
                    failures=self.failures, cases=self.cases, sequence=self.sequence)

    def table(self) -> str:
        return format_table(self)


def _build_checks(cases: list, seq: dict, tol: Tolerance) -> list:
    """Worst value of each metric over every case, against its tolerance; NaN always fails."""
    logits, states, agree, positions = [], [], 0, 0
    seq = seq if seq and seq["logits"] else {}  # empty when nothing was compared (NOT_RUN)
    for c in cases:
        name = f"length {c['length']} batch {c['batch']}{' left-padded' if c.get('left_padded') else ''}"
        for phase in ("prefill", "decode"):
            if c[phase]:
                logits.append((c[phase]["rel"], f"worst: {phase} {name}"))
                agree += c[phase]["top1"] * c[phase]["positions"]
                positions += c[phase]["positions"]
        for phase in ("state_after_prefill", "state_after_decode"):
            if c[phase] is not None:
                states.append((c[phase]["rel"], f"worst: {phase.replace('_', ' ')}, {name}"))
    if seq:
        logits.append((seq["logits"]["rel"], f"worst: sequence of {seq['length']} ({seq['source']})"))
        agree += seq["logits"]["top1"] * seq["logits"]["positions"]
        positions += seq["logits"]["positions"]

    def worst(items):  # NaN sorts as the worst
        return max(items, key=lambda v: math.inf if math.isnan(v[0]) else v[0])

    checks = []
    if logits:
        v, where = worst(logits)
        checks.append(Check("logits_rel", v, tol.logits_rel, v <= tol.logits_rel, where))
        top1 = agree / positions
        checks.append(Check("top1", top1, tol.top1, top1 >= tol.top1, f"over all {positions} positions"))
    if states:
        v, where = worst(states)
        checks.append(Check("state_rel", v, tol.state_rel, v <= tol.state_rel, where))
    if seq:
        v = seq["ppl_rel"]
        checks.append(Check("ppl_rel", v, tol.ppl_rel, v <= tol.ppl_rel,
                            f"ppl {seq['ppl_artifact']:.4g} vs {seq['ppl_reference']:.4g}"))
    return checks


def format_table(report: VerifyReport) -> str:
    t = report.tolerance
    lines = [f"verify {report.artifact}  vs  reference {report.reference}  ({t.label} tolerances)", "",
             f"{'case':<36}{'positions':>10}{'max_abs':>11}{'mean_abs':>11}{'rel':>11}{'top1':>8}{'state_rel':>11}"]

    def row(label, d, state):
        st = "n/a" if state is None else f"{state['rel']:.2e}"
        lines.append(f"{label:<36}{d['positions']:>10}{d['max_abs']:>11.2e}{d['mean_abs']:>11.2e}"
                     f"{d['rel']:>11.2e}{d['top1']:>8.3f}{st:>11}")
    for c in report.cases:
        pad = " padded" if c.get("left_padded") else ""
        row(f"prefill l={c['length']} b={c['batch']}{pad}", c["prefill"], c["state_after_prefill"])
        if c["decode"]:
            row(f"decode  l={c['length']} b={c['batch']}{pad} x{c['decode']['positions'] // c['batch']}",
                c["decode"], c["state_after_decode"])
    s = report.sequence
    if s:
        row(f"sequence {s['source']} ({s['length']})", s["logits"], None)
        lines.append(f"perplexity over {s['scored_tokens']} tokens: reference {s['ppl_reference']:.4f}, "
                     f"artifact {s['ppl_artifact']:.4f}")
    if any(c["state_after_prefill"] is None for c in report.cases):
        lines.append("state: unavailable (the artifact's runner does not expose its state)")
    lines += [""] + [c.describe() for c in report.checks]
    lines.append("PASSED" if report.passed else f"FAILED: {len(report.failures)} check(s) beyond tolerance")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points

def verify(reference_runner, artifact_runner, lengths=DEFAULT_LENGTHS, batches=DEFAULT_BATCHES,
           decode_steps: int = DEFAULT_DECODE_STEPS, text_ids=None, tolerance=None, seed: int = 0,
           label: str | None = None, progress: bool = True) -> VerifyReport:
    """Compare two runners on random batches (every length x batch) and one scored sequence.

    tolerance: None (defaults for `label`, else for the type read from the artifact runner's
    source path, else fp32), a label like 'int4', a dict / 'k=v,...' string of overrides, or a
    Tolerance. Returns a VerifyReport; it never raises for being out of tolerance.
    """
    from tqdm.auto import tqdm

    from .runners.base import require_runner

    ref, art = reference_runner, artifact_runner
    for name, r in (("reference_runner", ref), ("artifact_runner", art)):
        require_runner(r, name, "verify.open_pair(reference, artifact) or runners.open_runner(path)")
    lengths, batches = _int_tuple("lengths", lengths), _int_tuple("batches", batches)
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, numbers.Integral):
        raise ConfigError(f"decode_steps={decode_steps!r} must be an integer")
    if not is_seed(seed):
        raise ConfigError(f"seed={seed!r} must be an integer in 0..2**64-1")
    vocab = ref.vocab_size
    _check_same_model(ref, art)
    if art.vocab_size != vocab:  # runners without a config
        raise VerificationError(f"artifact vocabulary {art.vocab_size} != reference {vocab}; "
                                "these are not the same model")
    if label is None:
        src = art.artifact_path
        label = infer_artifact_dtype(src, ref.artifact_path) if src is not None else "fp32"
    tol = make_tolerance(tolerance, label)
    if not lengths or not batches:  # no cases would leave only the perplexity check to pass
        raise ConfigError(f"lengths {lengths} and batches {batches} must each name at least one value, "
                          "e.g. lengths (1, 7, 257) and batches (1, 3)")
    if any(x < 1 for x in lengths + batches) or decode_steps < 0:
        raise ConfigError(f"lengths {lengths} and batches {batches} must be >= 1 and decode_steps "
                          f"{decode_steps} >= 0")
    # the largest case's prefill logits, (b, l, vocab) float32 on each side
    check_fits(2 * max(batches) * max(lengths) * vocab * 4, f"verify at batch {max(batches)} x length {max(lengths)}",
               "try smaller lengths or batches (--lengths / --batch)")
    gen = torch_generator(seed)
    report = VerifyReport(tol, reference=_describe(ref), artifact=_describe(art))
    padded = max(batches) > 1 and max(lengths) > 1  # rows of different lengths need both
    bar = tqdm(total=len(lengths) * len(batches) + 1 + padded, desc=f"verify ({art.name})", disable=not progress,
               leave=False)
    with torch.inference_mode(), bar:
        for length in lengths:
            for b in batches:
                ids = torch.randint(0, vocab, (b, length), generator=gen)
                report.cases.append(_run_case(ref, art, ids, decode_steps, vocab))
                bar.update()
        report.sequence = _sequence(ref, art, text_ids, vocab, gen)
        bar.update()
        if padded:  # the longest rows and the largest batch, left-padded to different lengths
            ids = torch.randint(0, vocab, (max(batches), max(lengths)), generator=gen)
            report.cases.append(_run_padded_case(ref, art, ids, decode_steps, vocab))
            bar.update()
    report.checks = _build_checks(report.cases, report.sequence, tol)
    return report


def _int_tuple(name: str, values) -> list[int]:
    """lengths / batches: a sequence of integers (a str or a single int is a slip: "17" would run 1 and 7)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name}={values!r} must be a sequence of integers, e.g. {name}=(1, 7)")
    values = list(values)
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in values):  # numpy ints are fine
        raise ConfigError(f"{name}={values!r} must hold integers only")
    return [int(x) for x in values]


def _sequence(ref, art, text_ids, vocab: int, gen) -> dict:
    if text_ids is not None:
        ids = token_stream(text_ids, "text_ids").reshape(1, -1)
        if ids.shape[1] < 2:
            raise ConfigError(f"the text (text_ids) has {ids.shape[1]} token(s); perplexity needs at least 2")
        bad = first_out_of_vocab(ids, vocab)
        if bad is not None:
            raise ConfigError(f"text_ids: token id {bad} is outside the vocabulary of {vocab}; "
                              "tokenize it with the reference model's tokenizer")
        return {"source": "text", **_score_sequence(ref, art, ids, 1, vocab)}
    prompt = torch.randint(0, vocab, (1, PPL_PROMPT), generator=gen)
    ids = _sample_continuation(ref, prompt, PPL_CONTINUATION, vocab, gen)
    return {"source": "sampled continuation", **_score_sequence(ref, art, ids, PPL_PROMPT, vocab)}


def _where(runner) -> str:
    return str(runner.artifact_path or runner.name)


def _describe(runner) -> str:
    where = runner.artifact_path
    dtype = getattr(getattr(runner, "model", None), "dtype", None)
    extra = f" {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
    return f"{where or '?'} ({runner.name}{extra})"


REFERENCE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}


def open_pair(reference, artifact, backend: str | None = None, reference_dtype: str = "float32",
              device: str = "cpu", artifact_options: dict | None = None, threads: int | None = None):
    """-> (reference runner: PyTorch at `reference_dtype`, artifact runner, artifact's dtype label).
    threads: CPU threads of both backends (None: each backend's default)."""
    check_artifact_options(artifact_options)  # before the reference loads
    ref = open_reference(reference, reference_dtype, device, threads, artifact=artifact)
    art = open_artifact(artifact, backend, device, artifact_options, threads)
    return ref, art, infer_artifact_dtype(artifact, reference)


def check_reference(reference, artifact=None) -> None:
    """The reference runs in PyTorch: it is the checkpoint an artifact came from, never an export.
    Said before anything is opened (an export there failed as "no config.json"), with a hint when
    the two arguments look swapped. Anything else (a loaded model, a path the system refuses) is
    left to open_runner's own errors."""
    from .runners import guess_backend

    def kind_of(path):
        if not isinstance(path, (str, os.PathLike)):
            return None
        try:
            return guess_backend(as_opened(path))
        except OSError:  # a name too long, ...: open_runner says what is wrong with it
            return None

    kind = kind_of(reference)
    if kind in ("onnx", "tensorrt"):
        swapped = "; the two arguments look swapped" if artifact is not None and kind_of(artifact) == "torch" else ""
        kind = {"onnx": "an ONNX", "tensorrt": "a TensorRT"}[kind]
        raise ConfigError(f"REFERENCE {reference} is {kind} export, not a checkpoint: verify checks an artifact "
                          f"against the checkpoint it came from, `mamba-deploy verify CHECKPOINT ARTIFACT`{swapped}")


def open_reference(reference, reference_dtype: str = "float32", device: str = "cpu", threads: int | None = None,
                   artifact=None):
    """The reference checkpoint as a PyTorch runner at `reference_dtype`. `artifact`: the path it
    will be compared with, for check_reference's hint when the two look swapped."""
    from .runners import open_runner

    check_reference(reference, artifact)
    if reference_dtype not in REFERENCE_DTYPES:
        raise ConfigError(f"reference dtype {reference_dtype!r} is not supported; use float32 or float64")
    ref = open_runner(reference, "torch", device=device, dtype=REFERENCE_DTYPES[reference_dtype], threads=threads)
    if ref.artifact_path is None:  # a hub id: reports name it as given
        ref.artifact_path = Path(str(reference))
    return ref


def open_artifact(artifact, backend: str | None = None, device: str = "cpu", artifact_options: dict | None = None,
                  threads: int | None = None):
    """The artifact's runner (`backend`: guessed from the path when None)."""
    from .runners import guess_backend, open_runner

    check_artifact_options(artifact_options)
    backend = backend or guess_backend(artifact)
    opts = {"threads": threads, **(artifact_options or {})}
    if backend == "torch":
        opts.setdefault("device", device)
    art = open_runner(artifact, backend, **opts)
    if art.artifact_path is None:
        art.artifact_path = Path(str(artifact))
    return art


def check_artifact_options(options) -> None:
    """open_runner's keyword arguments for the artifact: a dict with str keys, or None (** raised a
    raw TypeError for a list)."""
    if options is not None and not (isinstance(options, Mapping) and all(isinstance(k, str) for k in options)):
        raise ConfigError(f"artifact_options must be a dict of open_runner keyword arguments ({{\"threads\": 4}}) or "
                          f"None, got {type(options).__name__} {options!r:.60}")


def write_json_atomic(path, data) -> Path:
    """Write JSON to a temporary name beside `path`, then rename (never a partial file)."""
    return write_json(path, data)


def as_opened(path):
    """A path as the runners open it: `~` expanded, a checkpoint's config.json as its folder (a
    hub id as given). The tolerance row and the backend are read from this form: from the path as
    typed, '~/q' lost a quantized reference's int4 row (a corrupt export passed the int8 one)."""
    if path is None:
        return path
    from .checkpoint import checkpoint_path

    p = checkpoint_path(str(path))
    return str(p) if p.exists() else path


def cmd_verify(args):
    from .cli import DTYPES
    from .runners import guess_backend

    args.reference, args.artifact = as_opened(args.reference), as_opened(args.artifact)
    check_reference(args.reference, args.artifact)
    backend = args.backend or guess_backend(args.artifact)
    if args.artifact_dtype and backend != "torch":
        # other runners run the precision stored in the artifact and ignore a dtype, so taking the
        # half-precision row for them would loosen the limits without changing what is checked
        raise ConfigError(
            f"--artifact-dtype {args.artifact_dtype} only changes how a torch checkpoint is run; "
            f"{args.artifact} runs on the {backend} backend, at the precision stored in the artifact "
            f"({infer_artifact_dtype(args.artifact)}). Leave --artifact-dtype out, or to loosen the limits on "
            f"purpose pass --dtype {args.artifact_dtype} (tolerance row) or --tolerance NAME=VALUE")
    lengths, batches = int_list(args.lengths, "--lengths", "1,7,257"), int_list(args.batch, "--batch", "1,3")
    # limits only: a bare name here (`--tolerance logits_rel`) is a missing value, not a row label
    overrides = parse_overrides(",".join(args.tolerance or []))
    make_tolerance(overrides, args.dtype or "fp32")  # bad names / --dtype before any model is loaded
    if args.json:
        refuse_input_file(args.json, [args.reference, args.artifact, args.text], "--json", "verify.json")
        prepare_output_file(args.json, example="verify.json")
    text = None if not args.text else read_text_file(args.text, "--text")
    opts = {"dtype": DTYPES[args.artifact_dtype]} if args.artifact_dtype else {}
    label = infer_artifact_dtype(args.artifact, args.reference)
    if args.artifact_dtype and not args.dtype:
        # a checkpoint run in a lower precision than it stores (fp32 or fp16 weights run in bf16)
        # needs that precision's limits: the looser of the two rows (TOLERANCES runs tight -> loose)
        label = max(tolerance_row(label), tolerance_row(args.artifact_dtype), key=list(TOLERANCES).index)
    make_tolerance(overrides, args.dtype or label)  # a type without a row, before the reference pass (minutes)
    # one model in memory at a time (verify_replay): the reference's answers first, then the artifact
    from .runners.base import release_freed_memory
    from .runners.preflight import artifact_config
    from .verify_replay import Recording, Replay, StandIn

    # what the artifact's files say is checked before the reference pass (minutes), not after it:
    # a missing artifact, a backend that is not installed or cannot open it, another model's config
    art_config = artifact_config(args.artifact, backend)
    ref = open_reference(args.reference, args.reference_dtype, args.device, threads=args.threads)
    recording = Recording(ref)
    try:
        try:
            _check_artifact_config(ref, art_config, args.artifact, backend)
            from .tokenizer import encode_prefix

            text_ids = None if text is None else encode_prefix(ref.tokenizer, text, args.max_text_tokens)
            if text_ids is not None and len(text_ids) < 2:  # _sequence's message cannot name the file
                raise ConfigError(f"--text {args.text!r} is {len(text_ids)} token(s); its perplexity needs at "
                                  "least 2: give a longer text (or leave --text out for random token ids)")
            verify(recording, StandIn(ref), lengths, batches, args.decode_steps, text_ids, None, args.seed,
                   label="fp32", progress=not args.quiet)
        finally:
            ref.close()  # the torch runner keeps its model: every reference to it goes, before the artifact opens
            recording.ref = None
            del ref
            release_freed_memory()
        art = open_artifact(args.artifact, backend, args.device, opts, threads=args.threads)
        try:
            report = verify(Replay(recording), art, lengths, batches, args.decode_steps, text_ids,
                            overrides or None, args.seed, label=args.dtype or label, progress=not args.quiet)
        finally:
            art.close()
    finally:
        recording.spill.close()  # the reference's answers kept on disk
    if args.json:  # first: a closed stdout (`| head`) must not lose the file asked for
        write_json_atomic(args.json, report.to_dict())
    print(report.table())
    if not report.passed:
        raise BeyondToleranceError(f"{args.artifact} is beyond tolerance of {args.reference}: "
                                + "; ".join(report.failures)
                                + ". Re-export the artifact, or if the error is expected for its type, "
                                "pass --dtype LABEL or --tolerance NAME=VALUE")


def register(subparsers) -> None:
    from .argtypes import positive_int_list
    from .cli import add_threads

    s = subparsers.add_parser("verify", help="compare an artifact with its reference checkpoint; exit 1 beyond tolerance, 2 on errors")
    s.add_argument("reference", help="checkpoint folder / hub id run in PyTorch")
    s.add_argument("artifact", help="artifact to check: ONNX folder, .gguf, checkpoint folder, ...")
    s.add_argument("--backend", default=None, type=backend_choice,
                   help="backend for the artifact (default: from its path)")
    s.add_argument("--reference-dtype", default="float32", type=str.lower, choices=["float32", "float64"],
                   help="dtype the reference checkpoint runs in (PyTorch)")
    s.add_argument("--artifact-dtype", default=None, type=str.lower, choices=["fp32", "fp16", "bf16"],
                   help="run a torch artifact in this dtype")
    s.add_argument("--text", default=None, help="UTF-8 text file scored for perplexity")
    s.add_argument("--max-text-tokens", type=positive_int, default=4096,
                   help="with --text: score only its first N tokens")
    s.add_argument("--lengths", type=positive_int_list, default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="prompt lengths in tokens of the random-token cases, comma-separated integers >= 1; each is "
                        "run at every --batch size")
    s.add_argument("--batch", type=positive_int_list, default=",".join(map(str, DEFAULT_BATCHES)),
                   help="batch sizes of the random-token cases, comma-separated integers >= 1")
    s.add_argument("--decode-steps", type=nonnegative_int, default=DEFAULT_DECODE_STEPS,
                   help="teacher-forced decode steps after each case's prefill (both sides are fed the reference's "
                        "greedy tokens; 0 = prefill only)")
    s.add_argument("--dtype", default=None, help=f"tolerance row to use ({', '.join(TOLERANCES)}); default: read from the artifact")
    s.add_argument("--tolerance", action="append", default=None, metavar="NAME=VALUE",
                   help="override a limit: logits_rel, state_rel, top1, ppl_rel (repeatable or comma-separated)")
    s.add_argument("--seed", type=seed, default=0,
                   help="seed of the random prompts and, without --text, of the sampled sequence scored for "
                        "perplexity")
    s.add_argument("--device", default="cpu",
                   help="torch device (cpu, cuda, cuda:N) of the reference, and of the artifact when it runs on "
                        "the torch backend")
    add_threads(s)
    s.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_verify)
