"""Which module gets which format: method defaults, the quantizable module names, per-layer
mixed-precision rules (a JSON file), and the `quantization_config` written to config.json.

The plan is always written out module by module (`modules`), so loading never has to infer
anything from tensor names or shapes.
"""

from __future__ import annotations

import fnmatch
import json
import numbers
import re
from pathlib import Path

from ..argtypes import is_whole
from ..errors import QuantizationError
from .formats import FORMATS, FP8_SCALINGS, check_group

QUANT_METHOD_TAG = "mamba_deploy"  # `quant_method` value, so other loaders can tell it is ours
CONFIG_VERSION = 1

# method -> default options. `format` is what the method's target modules are stored as.
METHODS = {
    "int8": dict(format="int8", bits=8, group_size=None, symmetric=True, calibrate=False),
    "int4": dict(format="int4", bits=4, group_size=128, symmetric=True, calibrate=False),
    "gptq": dict(format="int4", bits=4, group_size=128, symmetric=True, calibrate=True,
                 act_order=False, damp=0.01, block_size=128),
    "awq": dict(format="int4", bits=4, group_size=128, symmetric=True, calibrate=True, grid=20, clip=True),
    "smoothquant": dict(format="w8a8", bits=8, group_size=None, symmetric=True, calibrate=True, alpha=0.5),
    "fp8": dict(format="fp8", bits=8, group_size=None, symmetric=True, calibrate=False, fp8_scaling="channel"),
}
# Linear layers inside each mixer that are quantized by default (Mamba1 has x_proj / dt_proj,
# Mamba2 only in_proj / out_proj); embeddings and lm_head only on request.
MIXER_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
OPTIONAL_MODULES = {"embeddings": "backbone.embeddings", "lm_head": "lm_head"}
# Format substitutions: method format -> {mixer linear: stored format}. dt_proj's rows are
# dt_rank long (d_model/16, e.g. 16) -- shorter than any useful int4 group -- its output goes
# through softplus and exp, and Mamba1 reads its weight directly (no activation to quantize),
# so it is stored per-channel int8 weight-only (it is ~1% of the weights).
FORMAT_SUBSTITUTE = {"int4": {"dt_proj": "int8"}, "w8a8": {"dt_proj": "int8"}}
# Linears the model reads as a weight and never calls on an activation (Mamba1's dt_proj: its
# weight is folded into the state update): no activation statistics for calibrated methods and
# no activation quantization (w8a8), so only weight-only formats, chosen by rounding.
WEIGHT_READ = ("dt_proj",)
INT_OPTIONS = ("group_size", "n_calib", "calib_len", "block_size", "grid")  # positive integers
REAL_OPTIONS = ("damp", "alpha")
MODULE_KEYS = {"format", "group_size", "symmetric", "fp8_scaling", "input_scale", "algo"}


