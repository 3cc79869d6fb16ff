"""One `MambaConfig` for Mamba1, Mamba2 and their variants, read from every config dialect.

Dialects:
- HF `config.json` (model_type mamba | falcon_mamba | mamba2), as transformers writes it, or as
  `mamba-deploy quantize` writes it (model_type QUANTIZED_MODEL_TYPE, the model's own under
  QUANTIZED_TYPE_KEY: `mark_quantized` / `unmark_quantized`);
- original `mamba_ssm` `config.json` (d_model, n_layer, ssm_cfg{layer, ...});
- mistral_inference `params.json` (dim, n_layers, n_groups, model_type "mamba"): Mamba-Codestral,
  a mamba_ssm Mamba2 under other names, every other setting at mamba_ssm's Mamba2 defaults;
- GGUF metadata (see `mamba_deploy.export.gguf`).

Names follow the papers / mamba_ssm (d_model, d_state, d_conv, headdim, ngroups, chunk_size).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelNotFoundError, UnsupportedArchitectureError

ARCHS = ("mamba1", "mamba2")
# model_type / architectures values we accept, mapped to (arch, dt_bc_rms).
HF_MODEL_TYPES = {
    "mamba": ("mamba1", False),
    "falcon_mamba": ("mamba1", True),
    "mamba2": ("mamba2", False),
}
HF_ARCHITECTURES = {
    "MambaForCausalLM": "mamba",
    "FalconMambaForCausalLM": "falcon_mamba",
    "Mamba2ForCausalLM": "mamba2",
}
# config.json of this toolkit's quantized checkpoints (quant.save_quantized): a model_type and an
# architecture no other loader knows, so that transformers' from_pretrained (and llama.cpp's
# converter) refuse the folder naming it, where the model's own model_type made transformers build
# the float model with random weights in place of the packed ones (a warning only). The model's
# own model_type is kept under QUANTIZED_TYPE_KEY; folders written before this (the model's own
# model_type beside quantization_config) still load.
QUANTIZED_MODEL_TYPE = "mamba_deploy_quantized"
QUANTIZED_ARCHITECTURE = "MambaDeployQuantized"
QUANTIZED_TYPE_KEY = "mamba_deploy_model_type"
QUANTIZED_NOTE_KEY = "note"
QUANTIZED_NOTE = ("weights quantized by mamba-deploy in its own packed format, which only mamba-deploy reads "
                  "(mamba_deploy.load_model(FOLDER), `mamba-deploy generate FOLDER`); transformers and llama.cpp "
                  "refuse this model_type on purpose (they would fill the model with random weights): give them "
                  f"the unquantized checkpoint. The model's own model_type is under {QUANTIZED_TYPE_KEY}.")
MAMBA_SSM_NORM_EPS = 1e-5  # mamba_ssm cannot store another
SUPPORTED = sorted(set(HF_MODEL_TYPES) | set(HF_ARCHITECTURES)) + ["mamba_ssm ssm_cfg.layer Mamba1|Mamba2",
                                                                  "mistral_inference model_type mamba"]
# The kind of every value `check_values` checks: MambaConfig's fields, plus the sizes some
# dialects store instead of ours (d_inner, nheads).
KINDS = {
    **dict.fromkeys(("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv", "expand",
                     "headdim", "ngroups", "chunk_size", "d_inner", "nheads"), "size"),
    **dict.fromkeys(("d_inner_override", "dt_rank"), "optional size"),
    **dict.fromkeys(("rms_norm_eps", "mixer_rms_eps"), "eps"),
    **dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), "token id"),
    **dict.fromkeys(("conv_bias", "bias", "tie_embeddings", "residual_in_fp32", "dt_bc_rms", "rmsnorm",
                     "norm_before_gate"), "flag"),
    "dt_limit": "range",
}
# sizes and ids past int32 are no model's (a size of 2**63 overflowed torch's shape arithmetic)
MAX_SIZE = 2**31 - 1
MAX_PAD_MULTIPLE = 4096  # pad_vocab_size_multiple may exceed the vocabulary up to this (tiny test vocabs)
# our name -> the key config.json spells it with, per dialect (for error messages)
HF_KEYS = dict(d_model="hidden_size", n_layer="num_hidden_layers", d_state="state_size", d_conv="conv_kernel",
               conv_bias="use_conv_bias", bias="use_bias", rms_norm_eps="layer_norm_epsilon",
               tie_embeddings="tie_word_embeddings", dt_rank="time_step_rank", d_inner_override="intermediate_size",
               headdim="head_dim", nheads="num_heads", ngroups="n_groups", rmsnorm="rms_norm",
               dt_limit="time_step_limit")
MAMBA_SSM_KEYS = dict(rms_norm_eps="norm_epsilon", **{k: f"ssm_cfg.{k}" for k in (
    "d_state", "d_conv", "expand", "conv_bias", "bias", "dt_rank", "headdim", "ngroups", "chunk_size", "rmsnorm",
    "norm_before_gate", "dt_limit")})
MISTRAL_KEYS = dict(d_model="dim", n_layer="n_layers", ngroups="n_groups")
DIALECT_KEYS = {"hf": HF_KEYS, "mamba_ssm": MAMBA_SSM_KEYS, "mistral": MISTRAL_KEYS}
# what sets d_inner and headdim in each dialect (mistral_inference fixes headdim at 64)
HEADDIM_KEYS = {"hf": "expand / head_dim / num_heads", "mamba_ssm": "d_model / ssm_cfg.expand / ssm_cfg.headdim",
                "mistral": "dim (mistral_inference's headdim is 64)"}
# HF hidden_act values that are SiLU (transformers' ACT2FN maps both to it)
SILU_NAMES = ("silu", "swish")
# the keyword arguments of mamba_ssm 2.x's Mamba / Mamba2 constructors, which ssm_cfg is passed to
# (besides "layer"); the init-only ones (dt_min, A_init_range...) do not change a trained model
_SSM_COMMON = {"d_state", "d_conv", "expand", "conv_bias", "bias", "dt_min", "dt_max", "dt_init_floor",
               "layer_idx", "device", "dtype"}
SSM_CFG_KEYS = {
    "Mamba1": _SSM_COMMON | {"dt_rank", "dt_init", "dt_scale", "use_fast_path"},
    "Mamba2": _SSM_COMMON | {"conv_init", "headdim", "d_ssm", "ngroups", "A_init_range", "D_has_hdim", "rmsnorm",
                             "norm_before_gate", "dt_limit", "chunk_size", "use_mem_eff_path", "process_group",
                             "sequence_parallel"},
}
# ssm_cfg values that change the weights' shapes or the function beyond what this toolkit builds
SSM_CFG_UNSUPPORTED = {"Mamba2": {"D_has_hdim": False}}
# What mistral_inference's MambaArgs requires (it has no defaults for them).
MISTRAL_REQUIRED = ("dim", "n_layers", "vocab_size", "n_groups", "residual_in_fp32", "pad_vocab_size_multiple",
                    "tie_embeddings")


@dataclass
class MambaConfig:
    arch: str  # "mamba1" | "mamba2"
    d_model: int
    n_layer: int
    vocab_size: int
    pad_vocab_size_multiple: int = 1
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_inner_override: int | None = None  # HF `intermediate_size` when it is not expand * d_model
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    # Mamba1
    dt_rank: int | None = None  # None = "auto" = ceil(d_model / 16)
    dt_bc_rms: bool = False  # Falcon-Mamba: weightless RMSNorm on dt, B, C after x_proj
    mixer_rms_eps: float = 1e-6
    # Mamba2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    rmsnorm: bool = True  # gated RMSNorm inside the mixer
    norm_before_gate: bool = False  # False: norm(y * silu(z)) (mamba_ssm + HF default)
    dt_limit: tuple[float, float] = (0.0, math.inf)
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # which dialect it came from, so `save` can write it back the same way
    source: str = "hf"
    hf_model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise UnsupportedArchitectureError(
                f"unknown arch {self.arch!r}; supported: {', '.join(ARCHS)}"
            )
        # every reader checks its own keys first; this catches direct and own-dict constructions
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in KINDS}
        for name, value in check_values(values, "config", "fix that value").items():
            setattr(self, name, value)
        if self.pad_vocab_size_multiple > max(self.vocab_size, MAX_PAD_MULTIPLE):
            # padding rows are zeros that are never produced: more of them than real ids is an edit
            # (a 90 KB model asked for a 128 GB embedding), not a model
            raise ConfigError(f"pad_vocab_size_multiple={self.pad_vocab_size_multiple} is larger than the vocabulary "
                              f"({self.vocab_size} ids) and than {MAX_PAD_MULTIPLE}; models pad to 8, 16 or 64: "
                              "fix that value in the model's config")
        if self.arch == "mamba2":
            if self.d_inner % self.headdim:
                raise ConfigError(f"d_inner={self.d_inner} is not a multiple of headdim={self.headdim}; check "
                                  f"{HEADDIM_KEYS.get(self.source, 'expand / headdim')} in the model's config")
            if self.nheads % self.ngroups:
                keys = [config_key(self, k) for k in ("ngroups", "nheads", "headdim")]
                raise ConfigError(f"nheads={self.nheads} is not a multiple of ngroups={self.ngroups}; check "
                                  f"{' / '.join(dict.fromkeys(keys))} in the model's config")

    # ---- derived sizes -------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.d_inner_override or self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    @property
    def conv_dim(self) -> int:
        """Channels that go through the causal conv: x (Mamba1) or x,B,C (Mamba2)."""
        if self.arch == "mamba1":
            return self.d_inner
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_size_multiple)
        return (self.vocab_size + m - 1) // m * m

    @property
    def conv_state_shape(self) -> tuple[int, int]:
        """Per sequence and layer: the last d_conv - 1 conv inputs."""
        return (self.conv_dim, self.d_conv - 1)

    @property
    def ssm_state_shape(self) -> tuple[int, ...]:
        if self.arch == "mamba1":
            return (self.d_inner, self.d_state)
        return (self.nheads, self.headdim, self.d_state)

    def state_numel(self) -> int:
        return self.n_layer * (math.prod(self.conv_state_shape) + math.prod(self.ssm_state_shape))

    # ---- readers -----------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        """Any supported dialect; dispatches on its keys."""
        _check_mapping(d, "MambaConfig.from_dict", "a config.json's contents (a dict); for a file, MambaConfig.from_file")
        return cls._read(dict(d), "config.json")

    @classmethod
    def _read(cls, d: dict, where: str) -> "MambaConfig":
        d = unmark_quantized(_decode_json_floats(d, where), where)
        model_type = d.get("model_type")
        if model_type is None and isinstance(d.get("architectures"), list):
            for a in d["architectures"]:
                if isinstance(a, str) and a in HF_ARCHITECTURES:
                    model_type = HF_ARCHITECTURES[a]
        if model_type is not None and not isinstance(model_type, str):
            raise ConfigError(f"{where}: model_type {model_type!r} is a {type(model_type).__name__}, not a name; "
                              f"write one of {', '.join(sorted(HF_MODEL_TYPES))} (or leave it out of a mamba_ssm "
                              "config)")
        if "hidden_size" not in d and (model_type is None or model_type in HF_MODEL_TYPES):
            if "dim" in d and "n_layers" in d:
                return cls._from_mistral(d, where)
            if "ssm_cfg" in d or ("d_model" in d and "n_layer" in d):
                return cls._from_mamba_ssm(d, where)
        # an HF config first by its model_type: state-spaces' *-hf configs (and every fine-tune
        # saved from them) still carry mamba_ssm's d_model / n_layer / ssm_cfg beside the HF keys
        if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"unknown model_type {model_type!r} (architectures={d.get('architectures')}); "
                f"supported: {', '.join(SUPPORTED)}"
            )
        return cls._from_hf(d, model_type, where)

    @classmethod
    def from_file(cls, path: str | Path) -> "MambaConfig":
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"MambaConfig.from_file takes a path (str or Path), got {type(path).__name__} {path!r:.60}")
        path = Path(path)
        fix = "re-download or re-save the config"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); {fix}") from e
        except RecursionError as e:  # arrays nested thousands deep: past the parser
            raise ConfigError(f"{path} is nested too deep to be a config ({type(e).__name__}); {fix}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e}); {fix}") from e
        except FileNotFoundError as e:
            raise ModelNotFoundError(f"no such config file: {path}; pass a checkpoint folder with a config.json") from e
        except IsADirectoryError as e:
            raise ConfigError(f"{path} is a folder, not a config file; {fix}") from e
        except OSError as e:
            raise ConfigError(f"cannot read {path} ({e.strerror or e}); check its permissions") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds a {type(d).__name__}, expected a JSON object")
        return cls._read(d, str(path))

    @classmethod
    def _from_hf(cls, d: dict, model_type: str, where: str = "config.json") -> "MambaConfig":
        arch, dt_bc_rms = HF_MODEL_TYPES[model_type]
        act = d.get("hidden_act", "silu")  # transformers' mixers apply ACT2FN[hidden_act]; this toolkit SiLU
        if act not in SILU_NAMES:
            raise UnsupportedArchitectureError(
                f"{where}: hidden_act={act!r}; only {' / '.join(map(repr, SILU_NAMES))} Mamba models are supported "
                "(the mixers here apply SiLU after the conv and to the gate)")
        try:
            common = dict(
                arch=arch,
                d_model=d["hidden_size"],
                n_layer=d["num_hidden_layers"],
                vocab_size=d["vocab_size"],
                d_state=d.get("state_size", 16 if arch == "mamba1" else 128),
                d_conv=d.get("conv_kernel", 4),
                expand=d.get("expand", 2),
                conv_bias=d.get("use_conv_bias", True),
                bias=d.get("use_bias", False),
                rms_norm_eps=d.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=d.get("tie_word_embeddings", arch == "mamba1"),
                residual_in_fp32=d.get("residual_in_fp32", True),
                # transformers builds exactly vocab_size rows and ignores pad_vocab_size_multiple
                # (older versions saved 8 in every config); only our own unpadded_vocab_size
                # marks rows that pad a smaller real vocabulary
                pad_vocab_size_multiple=(d.get("pad_vocab_size_multiple", 1)
                                         if d.get("unpadded_vocab_size") is not None else 1),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=_first(d.get("eos_token_id")),
                pad_token_id=d.get("pad_token_id"),
                source="hf",
                hf_model_type=model_type,
            )
        except KeyError as e:
            raise ConfigError(f"HF {model_type} {where} lacks required key {e.args[0]!r}") from e
        fix = "correct that value (or re-download the model's config.json)"
        if d.get("unpadded_vocab_size") is not None:  # written by to_hf_dict for a padded vocabulary
            common["vocab_size"] = _unpadded_vocab(d, where, fix)
        if arch == "mamba1":
            rank = d.get("time_step_rank", "auto")
            kw = check_values(dict(common, dt_rank=None if rank == "auto" else rank, dt_bc_rms=dt_bc_rms,
                                   mixer_rms_eps=d.get("mixer_rms_eps", 1e-6),
                                   d_inner_override=d.get("intermediate_size")), where, fix, HF_KEYS)
            if kw["d_inner_override"] == kw["expand"] * kw["d_model"]:
                kw["d_inner_override"] = None
            return cls(**kw)
        # transformers' Mamba2 always gates before the norm (it ignores norm_before_gate), and it
        # always builds and applies the gated norm (it ignores rms_norm: false, and saves the norm)
        kw = check_values(dict(common, headdim=d.get("head_dim", 64), ngroups=d.get("n_groups", 8),
                               chunk_size=d.get("chunk_size", 256), rmsnorm=True,
                               norm_before_gate=False, dt_limit=d.get("time_step_limit", (0.0, math.inf))),
                          where, fix, HF_KEYS)
        nheads = d.get("num_heads")
        d_inner = kw["expand"] * kw["d_model"]
        if nheads is not None:
            nheads = check_values({"nheads": nheads}, where, fix, HF_KEYS)["nheads"]
            if nheads * kw["headdim"] != d_inner:
                raise ConfigError(
                    f"num_heads * head_dim = {nheads}*{kw['headdim']} != expand * hidden_size = {d_inner}; "
                    f"fix num_heads or head_dim in {where}"
                )
        return cls(**kw)

    @classmethod
    def _from_mamba_ssm(cls, d: dict, where: str = "config.json") -> "MambaConfig":
        if not isinstance(d.get("ssm_cfg") or {}, dict):
            raise ConfigError(f"{where}: ssm_cfg={d['ssm_cfg']!r} must be an object like "
                              '{"layer": "Mamba2", "d_state": 128}; correct it or re-download the config')
        ssm = dict(d.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba1")
        if layer not in ("Mamba1", "Mamba2"):
            raise UnsupportedArchitectureError(
                f"unknown mamba_ssm ssm_cfg.layer {layer!r}; supported: {', '.join(SUPPORTED)}"
            )
        _check_ssm_cfg_keys(ssm, layer, where)
        if d.get("d_intermediate", 0) or d.get("attn_layer_idx"):
            raise UnsupportedArchitectureError(
                "hybrid mamba_ssm models (d_intermediate > 0 or attn_layer_idx) are not supported; "
                f"supported: {', '.join(SUPPORTED)}"
            )
        arch = "mamba1" if layer == "Mamba1" else "mamba2"
        _refuse_layernorm(d, where)
        missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"mamba_ssm {where} lacks required key {missing[0]!r}; re-download the config")
        kw = dict(
            d_model=d["d_model"],
            n_layer=d["n_layer"],
            vocab_size=d["vocab_size"],
            pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
            tie_embeddings=d.get("tie_embeddings", True),
            residual_in_fp32=d.get("residual_in_fp32", True),
            rms_norm_eps=d.get("norm_epsilon", MAMBA_SSM_NORM_EPS),
            d_state=ssm.get("d_state", 16 if arch == "mamba1" else 128),
            d_conv=ssm.get("d_conv", 4),
            expand=ssm.get("expand", 2),
            conv_bias=ssm.get("conv_bias", True),
            bias=ssm.get("bias", False),
        )
        if arch == "mamba1":
            rank = ssm.get("dt_rank", "auto")
            kw["dt_rank"] = None if rank == "auto" else rank
        else:
            kw.update(
                headdim=ssm.get("headdim", 64),
                ngroups=ssm.get("ngroups", 1),
                chunk_size=ssm.get("chunk_size", 256),
                rmsnorm=ssm.get("rmsnorm", True),
                norm_before_gate=ssm.get("norm_before_gate", False),
                dt_limit=ssm.get("dt_limit", (0.0, math.inf)),
            )
        fix = "correct that value (or re-download the model's config.json)"
        kw = check_values(kw, where, fix, MAMBA_SSM_KEYS)
        d_ssm = ssm.get("d_ssm")  # mamba_ssm Mamba2: the SSM on d_ssm channels, a gated MLP on the rest
        if arch == "mamba2" and d_ssm is not None and d_ssm != kw["expand"] * kw["d_model"]:
            raise UnsupportedArchitectureError(
                f"{where}: ssm_cfg.d_ssm={d_ssm!r} (an SSM over part of the expand * d_model = "
                f"{kw['expand'] * kw['d_model']} channels) is not supported; supported: {', '.join(SUPPORTED)}")
        return cls(arch=arch, source="mamba_ssm", **kw)

    @classmethod
    def _from_mistral(cls, d: dict, where: str = "params.json") -> "MambaConfig":
        """mistral_inference builds a mamba_ssm Mamba2 from these keys; the rest are its defaults."""
        if d.get("model_type") != "mamba":
            raise UnsupportedArchitectureError(
                f"{where} is a mistral_inference params.json with model_type {d.get('model_type', 'transformer')!r}"
                f" (a transformer); only model_type 'mamba' (Mamba-Codestral) is supported: {', '.join(SUPPORTED)}")
        missing = [k for k in MISTRAL_REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"mistral_inference {where} lacks required key {missing[0]!r}; re-download it")
        _refuse_layernorm(d, where)
        kw = dict(d_model=d["dim"], n_layer=d["n_layers"], vocab_size=d["vocab_size"], ngroups=d["n_groups"],
                  pad_vocab_size_multiple=d["pad_vocab_size_multiple"], tie_embeddings=d["tie_embeddings"],
                  residual_in_fp32=d["residual_in_fp32"], d_state=128, headdim=64)
        fix = "correct that value (or re-download the model's params.json)"
        return cls(arch="mamba2", source="mistral", **check_values(kw, where, fix, MISTRAL_KEYS))

    # ---- writers -----------------------------------------------------------
    def to_hf_dict(self) -> dict:
        common = {
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.padded_vocab_size,
            "state_size": self.d_state,
            "conv_kernel": self.d_conv,
            "expand": self.expand if self.arch == "mamba1" else self._saved_expand("transformers' Mamba2"),
            "use_conv_bias": self.conv_bias,
            "use_bias": self.bias,
            "layer_norm_epsilon": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "residual_in_fp32": self.residual_in_fp32,
            # an id the source lacks (a mamba_ssm config) is written as null, not left out:
            # transformers would read a missing one as its default, and Mamba2's eos default (2)
            # is an ordinary token of GPT-NeoX's vocabulary that would end generation there
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.padded_vocab_size != self.vocab_size:
            # transformers needs vocab_size = the embedding's rows; the real count (a mamba_ssm
            # model's 50277 of 50280) is kept beside it, so the padding rows stay masked
            common.update(unpadded_vocab_size=self.vocab_size, pad_vocab_size_multiple=self.pad_vocab_size_multiple)
        if self.arch == "mamba1":
            mt = "falcon_mamba" if self.dt_bc_rms else "mamba"
            extra = {
                "intermediate_size": self.d_inner,
                "time_step_rank": self.resolved_dt_rank,
            }
            if self.dt_bc_rms:
                extra["mixer_rms_eps"] = self.mixer_rms_eps
        else:
            mt = "mamba2"
            extra = {
                "num_heads": self.nheads,
                "head_dim": self.headdim,
                "n_groups": self.ngroups,
                "chunk_size": self.chunk_size,
                "rms_norm": True,
                # JSON has no Infinity; transformers' own encoding of it:
                "time_step_limit": [_encode_float(v) for v in self.dt_limit],
            }
            for flag, value in (("norm_before_gate", True), ("rmsnorm", False)):
                if getattr(self, flag) == value:
                    raise ConfigError(f"transformers' Mamba2 cannot express {flag}={value} (it always applies "
                                      "the gated RMSNorm, gate first); save with --format mamba_ssm instead")
        arch_name = {v: k for k, v in HF_ARCHITECTURES.items()}[mt]
        return {"architectures": [arch_name], "model_type": mt, **common, **extra}

    def _saved_expand(self, fmt: str) -> int:
        """expand as a format that sizes its layers from expand * d_model alone (mamba_ssm,
        transformers' Mamba2) must write it: d_inner / d_model, or ConfigError when that is not whole."""
        if self.d_inner == self.expand * self.d_model:
            return self.expand
        if self.d_inner % self.d_model == 0:
            return self.d_inner // self.d_model
        fix = ("save with --format hf" if self.arch == "mamba1" else
               "neither checkpoint format can hold it; export it to GGUF or ONNX instead")
        raise ConfigError(f"{fmt} has no intermediate size of its own: this model's d_inner {self.d_inner} is not "
                          f"a whole multiple of d_model {self.d_model}; {fix}")

    def to_mamba_ssm_dict(self) -> dict:
        if self.dt_bc_rms:
            raise ConfigError("mamba_ssm has no Falcon-Mamba (dt/B/C RMSNorm) layer; save with --format hf")
        if not math.isclose(self.rms_norm_eps, MAMBA_SSM_NORM_EPS, rel_tol=1e-9):
            # its config has no such field: MixerModel's and Mamba2's gated norm eps are fixed
            raise ConfigError(f"mamba_ssm fixes the RMSNorm epsilon at {MAMBA_SSM_NORM_EPS:g}; this model uses "
                              f"{self.rms_norm_eps:g}, which would change its outputs; save with --format hf")
        expand = self._saved_expand("mamba_ssm")
        # Mamba1 is mamba_ssm's default layer, left out as state-spaces' own configs do: llama.cpp's
        # converter names the architecture "{layer}ForCausalLM" and knows no Mamba1ForCausalLM
        ssm: dict[str, Any] = ({} if self.arch == "mamba1" else {"layer": "Mamba2"}) | {
            "d_state": self.d_state,
            "d_conv": self.d_conv,
            "expand": expand,
            "conv_bias": self.conv_bias,
            "bias": self.bias,
        }
        if self.arch == "mamba1":
            ssm["dt_rank"] = self.resolved_dt_rank
        else:
            ssm.update(
                headdim=self.headdim,
                ngroups=self.ngroups,
                chunk_size=self.chunk_size,
                rmsnorm=self.rmsnorm,
                norm_before_gate=self.norm_before_gate,
            )
            if self.dt_limit != (0.0, math.inf):  # mamba_ssm's default; it reads no {"__float__"}
                ssm["dt_limit"] = list(self.dt_limit)  # an infinite max is written as JSON's Infinity
        return {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": ssm,
            "attn_layer_idx": [],
            "attn_cfg": {},
            "rms_norm": True,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    def to_dict(self) -> dict:
        """Plain dump of our own fields (manifests, GGUF round trips)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["dt_limit"] = [_encode_float(v) for v in self.dt_limit]
        return d

    @classmethod
    def from_own_dict(cls, d: dict) -> "MambaConfig":
        _check_mapping(d, "MambaConfig.from_own_dict", "a dict of MambaConfig's fields (config.to_dict())")
        d = _decode_json_floats(dict(d))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw) -> "MambaConfig":
        d = asdict(self)
        d.update(kw)
        return MambaConfig(**d)


def mark_quantized(hf: dict) -> dict:
    """An HF config dict (`to_hf_dict`) as a quantized checkpoint's config.json writes it: the
    model_type and architectures QUANTIZED_MODEL_TYPE / QUANTIZED_ARCHITECTURE, the model's own
    model_type under QUANTIZED_TYPE_KEY, and a note saying what the folder is."""
    head = {"architectures": [QUANTIZED_ARCHITECTURE], "model_type": QUANTIZED_MODEL_TYPE,
            QUANTIZED_TYPE_KEY: hf["model_type"], QUANTIZED_NOTE_KEY: QUANTIZED_NOTE}
    return {**head, **{k: v for k, v in hf.items() if k not in head}}


def _check_mapping(d, what: str, want: str) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{what} takes {want}, got {type(d).__name__} {d!r:.60}")


def unmark_quantized(d: dict, where: str = "config.json") -> dict:
    """`d` with a quantized checkpoint's own model_type (and its architecture) back in place of
    QUANTIZED_MODEL_TYPE (`mark_quantized`); any other config as it is."""
    if d.get("model_type") != QUANTIZED_MODEL_TYPE:
        return d
    own = d.get(QUANTIZED_TYPE_KEY)
    fix = "re-create the folder with `mamba-deploy quantize`"
    if not isinstance(own, str) or own not in HF_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {QUANTIZED_MODEL_TYPE!r} (a mamba-deploy quantized checkpoint) needs "
                          f"{QUANTIZED_TYPE_KEY} = one of {', '.join(sorted(HF_MODEL_TYPES))}, got {own!r}; {fix}")
    if not isinstance(d.get("quantization_config"), dict):
        raise ConfigError(f"{where}: model_type {QUANTIZED_MODEL_TYPE!r} (a mamba-deploy quantized checkpoint) has no "
                          f"quantization_config object; {fix}")
    arch = {v: k for k, v in HF_ARCHITECTURES.items()}[own]
    return {**d, "model_type": own, "architectures": [arch]}


def config_key(cfg: MambaConfig, name: str) -> str:
    """How the config file `cfg` was read from spells our field `name` (tie_embeddings ->
    tie_word_embeddings in an HF config.json), for messages that tell the user what to edit."""
    return DIALECT_KEYS.get(cfg.source, {}).get(name, name)


def _unpadded_vocab(d: dict, where: str, fix: str) -> int:
    """An HF config's unpadded_vocab_size, checked to pad up to its vocab_size (the embedding's rows)."""
    v = check_values({"vocab_size": d["unpadded_vocab_size"], "pad_vocab_size_multiple":
                      d.get("pad_vocab_size_multiple", 1)}, where, fix, {"vocab_size": "unpadded_vocab_size"})
    n, m = v["vocab_size"], v["pad_vocab_size_multiple"]
    if (n + m - 1) // m * m != d["vocab_size"]:
        raise ConfigError(f"{where}: unpadded_vocab_size={n} padded to a multiple of pad_vocab_size_multiple={m} "
                          f"is not vocab_size={d['vocab_size']!r}; {fix}")
    return n


def _check_ssm_cfg_keys(ssm: dict, layer: str, where: str) -> None:
    """mamba_ssm passes ssm_cfg to its Mamba / Mamba2 constructor, which raises on an unknown key:
    a misspelt one (norm_befor_gate) must not load as the default; a known one this toolkit cannot
    build is named, not left to a weight-shape mismatch."""
    unknown = sorted(set(ssm) - SSM_CFG_KEYS[layer])
    if unknown:
        raise ConfigError(f"{where}: ssm_cfg has {', '.join(map(repr, unknown))}, which mamba_ssm's {layer} does not "
                          f"take (it raises on them too); its keys are {', '.join(sorted(SSM_CFG_KEYS[layer]))}: "
                          "correct the spelling or remove the key")
    for key, ok in SSM_CFG_UNSUPPORTED.get(layer, {}).items():
        if key in ssm and ssm[key] != ok:
            raise UnsupportedArchitectureError(f"{where}: ssm_cfg.{key}={ssm[key]!r} is not supported (only {ok!r}); "
                                               f"supported: {', '.join(SUPPORTED)}")


def _refuse_layernorm(d: dict, where: str) -> None:
    """mamba_ssm's rms_norm=false builds LayerNorm blocks (with biases), which this toolkit does not implement."""
    value = d.get("rms_norm", True)
    if value is False:
        raise UnsupportedArchitectureError(
            f"{where} has rms_norm=false: mamba_ssm then uses LayerNorm blocks, which are not supported "
            f"(only RMSNorm); supported: {', '.join(SUPPORTED)}")
    if value is not True:
        raise ConfigError(f"{where}: rms_norm={value!r} must be true or false; correct it or re-download the config")


def check_values(values: dict, where: str, fix: str, keys: dict | None = None) -> dict:
    """`values` (name -> raw value) with those named in KINDS checked and normalised (256.0 -> 256,
    a dt_limit list -> a float pair), or a ConfigError naming the value and its key as `where`
    spells it (`keys`: our name -> the dialect's), then `fix`. Every reader runs it before any
    arithmetic on the values, so that a bad one is never a ZeroDivisionError or TypeError later."""
    out = {}
    for name, value in values.items():
        problem, out[name] = _check(KINDS[name], value) if name in KINDS else (None, value)
        if problem:
            raise ConfigError(f"{where}: {(keys or {}).get(name, name)}={value!r} {problem}; {fix}")
    return out


def _check(kind: str, value) -> tuple[str | None, Any]:
    """(None, normalised value), or (what is wrong, value)."""
    if kind == "flag":
        return (None, value) if isinstance(value, bool) else ("must be true or false", value)
    if kind == "range":
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(_real(v) for v in value):
            lo, hi = float(value[0]), float(value[1])
            if 0 <= lo < hi:  # NaN fails both
                return None, (lo, hi)
        return "must be a pair [min, max] with 0 <= min < max (max may be Infinity)", value
    if kind == "eps":
        ok = _real(value) and math.isfinite(value) and value > 0
        return (None, float(value)) if ok else ("must be a finite number > 0, e.g. 1e-05", value)
    if value is None and kind in ("token id", "optional size"):
        return None, None
    low = 0 if kind == "token id" else 1
    n = _int(value)
    if n is None or not low <= n <= MAX_SIZE:
        return f"must be an integer in {low}..{MAX_SIZE}" + (" or null" if kind == "token id" else ""), value
    return None, n


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(v) -> int | None:
    """An int, or an int-valued float (256.0) as int; None for anything else (bools, strings, 256.5)."""
    if not _real(v):
        return None
    if isinstance(v, numbers.Integral):
        return int(v)
    return int(v) if math.isfinite(v) and v == int(v) else None


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def _encode_float(v: float):
    return {"__float__": "Infinity"} if v == math.inf else v


def _decode_json_floats(obj, where: str = "config"):
    """transformers saves inf as {"__float__": "Infinity"}; python json may give float('inf')."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            try:
                return float(obj["__float__"])
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: cannot read float encoding {obj!r} (transformers writes "
                                  '{"__float__": "Infinity"}); correct that value or re-download the config') from e
        return {k: _decode_json_floats(v, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_json_floats(v, where) for v in obj]
    return obj
