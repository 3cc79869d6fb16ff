"""`mamba-deploy quantize MODEL OUT --method ...` (registered by cli.STAGE_MODULES)."""

from __future__ import annotations

import json
import math

from ..argtypes import positive_int, unit_fraction
from ..errors import QuantizationError
from ..progress import human_bytes
from .plan import METHODS

# --auto: (target, models with at most this many parameters, method, why). First match wins.
AUTO_RULES = [
    ("cpu", 1.5e9, "int8", "small model on CPU: int8 weight-only is near-lossless (+0.01% ppl on the "
                           "demo models), halves the file and runs faster in ONNX Runtime (MatMulNBits); "
                           "int4 would save memory the machine has to spare at a ~1% ppl cost"),
    ("cpu", math.inf, "gptq", "large model on CPU: decoding is memory-bound, so 4-bit weights (GPTQ keeps "
                              "the error low) cut the bytes read per token ~4x"),
    ("gpu", 3e9, "smoothquant", "small model on GPU: W8A8 uses int8 tensor cores (torch._int_mm) for both "
                                "operands with near-int8 quality"),
    ("gpu", math.inf, "awq", "large model on GPU: 4-bit AWQ weights fit in memory and cut bandwidth ~4x"),
]


def pick_auto(n_params: int, target: str) -> tuple[str, str]:
    for t, limit, method, why in AUTO_RULES:
        if t == target and n_params <= limit:
            return method, f"{n_params / 1e6:.1f} M parameters, target {target}: {why}"
    raise QuantizationError(f"--target {target!r} unknown; choose cpu or gpu")


# quantize's flags by the method option each sets: a refusal names the flag the user typed
FLAGS = {"group_size": "--group-size", "symmetric": "--asymmetric", "act_order": "--act-order", "alpha": "--alpha",
         "fp8_scaling": "--fp8-scaling", "calib": "--calib", "n_calib": "--n-calib", "calib_len": "--calib-len",
         "rules": "--config", "include": "--include"}


# quantize() accepts calibration data for every method (one call site can loop over methods), but
# only the calibrated ones read it: typed by hand for int8 / int4 / fp8 it would be ignored
CALIB_OPTIONS = ("calib", "n_calib", "calib_len")


# options only 4-bit layers use: method_options lets every method carry them (a --config rule may
# make int4 layers), so without rules they are refused by the method's format, before the load
INT4_OPTIONS = ("group_size", "symmetric")


def _takes(method: str, option: str, rules: bool = False) -> bool:
    from .plan import method_options

    if option in CALIB_OPTIONS:
        return bool(METHODS[method]["calibrate"])
    if option in INT4_OPTIONS and not rules:
        return METHODS[method]["format"] == "int4"
    try:
        method_options(method, {option: None})  # None: only whether the method knows the option
    except QuantizationError:
        return False
    return True


def check_flags(method: str, opts: dict, auto_why: str | None = None) -> None:
    """QuantizationError naming each flag --method does not take and the methods that do;
    auto_why: --auto picked `method` (for that reason), and the fix is worded for --auto."""
    rules = "rules" in opts
    for key in opts:
        if not _takes(method, key, rules):
            takers = [m for m in METHODS if _takes(m, key, rules)]
            flag = FLAGS.get(key, key)
            if auto_why is not None:
                raise QuantizationError(f"--auto picked {method} ({auto_why}); {flag} applies to "
                                        f"{', '.join(takers) or 'no method'} only: drop {flag}, or replace --auto "
                                        f"with --method {takers[0] if takers else '...'}")
            raise QuantizationError(f"{flag} does not apply to --method {method}; it applies to "
                                    f"{', '.join(takers) or 'no method'}: drop {flag}, or pick one of those")