def method_options(method: str, options: dict) -> dict:
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    opts = dict(METHODS[method])
    unknown = set(options) - set(opts) - {"include", "rules", "calib", "calib_ids", "n_calib", "calib_len",
                                          "progress"}
    if unknown:
        raise QuantizationError(f"unknown option(s) {sorted(unknown)} for method {method!r}; "
                                f"valid: {sorted(set(opts) - {'format', 'bits', 'calibrate'})}")
    opts.update({k: v for k, v in options.items() if v is not None})
    inc = options.get("include")
    if isinstance(inc, str):  # a bare name would be read letter by letter
        raise QuantizationError(f"include={inc!r} must be a list of module names, e.g. include=[{inc!r}]")
    if inc is not None and not (isinstance(inc, (list, tuple, set)) and all(isinstance(n, str) for n in inc)):
        raise QuantizationError(f"include={inc!r:.60} must be a list of module names (embeddings, lm_head)")
    _check_values(options)
    for keys, kind in ((INT_OPTIONS, int), (REAL_OPTIONS, float)):  # numpy scalars pass the checks but not json.dumps
        opts.update({k: kind(opts[k]) for k in keys if opts.get(k) is not None})
    if method == "gptq" and not 1.0 >= float(opts["damp"]) > 0.0:  # NaN fails too; a fraction of the mean
        # diagonal, as AutoGPTQ's damp_percent (0, 1): 1e308 overflowed the Hessian to inf
        raise QuantizationError(f"gptq damp={opts['damp']} must be in (0, 1], a fraction of the Hessian's mean "
                                "diagonal (0.01 is the usual choice)")
    if options.get("symmetric") is False and opts["format"] != "int4" and not options.get("rules"):
        raise QuantizationError(f"symmetric=False (--asymmetric, zero points) applies to the 4-bit methods (int4, gptq, "
                                f"awq); {method} stores symmetric codes only: drop --asymmetric")
    if options.get("group_size") is not None and opts["format"] != "int4" and not options.get("rules"):
        raise QuantizationError(f"group_size={options['group_size']} applies to the 4-bit methods (int4, gptq, awq); "
                                f"{method} quantizes per output channel: drop --group-size")
    if opts.get("fp8_scaling", "channel") not in FP8_SCALINGS:
        raise QuantizationError(f"fp8_scaling {opts['fp8_scaling']!r} unknown; choose one of {FP8_SCALINGS}")
    if method == "smoothquant" and not 0.0 <= float(opts["alpha"]) <= 1.0:
        raise QuantizationError(f"smoothquant alpha={opts['alpha']} must be in [0, 1] (0.5 is the usual choice)")
    return opts


def _check_values(options: dict, where: str = "") -> None:
    """Refuses option values of the wrong kind, for the keyword options and a rules file alike
    (where: "rule for '<glob>': "): int("abc") or a negative group size would fail deep inside
    the quantizer, and int(64.9), bool("no") or a 0 read as "default" would change the value."""
    for key in INT_OPTIONS:
        v = options.get(key)
        if v is not None and not is_whole(v, 1):
            raise QuantizationError(f"{where}{key}={v!r} must be a positive integer")
    for key in ("symmetric", "act_order", "clip", "enable"):  # bool("no") is True: take real booleans only
        v = options.get(key)
        if v is not None and not isinstance(v, bool):
            raise QuantizationError(f"{where}{key}={v!r} must be true or false")
    for key in REAL_OPTIONS:
        v = options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise QuantizationError(f"{where}{key}={v!r} must be a number")
    if options.get("fp8_scaling") is not None and options["fp8_scaling"] not in FP8_SCALINGS:
        raise QuantizationError(f"{where}fp8_scaling {options['fp8_scaling']!r} unknown; choose one of {FP8_SCALINGS}")


def target_modules(model, include=()) -> list[str]:
    """Names of the modules quantized by default, in model order."""
    bad = set(include) - set(OPTIONAL_MODULES)
    if bad:
        raise QuantizationError(f"cannot include {sorted(bad)}; optional modules are {sorted(OPTIONAL_MODULES)}")
    names = []
    if "embeddings" in include or ("lm_head" in include and model.config.tie_embeddings):
        names.append(OPTIONAL_MODULES["embeddings"])
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in MIXER_LINEARS and ".mixer." in name:
            names.append(name)
    if "lm_head" in include or ("embeddings" in include and model.config.tie_embeddings):
        names.append(OPTIONAL_MODULES["lm_head"])
    return names


def default_spec(name: str, opts: dict) -> dict:
    fmt = opts["format"]
    fmt = FORMAT_SUBSTITUTE.get(fmt, {}).get(name.rsplit(".", 1)[-1], fmt)
    if name in OPTIONAL_MODULES.values() and fmt == "w8a8":
        fmt = "int8"  # embeddings are lookups; keep lm_head weight-only too (logits precision)
    return _spec(fmt, opts)


# a rule's per-format keys and the formats that read them (_spec); elsewhere they would do nothing
RULE_KEY_FORMATS = {"group_size": ("int4",), "symmetric": ("int4",), "fp8_scaling": ("fp8",)}


