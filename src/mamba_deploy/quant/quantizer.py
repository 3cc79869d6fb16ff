"""Offline quantization: plan -> (calibrate) -> swap modules in place -> `save_quantized`."""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..errors import QuantizationError
from . import algos
from .calib import CALIB_LEN, CALIB_SEQS, calibration_ids, run_blockwise
from .modules import QuantEmbedding, QuantLinear, tie_head
from .plan import METHODS, OPTIONAL_MODULES, build_plan, make_config, method_options, weight_read
from .runtime import saved_tensors, set_module

# method -> the stored format its calibration algorithm handles; other modules use rounding
ALGO_FORMAT = {"gptq": "int4", "awq": "int4", "smoothquant": "w8a8"}


@torch.no_grad()
def quantize(model, method: str, **options):
    """Quantize `model` in place and return it; `save_quantized(model, out_dir)` then writes the
    quantized checkpoint (the CLI's `quantize MODEL OUT` does both), and `load_model(out_dir)`
    swaps the quantized modules back in.

    method: int8 | int4 | gptq | awq | smoothquant | fp8. Options (defaults in plan.METHODS):
    group_size, symmetric, act_order, damp (gptq), grid (awq), alpha (smoothquant),
    fp8_scaling ("tensor" | "channel"), include=("embeddings", "lm_head"), rules (quant_cfg JSON
    path or dict), calib (text file / None for built-in), calib_ids (LongTensor), n_calib, calib_len,
    progress. The calibration data (calib, calib_ids, n_calib, calib_len) is taken by every method,
    so one call site can loop over methods, and used by the calibrated ones (gptq, awq,
    smoothquant, and any a `rules` entry picks); a method setting another method has (damp,
    alpha, ...) is refused. The CLI refuses --calib for the others: a flag typed by hand that
    does nothing is a mistake.
    """
    from ..model import MambaLM

    if not isinstance(model, MambaLM):  # a path: the export functions take those, quantize does not
        raise QuantizationError(f"quantize takes a loaded model, got {type(model).__name__} {model!r:.60}; load it "
                                "with mamba_deploy.load_model(path) first")
    if getattr(model, "quantization_config", None):
        raise QuantizationError("this model is already quantized; load the float checkpoint and quantize that")
    from ..tp import refuse_sharded

    refuse_sharded(model, "quantizing", "quantize the model loaded in one process (tensor parallelism runs "
                   "unquantized models only)", QuantizationError)
    opts = method_options(method, options)
    plan = {k: v for k, v in build_plan(model, opts).items() if v is not None}
    _refuse_unused_options(method, options, plan)
    if not plan:  # a checkpoint that quantizes nothing is one no loader takes
        raise QuantizationError("the rules leave no module to quantize (every one has enable: false); enable at "
                                "least one, or keep the float checkpoint (mamba-deploy convert re-saves it)")
    _check_groups(model, plan)  # before any work: a bad rule for the last layer failed after the others
    originals = {n: model.get_submodule(n) for n in plan}
    try:
        _quantize_plan(model, method, opts, plan)
    except BaseException:  # a refusal or Ctrl-C part-way: the model is left as it came, not half-quantized
        for n, module in originals.items():
            set_module(model, n, module)
        raise
    return model


# the options of a method's own algorithm, which runs on the layers of its format only
ALGO_OPTIONS = ("calib", "calib_ids", "n_calib", "calib_len", "act_order", "damp", "block_size", "grid", "clip",
                "alpha")