def cmd_quantize(args):
    from ..atomic import prepare_output_dir
    from ..checkpoint import load_model
    from . import quantize, save_quantized

    if args.method is None and not args.auto:
        raise QuantizationError("pass --method (int8|int4|gptq|awq|smoothquant|fp8) or --auto --target cpu|gpu")
    if args.method is not None and args.auto:
        raise QuantizationError(f"--method {args.method} and --auto exclude each other (--auto picks the method "
                                "from the model's size and --target); drop one of them")
    if args.target is not None and not args.auto:
        raise QuantizationError(f"--target {args.target} applies with --auto only (it picks the method for that "
                                "device); drop --target, or use --auto instead of --method")
    opts = dict(group_size=args.group_size, symmetric=False if args.asymmetric else None,
                calib=args.calib, rules=args.config, n_calib=args.n_calib, calib_len=args.calib_len,
                act_order=True if args.act_order else None, alpha=args.alpha, fp8_scaling=args.fp8_scaling,
                include=tuple(s.strip() for s in args.include.split(",") if s.strip()) if args.include else None)
    opts = {k: v for k, v in opts.items() if v is not None}
    if args.method is not None and not args.auto:
        check_flags(args.method, opts)  # before the model loads
    prepare_output_dir(args.out, QuantizationError)  # before minutes of calibration, not after
    model = load_model(args.model)
    if getattr(model, "quantization_config", None):  # quantize() would refuse it without the path
        raise QuantizationError(f"{args.model} is already quantized ({model.quantization_config.get('method')}); "
                                "quantize the float checkpoint it was made from")
    method = args.method
    if args.auto:
        method, why = pick_auto(model.num_parameters(), args.target or "cpu")
        print(f"--auto picked {method}: {why}")
        # 4-bit-only flags, given for whichever method --auto picks; a --config rule making 4-bit
        # layers uses them with any method (plan.method_options)
        if METHODS[method]["format"] != "int4" and "rules" not in opts:
            if "group_size" in opts:
                print(f"--group-size {opts.pop('group_size')} does not apply to {method} (per output channel); "
                      "ignored")
            if "symmetric" in opts:
                del opts["symmetric"]
                print(f"--asymmetric does not apply to {method} (symmetric codes only); ignored")
        for key in [k for k in CALIB_OPTIONS if k in opts and not _takes(method, k)]:
            del opts[key]  # given for whichever method --auto picks; this one rounds without calibration
            print(f"{FLAGS[key]} does not apply to {method} (no calibration); ignored")
        check_flags(method, opts, auto_why=why)
    quantize(model, method, **opts)
    out = save_quantized(model, args.out)
    counts: dict[str, int] = {}
    for spec in model.quantization_config["modules"].values():
        counts[spec["format"]] = counts.get(spec["format"], 0) + 1
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {method} checkpoint to {out} ({human_bytes(size)} weights; modules: {json.dumps(counts)})")


def register(subparsers):
    from .formats import GROUP_SIZES
    from .onnx_nbits import BLOCKS

    s = subparsers.add_parser("quantize", help="quantize a checkpoint (int8, int4, GPTQ, AWQ, SmoothQuant, FP8)")
    s.add_argument("model", help="float checkpoint folder, hub id or .gguf file (a checkpoint this tool quantized "
                                 "is refused; a quantized GGUF's type is recorded, and verify allows for it)")
    s.add_argument("out", help="new or empty folder for the quantized checkpoint")
    s.add_argument("--method", type=str.lower, choices=list(METHODS), default=None,
                   help="int8: per-channel weight-only; int4: grouped round-to-nearest; gptq, awq: calibrated int4; "
                        "smoothquant: W8A8 (int8 weights and activations); fp8: e4m3 weights. Required unless --auto")
    s.add_argument("--group-size", type=positive_int, default=None,
                   help="int4, gptq, awq: weights per scale along each row (default 128). Any integer >= 1 that "
                        "divides the row length of every 4-bit layer; one that does not is refused, naming the "
                        f"layer. {', '.join(map(str, GROUP_SIZES))} are usual; an ONNX export keeps MatMulNBits "
                        f"for {', '.join(map(str, sorted(BLOCKS)))} only (other sizes stay float there)")
    s.add_argument("--asymmetric", action="store_true", help="int4 with zero points")
    s.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation energy")
    s.add_argument("--alpha", type=unit_fraction, default=None, help="SmoothQuant migration strength (default 0.5)")
    s.add_argument("--fp8-scaling", type=str.lower, choices=["tensor", "channel"], default=None,
                   help="fp8 only: one scale per output channel (default) or one for the whole weight")
    s.add_argument("--include", default=None, help="also quantize: embeddings,lm_head")
    s.add_argument("--calib", default=None,
                   help="gptq, awq, smoothquant: calibration text file (default: built-in stdlib text)")
    s.add_argument("--n-calib", type=positive_int, default=None,
                   help="gptq, awq, smoothquant: calibration sequences (default 16)")
    s.add_argument("--calib-len", type=positive_int, default=None,
                   help="gptq, awq, smoothquant: tokens per calibration sequence (default 256)")
    s.add_argument("--config", default=None, help='per-layer rules JSON: {"quant_cfg": {"<glob>": {...}}}')
    s.add_argument("--auto", action="store_true", help="pick the method from model size and --target")
    s.add_argument("--target", type=str.lower, choices=["cpu", "gpu"], default=None,
                   help="with --auto only: the hardware to pick for (default cpu: int8 up to 1.5 B parameters, "
                        "else gptq; gpu: smoothquant up to 3 B, else awq)")
    s.set_defaults(func=cmd_quantize)