def _spec(fmt: str, opts: dict) -> dict:
    spec = {"format": fmt}
    if fmt == "int4":
        spec.update(group_size=int(opts.get("group_size") or 128), symmetric=bool(opts.get("symmetric", True)))
    if fmt == "fp8":
        spec["fp8_scaling"] = opts.get("fp8_scaling", "channel")
    return spec


# ----------------------------------------------------------------------------- mixed precision

def load_rules(path_or_dict) -> list[tuple[str, dict]]:
    """quant_cfg JSON: {"quant_cfg": {"<glob>": {"enable": false} | {"format": "int8", ...}}}.
    Globs match full module names (`backbone.layers.0.mixer.in_proj`); `layers.-1` means the last
    layer. Later entries override earlier ones."""
    if isinstance(path_or_dict, (str, Path)):
        try:  # ~ expanded as for the model path (--config=~/r.json is left alone by the shell)
            d = json.loads(Path(path_or_dict).expanduser().read_text(encoding="utf-8"),
                           object_pairs_hook=lambda pairs: _unique_keys(pairs, path_or_dict))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QuantizationError(f"cannot read quantization rules {path_or_dict}: {e}; save it as a UTF-8 JSON "
                                    'file {"quant_cfg": {...}}') from e
    else:
        d = path_or_dict
    cfg = d.get("quant_cfg") if isinstance(d, dict) else None
    if not isinstance(cfg, dict):
        raise QuantizationError(
            'a quantization rules file must be a JSON object {"quant_cfg": {"<module glob>": {...}}}, '
            f"got {str(d)[:80]!r}"
        )
    if set(d) != {"quant_cfg"}:  # another tool's keys ("algorithm": "awq") would do nothing here
        raise QuantizationError(f"quantization rules take the key 'quant_cfg' only, got also {sorted(set(d) - {'quant_cfg'})}; "
                                "the method is --method's, the options are quantize's flags")
    rules = []
    for pattern, rule in cfg.items():
        if not isinstance(pattern, str):  # a JSON file's keys are strings; a dict's may not be
            raise QuantizationError(f"quant_cfg keys are module name globs (str), got {type(pattern).__name__} "
                                    f"{pattern!r:.40}; e.g. \"backbone.layers.*.mixer.in_proj\"")
        if not isinstance(rule, dict) or set(rule) - {"enable", "format", "group_size", "symmetric", "fp8_scaling"}:
            raise QuantizationError(f"rule for {pattern!r} must be an object with keys enable / format / "
                                    f"group_size / symmetric / fp8_scaling, got {rule!r}")
        if "format" in rule and rule["format"] not in FORMATS:
            raise QuantizationError(f"rule for {pattern!r}: unknown format {rule['format']!r}; choose one of {sorted(FORMATS)}")
        _check_values(rule, f"rule for {pattern!r}: ")
        rules.append((pattern, rule))
    return rules


def _unique_keys(pairs: list, path) -> dict:
    """A JSON object whose keys are all different: json.loads kept a repeated glob in its first
    place with its last value, against "later entries override earlier ones"."""
    seen = [k for i, (k, _) in enumerate(pairs) if any(k == j for j, _ in pairs[:i])]
    if seen:
        raise QuantizationError(f"quantization rules {path}: {seen[0]!r} appears twice in one JSON object (in "
                                "quant_cfg, or among one rule's keys); give it once (a glob given later overrides "
                                "the earlier ones it overlaps)")
    return dict(pairs)


def _resolve_negative(pattern: str, n_layer: int) -> str:
    return re.sub(r"layers\.(-\d+)", lambda m: f"layers.{n_layer + int(m.group(1))}", pattern)


