"""verify's default limits per weight type, as data: one row per precision, from fp32 down to q2
(each row at least as loose as the one above it), and the map from the labels artifacts carry
(GGUF file types, ONNX manifest dtypes, quantization_config methods) to a row. Export, checkpoint
and verify all read it here, so a label means the same row everywhere."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

import torch

from .errors import ConfigError

# logits_rel: max |artifact - reference| / max |reference| over every compared logit;
# state_rel: same for the recurrent state (conv and ssm, after prefill and after decoding);
# top1: minimum fraction of positions whose argmax token agrees;
# ppl_rel: |ppl_artifact / ppl_reference - 1|.
# fp32 follows CONTRIBUTING (1e-4 relative); half precision 1e-2; quantized rows are loose
# enough for a trained model's weights at that bit width and tight enough to catch a broken one.
# From 5 bits down, the two max-element ratios are set from measurement, about 1.4x the worst seen
# over verify seeds on the trained demo models for llama.cpp's own Q5_K_M / Q4_0 / Q4_K_M /
# Q3_K_M / Q2_K and this project's int4 / GPTQ / AWQ defaults (README "Tolerances"). Their worst
# cases are short random-token prompts, where the state is a product of a few tokens' quantized
# x, B and dt; top1 and ppl_rel are what separates a sound low-bit artifact from a broken one
# there (one layer's int4 scales x1.25 or its A_log + 1 still fail: tests/test_verify.py).
TOLERANCES = {
    "fp32": dict(logits_rel=1e-4, state_rel=1e-4, top1=0.99, ppl_rel=1e-3),
    "fp16": dict(logits_rel=1e-2, state_rel=1e-2, top1=0.95, ppl_rel=1e-2),
    "bf16": dict(logits_rel=3e-2, state_rel=3e-2, top1=0.90, ppl_rel=2e-2),
    "int8": dict(logits_rel=5e-2, state_rel=1e-1, top1=0.90, ppl_rel=3e-2),
    "q6": dict(logits_rel=8e-2, state_rel=1.5e-1, top1=0.85, ppl_rel=5e-2),
    # e4m3's 3 mantissa bits: ~2.7x int8's weight error. The shipped demo models' fp8 checkpoints
    # against their float ones, seeds 0-7: logits <= 0.063, state <= 0.080, top1 >= 0.957, ppl
    # <= 0.017; logits_rel ~1.4x that, the rest q6's (rows only loosen down the table)
    "fp8": dict(logits_rel=9e-2, state_rel=1.5e-1, top1=0.85, ppl_rel=5e-2),
    "q5": dict(logits_rel=1.5e-1, state_rel=3e-1, top1=0.80, ppl_rel=8e-2),
    "int4": dict(logits_rel=3e-1, state_rel=7e-1, top1=0.70, ppl_rel=1.5e-1),
    "q3": dict(logits_rel=6e-1, state_rel=9e-1, top1=0.60, ppl_rel=3e-1),
    "q2": dict(logits_rel=9e-1, state_rel=1.5, top1=0.45, ppl_rel=8e-1),
}
# label (as artifacts spell it, lower case) -> row of TOLERANCES
LABEL_ALIASES = {
    "fp32": "fp32", "f32": "fp32", "float32": "fp32", "all_f32": "fp32", "float64": "fp32",
    "fp16": "fp16", "f16": "fp16", "float16": "fp16", "half": "fp16", "mostly_f16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "mostly_bf16": "bf16",
    "int8": "int8", "q8_0": "int8", "w8a16": "int8", "w8a8": "int8", "fp8": "fp8", "llm_int8": "int8",
    "smoothquant": "int8",
    "q6_k": "q6", "q5_0": "q5", "q5_1": "q5", "q5_k": "q5", "q5_k_s": "q5", "q5_k_m": "q5",
    "int4": "int4", "q4_0": "int4", "q4_1": "int4", "q4_k": "int4", "q4_k_s": "int4", "q4_k_m": "int4",
    "nf4": "int4", "fp4": "int4", "w4a16": "int4", "gptq": "int4", "awq": "int4", "iq4_nl": "int4",
    "iq4_xs": "int4", "q3_k": "q3", "q3_k_s": "q3", "q3_k_m": "q3", "q3_k_l": "q3", "q2_k": "q2",
    # llama.cpp's other 2-3 bit file types (importance-matrix quants): their bit width's row
    "q2_k_s": "q2", "iq3_xxs": "q3", "iq3_xs": "q3", "iq3_s": "q3", "iq3_m": "q3", "iq2_xxs": "q2",
    "iq2_xs": "q2", "iq2_s": "q2", "iq2_m": "q2", "iq1_s": "q2", "iq1_m": "q2", "tq1_0": "q2", "tq2_0": "q2",
}
BITS_TO_ROW = {8: "int8", 6: "q6", 5: "q5", 4: "int4", 3: "q3", 2: "q2"}


def tolerance_row(label: str) -> str:
    """Map an artifact label (fp16, q4_k_m, nf4, int8, ...) to a row of TOLERANCES."""
    key = str(label).strip().lower().removeprefix("mostly_")
    if key in TOLERANCES:
        return key
    if key in LABEL_ALIASES or f"mostly_{key}" in LABEL_ALIASES:
        return LABEL_ALIASES.get(key) or LABEL_ALIASES[f"mostly_{key}"]
    raise ConfigError(f"no default tolerances for artifact type {label!r}; use one of "
                      f"{', '.join(TOLERANCES)} (e.g. --dtype int4) or give every limit with --tolerance")


def looser_label(label: str, other: str | None) -> str:
    """Of two weight-type labels, the one whose TOLERANCES row is looser (rows go from fp32 to q2);
    `label` where `other` is None (nothing recorded) or has no row (an edited file's value is not
    trusted to loosen anything)."""
    if other is None:
        return label
    try:
        return other.lower() if row_index(other) > row_index(label) else label
    except ConfigError:
        return label


def dtype_label(dtype) -> str:
    """A float dtype's row label: fp16, bf16, else fp32 (float64 and None included)."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def row_index(label: str) -> int:
    """Position of `label`'s row from fp32 (0) to q2: a larger index is a looser row.
    ConfigError for a label with no row."""
    return list(TOLERANCES).index(tolerance_row(label))