def _refuse_unused_options(method: str, options: dict, plan: dict) -> None:
    """Options given when the method and the rules leave no layer they act on: they would be
    recorded and do nothing (a --calib file was never even opened). The 4-bit options
    (--group-size, --asymmetric; method_options refuses them without rules) need int4 layers; the
    method's algorithm options (calibration, --act-order, --alpha) and --fp8-scaling, layers of
    the method's format."""
    int4 = [(k, flag) for k, flag, on in (("group_size", "--group-size", options.get("group_size") is not None),
                                          ("symmetric", "--asymmetric", options.get("symmetric") is False)) if on]
    if int4 and METHODS[method]["format"] != "int4" and not any(s["format"] == "int4" for s in plan.values()):
        raise QuantizationError(f"{', '.join(f'{k}={options[k]}' for k, _ in int4)} applies to int4 layers, and "
                                f"neither --method nor the rules make any: drop {' / '.join(f for _, f in int4)}, or "
                                "give a rule format 'int4'")
    algo = method in ALGO_FORMAT  # its algorithm skips the layers whose weight is read (weight_read)
    fmt = ALGO_FORMAT.get(method) or ("fp8" if method == "fp8" else None)
    given = [k for k in (ALGO_OPTIONS if algo else ("fp8_scaling",)) if options.get(k) is not None] if fmt else []
    # the algorithm runs on the layers' linears (_quantize_plan): an int4 lm_head is rounded
    if given and not any(s["format"] == fmt and not (algo and (weight_read(n) or not n.startswith("backbone.layers.")))
                         for n, s in plan.items()):
        raise QuantizationError(f"{', '.join(f'{k}={options[k]!r:.40}' for k in given)} applies to {method}'s {fmt} "
                                f"layers, and the rules leave none: drop {'it' if len(given) == 1 else 'them'}, "
                                f"or give a rule format '{fmt}'")


def _check_groups(model, plan: dict) -> None:
    from .formats import check_group

    for n, spec in plan.items():
        if spec.get("group_size") is not None:
            module = model.get_submodule(n)
            check_group(n, getattr(module, "in_features", None) or module.embedding_dim, spec["group_size"])


def _quantize_plan(model, method: str, opts: dict, plan: dict) -> None:
    done: dict[str, dict] = {}
    emb = OPTIONAL_MODULES["embeddings"]
    if emb in plan:
        _swap(model, emb, plan[emb], done)
    by_layer: dict[int, list[str]] = {}
    for n in plan:
        if n.startswith("backbone.layers."):
            by_layer.setdefault(int(n.split(".")[2]), []).append(n)
    algo_fmt = ALGO_FORMAT.get(method)
    progress = opts.get("progress", True)
    # the modules the method's algorithm handles (its format, called on an activation); the rest round
    targets = {i: [n for n in names if plan[n]["format"] == algo_fmt and not weight_read(n)]
               for i, names in by_layer.items()}
    if algo_fmt and any(targets.values()):
        ids = calibration_ids(model, opts.get("calib_ids", opts.get("calib")),
                              opts.get("n_calib") or CALIB_SEQS, opts.get("calib_len") or CALIB_LEN)

        def quantize_block(i, stats):
            for n in by_layer.get(i, []):
                st = stats.get(n) if n in targets[i] else None
                _swap(model, n, plan[n], done, method if st is not None else None, st, opts)

        run_blockwise(model, ids, targets, quantize_block, need_hessian=method == "gptq", progress=progress)
    else:
        for i in tqdm(sorted(by_layer), desc=f"{method} layers", disable=not progress):
            for n in by_layer[i]:
                _swap(model, n, plan[n], done)
    if "lm_head" in plan:
        _swap_head(model, plan, done)
    model.quantization_config = make_config(method, opts, done)
    model.quantized_in_memory = True  # its source_path still holds the float checkpoint


def _swap(model, name, spec, done, algo=None, stats=None, opts=None):
    old = model.get_submodule(name)
    if isinstance(old, torch.nn.Embedding):
        new = QuantEmbedding.from_embedding(old, spec["format"], name, spec.get("group_size"),
                                            spec.get("symmetric", True), spec.get("fp8_scaling", "channel"))
    else:
        new = _quant_linear(old, name, spec, algo, stats, opts)
    set_module(model, name, new)
    done[name] = {**spec, "algo": algo or "rtn", **({"input_scale": True} if getattr(new, "input_scale", None) is not None else {})}