def build_plan(model, opts: dict) -> dict:
    """module name -> spec dict (None = left in float)."""
    names = target_modules(model, opts.get("include") or ())
    plan = {n: default_spec(n, opts) for n in names}
    rules = load_rules(opts["rules"]) if opts.get("rules") else []
    all_names = {n for n, _ in model.named_modules()}
    group_rule: dict[str, str] = {}  # module -> the last rule that set its group_size
    for pattern, rule in rules:
        pat = _resolve_negative(pattern, model.config.n_layer)
        hits = [n for n in plan if fnmatch.fnmatchcase(n, pat)]
        others = [n for n in sorted(all_names) if n and fnmatch.fnmatchcase(n, pat)]
        if not hits and not others:
            raise QuantizationError(f"rule {pattern!r} matches no module; names look like "
                                    f"'backbone.layers.0.mixer.in_proj' (use 'backbone.layers.-1.*' for the last layer)")
        if not hits:  # it would do nothing: say why rather than ignore it
            optional = [k for k, v in OPTIONAL_MODULES.items() if v in others]
            hint = (f"add --include {' '.join(optional)} to quantize {'it' if len(optional) == 1 else 'them'}"
                    if optional else "rules apply to the linear layers " + ", ".join(MIXER_LINEARS)
                    + f" of each mixer and, with --include, to {' / '.join(OPTIONAL_MODULES)}")
            raise QuantizationError(f"rule {pattern!r} matches only modules that are not quantized "
                                    f"({', '.join(others[:3])}); {hint}")
        for n in hits:
            if rule.get("enable", True) is False:
                plan[n] = None
                continue
            base = plan[n] or default_spec(n, opts)
            fmt = rule.get("format", base["format"])
            ignored = sorted(k for k, fmts in RULE_KEY_FORMATS.items() if k in rule and fmt not in fmts)
            if ignored:  # it was dropped without a word: a rule asking for int8 groups got per-row int8
                raise QuantizationError(
                    f"rule {pattern!r} sets {', '.join(ignored)} for {n}, whose format is {fmt}, where "
                    f"{'it does' if len(ignored) == 1 else 'they do'} not apply ("
                    + "; ".join(f"{k}: {'/'.join(RULE_KEY_FORMATS[k])} only" for k in ignored)
                    + "); drop the key or give the rule that format")
            plan[n] = _spec(fmt, {**opts, **{k: v for k, v in base.items() if k != "format"},
                                  **{k: v for k, v in rule.items() if k not in ("enable", "format")}})
            if "group_size" in rule:
                group_rule[n] = pattern
    for n, pattern in group_rule.items():  # named here: --group-size cannot fix a rule's group size
        if plan[n] and plan[n].get("group_size"):
            module = model.get_submodule(n)
            check_group(n, getattr(module, "in_features", None) or module.embedding_dim, plan[n]["group_size"],
                        rule=pattern)
    emb, head = OPTIONAL_MODULES["embeddings"], OPTIONAL_MODULES["lm_head"]
    if model.config.tie_embeddings and plan.get(emb) and plan.get(head) and plan[emb] != plan[head]:
        # before calibration, not after every layer was quantized (quantizer._swap_head)
        raise QuantizationError(f"lm_head and {emb} share one tensor (tied), so they take one format; the rules give "
                                f"lm_head {plan[head]} and {emb} {plan[emb]}: give both the same rule")
    for n, spec in plan.items():
        if spec and weight_read(n) and spec["format"] == "w8a8":
            raise QuantizationError(f"{n}: the model reads this layer's weight directly (it is never called on an "
                                    "activation), so w8a8's activation quantization cannot apply; use format "
                                    "'int8' (weight-only) for it in the rules")
    return plan  # options the plan leaves nothing to act on: quantizer._refuse_unused_options


def weight_read(name: str) -> bool:
    """Whether module `name` is one of WEIGHT_READ (rounding only, weight-only formats)."""
    return name.rsplit(".", 1)[-1] in WEIGHT_READ


# ----------------------------------------------------------------------------- config.json entry