# ----------------------------------------------------------------------------- limits of one check

@dataclass(frozen=True)
class Tolerance:
    logits_rel: float
    state_rel: float
    top1: float
    ppl_rel: float
    label: str = "fp32"


def make_tolerance(spec=None, label: str = "fp32") -> Tolerance:
    """spec: None (defaults for `label`), a label, a dict of overrides, a 'k=v,k=v' string or a Tolerance."""
    if isinstance(spec, Tolerance):
        return spec
    names = {f.name for f in fields(Tolerance)} - {"label"}
    if isinstance(spec, str) and "=" not in spec:
        if spec.strip() in names:  # a limit's name without its value, not a row label
            raise ConfigError(f"tolerance {spec.strip()!r} has no value; write NAME=NUMBER, "
                              f"e.g. {spec.strip()}=1e-3")
        label, spec = spec, None
    if spec is not None and not isinstance(spec, (str, dict)):
        raise ConfigError(f"tolerance must be a label (\"int8\"), \"NAME=VALUE,...\" or a dict of limits, got "
                          f"{spec!r:.60}; e.g. tolerance={{\"logits_rel\": 1e-3}}")
    overrides = parse_overrides(spec) if isinstance(spec, str) else dict(spec or {})
    bad = sorted(set(overrides) - names)
    if bad:
        raise ConfigError(f"unknown tolerance {', '.join(bad)}; choose from {', '.join(sorted(names))}")
    overrides = {k: _limit(k, v) for k, v in overrides.items()}
    # every limit given: no row is needed (an artifact type without one, q2_k_s, is then checkable)
    row = "custom" if set(overrides) == names else tolerance_row(label)
    for k, v in overrides.items():  # a limit no artifact can meet (or a negative one) is a typo, not a check
        if not (0.0 <= v <= 1.0 if k == "top1" else v >= 0.0):  # NaN fails both; inf = no limit
            raise ConfigError(f"tolerance {k}={v:g} can never pass; "
                              + ("top1 is a fraction of positions in [0, 1], e.g. top1=0.99" if k == "top1"
                                 else f"{k} is a relative error >= 0, e.g. {k}=1e-3 (inf: no limit)"))
    return Tolerance(**{**TOLERANCES.get(row, {}), **overrides}, label=row)


def _limit(name: str, value) -> float:
    """A limit of a tolerance dict as a float; ConfigError naming it for anything else (None, a
    bool, a word)."""
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        with contextlib.suppress(ValueError):
            return float(value)
    raise ConfigError(f"tolerance {name}={value!r:.40} is not a number; e.g. {name}=1e-3")


def parse_overrides(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or math.isnan(out.get(name.strip(), 0.0)):  # a NaN limit fails every comparison
            raise ConfigError(f"cannot read tolerance {part!r}; write NAME=NUMBER, e.g. logits_rel=1e-3")
    return out