def _quant_linear(lin, name, spec, algo, stats, opts):
    fmt, gs, sym = spec["format"], spec.get("group_size"), spec.get("symmetric", True)
    if algo == "gptq":  # group sizes: checked for the whole plan before any work (_check_groups)
        tensors = algos.gptq(lin.weight, stats.hessian, gs, sym, bool(opts["act_order"]), float(opts["damp"]),
                             int(opts["block_size"]), name=name)
        m = QuantLinear(lin.in_features, lin.out_features, fmt, gs, sym, lin.bias is not None,
                        compute_dtype=lin.weight.dtype).to(lin.weight.device)
        for k, t in tensors.items():
            getattr(m, k).copy_(t)
        if lin.bias is not None:
            m.bias.data.copy_(lin.bias.data)
        return m
    weight = input_scale = None
    if algo == "awq":
        weight, input_scale = algos.awq(lin.weight, stats.X, stats.mean_abs, gs, sym, int(opts["grid"]),
                                          bool(opts["clip"]))
    elif algo == "smoothquant":
        weight, input_scale = algos.smoothquant(lin.weight, stats.absmax, float(opts["alpha"]))
    return QuantLinear.from_linear(lin, fmt, name, gs, sym, spec.get("fp8_scaling", "channel"),
                                   input_scale, weight)


def _swap_head(model, plan, done):
    emb = OPTIONAL_MODULES["embeddings"]
    if model.config.tie_embeddings and isinstance(model.backbone.embeddings, QuantEmbedding):
        # build_plan refused different formats for the two (before calibration)
        assert plan["lm_head"] == plan.get(emb), (plan["lm_head"], plan.get(emb))
        e = model.backbone.embeddings
        head = QuantLinear(e.embedding_dim, e.num_embeddings, e.fmt, e.group_size, e.symmetric,
                           fp8_scaling=e.fp8_scaling, compute_dtype=e.compute_dtype).to(e.qweight.device)
        tie_head(head, e)
        set_module(model, "lm_head", head)
        done["lm_head"] = dict(done[emb])
    else:
        _swap(model, "lm_head", plan["lm_head"], done)


def save_quantized(model, out_dir):
    """Write config.json (with quantization_config, under config.QUANTIZED_MODEL_TYPE) +
    model.safetensors (+ tokenizer files); atomically, through checkpoint.write_folder.
    `load_model(out_dir)` loads it; transformers' from_pretrained refuses it by its model_type."""
    from ..checkpoint import write_folder
    from ..tokenizer_files import tokenizer_source

    qc = getattr(model, "quantization_config", None)
    if not qc:
        raise QuantizationError("model is not quantized; call mamba_deploy.quant.quantize(model, method) first")
    from ..checkpoint import SOURCE_WEIGHTS, saved_source_weights
    from ..config import mark_quantized

    # a model_type only this toolkit reads: transformers refuses the folder, not loads random weights
    config = mark_quantized(model.config.to_hf_dict())
    config["quantization_config"] = qc
    label = saved_source_weights(model)  # quantized from a quantized GGUF: its rounding is in there too
    if label:
        config[SOURCE_WEIGHTS] = label
    tensors = {k: _narrowest_exact(t) for k, t in saved_tensors(model).items()}
    return write_folder(out_dir, config, tensors, tokenizer_source(model))


def _narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor whose values are all 16-bit floats (a float16 / bfloat16 source loaded in
    float32) is stored in that width: the float remainder of a 16-bit checkpoint no longer
    doubles in size, and reloading gives the same values bit for bit."""
    if t.dtype != torch.float32:
        return t
    for dt in (torch.bfloat16, torch.float16):
        n = t.to(dt)
        if torch.equal(n.float(), t):
            return n
    return t