def make_config(method: str, opts: dict, modules: dict) -> dict:
    extras = {k: opts[k] for k in ("act_order", "damp", "alpha", "grid", "clip", "fp8_scaling") if k in opts}
    return {
        "quant_method": QUANT_METHOD_TAG,
        "version": CONFIG_VERSION,
        "method": method,
        "bits": opts["bits"],
        "group_size": opts.get("group_size") if opts["format"] == "int4" else None,
        "symmetric": bool(opts.get("symmetric", True)),
        "method_options": extras,
        "modules": modules,
    }


def module_formats(qc: dict) -> set[str]:
    """The formats a quantization_config's modules are stored in (lower case): this toolkit's
    mixed precision; empty for a config without per-module specs (another tool's)."""
    mods = qc.get("modules")
    return ({str(m.get("format", "")).lower() for m in mods.values() if isinstance(m, dict)}
            if isinstance(mods, dict) else set())


def refuse_foreign(qc) -> None:
    """Another tool's valid quantization_config (bitsandbytes, GPTQ, AWQ, ...): not malformed, only
    not this toolkit's format; its own QuantizationError, before any other check of the folder."""
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if isinstance(method, str) and method != QUANT_METHOD_TAG:
        raise QuantizationError(
            f"config.json says the weights were quantized with {method!r} (quant_method), a format "
            f"this toolkit does not read (only its own {QUANT_METHOD_TAG!r} checkpoints); load the unquantized "
            "model instead (e.g. the same repository without the -4bit / -GPTQ / -AWQ suffix) and quantize it with "
            f"`mamba-deploy quantize MODEL OUT --method {'|'.join(METHODS)}`")


def validate_config(qc, module_names, layers=None) -> dict:
    """Check a quantization_config read from disk; raise naming the first bad value. `layers`: the
    names among `module_names` that a spec may name (Linear / Embedding layers), when known."""
    def bad(msg):
        raise QuantizationError(f"malformed quantization_config in config.json: {msg}; "
                                "re-create it with `mamba-deploy quantize`")

    if not isinstance(qc, dict):
        bad(f"expected an object, got {type(qc).__name__}")
    refuse_foreign(qc)
    if qc.get("quant_method") != QUANT_METHOD_TAG:
        bad(f"quant_method={qc.get('quant_method')!r} is not {QUANT_METHOD_TAG!r} (only this toolkit's format is read)")
    if qc.get("version") != CONFIG_VERSION:
        bad(f"version={qc.get('version')!r}, this build reads version {CONFIG_VERSION}")
    if not isinstance(qc.get("method"), str) or qc["method"] not in METHODS:
        bad(f"method={qc.get('method')!r} unknown; expected one of {list(METHODS)}")
    mods = qc.get("modules")
    if not isinstance(mods, dict) or not mods:
        bad(f"'modules' must be a non-empty object of module name -> spec, got {mods!r}")
    for name, spec in mods.items():
        if name not in module_names:
            bad(f"module {name!r} does not exist in this model")
        if layers is not None and name not in layers:
            bad(f"module {name!r} is not a Linear or Embedding layer, the only layers that are quantized")
        if not isinstance(spec, dict) or not isinstance(spec.get("format"), str) or spec["format"] not in FORMATS \
                or set(spec) - MODULE_KEYS:
            bad(f"spec for {name!r} is {spec!r}; need {{'format': one of {sorted(FORMATS)}, ...}}")
        gs = spec.get("group_size")
        if spec["format"] == "int4" and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
            bad(f"int4 module {name!r} has group_size={gs!r}; expected a positive integer")
        if not isinstance(spec.get("symmetric", True), bool):
            bad(f"module {name!r} has symmetric={spec['symmetric']!r}; expected true or false")
        scaling = spec.get("fp8_scaling", "channel")
        if not isinstance(scaling, str) or scaling not in FP8_SCALINGS:
            bad(f"module {name!r} has fp8_scaling={scaling!r}; expected one of {FP8_SCALINGS}")
    return qc
