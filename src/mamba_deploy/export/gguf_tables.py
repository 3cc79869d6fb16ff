"""GGUF format facts for Mamba / Mamba2, as llama.cpp reads them; shared by export and import.

Everything here is data: metadata keys, tensor names with their value transforms, output types,
which tensors stay F32, quantization fallbacks, tokenizer pre-tokenizer names. The facts were
looked up in llama.cpp (gguf-py constants, convert_hf_to_gguf.py MambaModel / Mamba2Model,
src/llama-model.cpp, src/llama-quant.cpp); the code around them is ours.

Shapes: the `gguf` package takes numpy arrays in row-major order; ggml's `ne` is the reverse,
so a torch (out, in) weight becomes ne {in, out}, which is what llama.cpp expects.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT
from gguf import TokenType

# general.* keys this project reads
ARCH_KEY, NAME_KEY, FILE_TYPE_KEY = "general.architecture", "general.name", "general.file_type"
# our MambaConfig.arch <-> general.architecture
GGUF_ARCH = {"mamba1": "mamba", "mamba2": "mamba2"}
ARCH_FROM_GGUF = {v: k for k, v in GGUF_ARCH.items()}

CONTEXT_LENGTH_KEY = "{arch}.context_length"
# llama.cpp reads these although Mamba has no attention / FFN; the converter writes them so.
FIXED_KEYS = {
    CONTEXT_LENGTH_KEY: 2**20,
    "{arch}.feed_forward_length": 0,
    "{arch}.attention.head_count": 0,
}

# tensor types GGUF has for other data (integers, doubles), which no llama.cpp weight takes: its
# matmul segfaulted on an I8 weight and an I32 embedding aborted the process
NOT_WEIGHT_TYPES = frozenset({QT.I8, QT.I16, QT.I32, QT.I64, QT.F64})

# Mamba1: the dt projection rank; Mamba2: the head count (llama.cpp reuses the key)
TIME_STEP_RANK_KEY = "{arch}.ssm.time_step_rank"
# (gguf key, MambaConfig attribute or callable(cfg), value kind, arches that carry it)
# value kinds: "u32", "f32", "bool"
CONFIG_KEYS = [
    ("{arch}.embedding_length", "d_model", "u32", ("mamba1", "mamba2")),
    ("{arch}.block_count", "n_layer", "u32", ("mamba1", "mamba2")),
    ("{arch}.ssm.conv_kernel", "d_conv", "u32", ("mamba1", "mamba2")),
    ("{arch}.ssm.inner_size", "d_inner", "u32", ("mamba1", "mamba2")),
    ("{arch}.ssm.state_size", "d_state", "u32", ("mamba1", "mamba2")),
    (TIME_STEP_RANK_KEY, lambda c: c.resolved_dt_rank if c.arch == "mamba1" else c.nheads, "u32", ("mamba1", "mamba2")),
    ("{arch}.ssm.group_count", "ngroups", "u32", ("mamba2",)),
    ("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32", ("mamba1", "mamba2")),
    ("{arch}.ssm.dt_b_c_rms", "dt_bc_rms", "bool", ("mamba1",)),
]

# Our own keys for what llama.cpp does not model; llama.cpp ignores unknown keys. On import
# they restore the exact config; files from other converters simply lack them.
OWN_PREFIX = "mamba_deploy."
OWN_KEYS = [
    ("vocab_size", "u32"),  # real vocab (rows past it only pad the embedding)
    ("mixer_rms_eps", "f32"),  # Falcon-Mamba dt/B/C norm eps (llama.cpp uses the layer eps)
    ("chunk_size", "u32"),
    ("residual_in_fp32", "bool"),
    ("dt_limit", "f32x2"),
    ("pad_vocab_size_multiple", "u32"),
    ("bos_token_id", "u32"),
    ("eos_token_id", "u32"),
    ("pad_token_id", "u32"),
]
# the weight type of the model this GGUF was made from when that was itself rounded (a quantized
# GGUF, or a checkpoint converted from one): verify holds the file to the looser of it and its own type
SOURCE_WEIGHTS_KEY = OWN_PREFIX + "source_weights"


# ----------------------------------------------------------------------------- tensors
# value transforms between our parameter and the GGUF tensor (numpy float32 arrays).
# A_log -> A = -exp(A_log) in float64, so the round trip is as exact as float32 allows.
def _a_from_log(x, cfg):
    a = -np.exp(x.astype(np.float64)).astype(np.float32)
    return a.reshape(-1, 1) if cfg.arch == "mamba2" else a  # Mamba2: (h,) -> (h, 1)


def _log_from_a(a, cfg):
    x = np.log(-a.astype(np.float64)).astype(np.float32)
    return x.reshape(-1) if cfg.arch == "mamba2" else x


def _col(x, cfg):  # Mamba2 D: (h,) -> (h, 1), broadcast shape llama.cpp expects
    return x.reshape(-1, 1) if cfg.arch == "mamba2" else x


def _uncol(x, cfg):
    return x.reshape(-1) if cfg.arch == "mamba2" else x


def _squeeze_conv(w, cfg):  # (C, 1, k) depthwise conv -> (C, k), ne {k, C}
    return w.reshape(w.shape[0], w.shape[-1])


def _unsqueeze_conv(w, cfg):
    return w.reshape(w.shape[0], 1, w.shape[-1])


def _group_norm(w, cfg):  # Mamba2 gated norm is per group: (d_inner,) -> (ngroups, d_inner/ngroups)
    return w.reshape(cfg.ngroups, cfg.d_inner // cfg.ngroups)


def _ungroup_norm(w, cfg):
    return w.reshape(-1)


def _same(x, cfg):
    return x


# our parameter name -> (gguf name, to_gguf, from_gguf, arches); {bid} = layer index
EMBED_TENSOR, OUTPUT_TENSOR = "token_embd.weight", "output.weight"  # no output.weight: tied embeddings
DEFAULT_ALIGNMENT = 32  # general.alignment when a file does not set it (GGUF spec, gguf-py)
ALIGNMENT_KEY = "general.alignment"
TENSORS = [
    ("backbone.embeddings.weight", EMBED_TENSOR, _same, _same, ("mamba1", "mamba2")),
    ("backbone.norm_f.weight", "output_norm.weight", _same, _same, ("mamba1", "mamba2")),
    ("lm_head.weight", OUTPUT_TENSOR, _same, _same, ("mamba1", "mamba2")),  # untied only
    ("backbone.layers.{bid}.norm.weight", "blk.{bid}.attn_norm.weight", _same, _same, ("mamba1", "mamba2")),
    ("backbone.layers.{bid}.mixer.in_proj.weight", "blk.{bid}.ssm_in.weight", _same, _same, ("mamba1", "mamba2")),
    ("backbone.layers.{bid}.mixer.conv1d.weight", "blk.{bid}.ssm_conv1d.weight", _squeeze_conv, _unsqueeze_conv,
     ("mamba1", "mamba2")),
    ("backbone.layers.{bid}.mixer.conv1d.bias", "blk.{bid}.ssm_conv1d.bias", _same, _same, ("mamba1", "mamba2")),
    ("backbone.layers.{bid}.mixer.x_proj.weight", "blk.{bid}.ssm_x.weight", _same, _same, ("mamba1",)),
    ("backbone.layers.{bid}.mixer.dt_proj.weight", "blk.{bid}.ssm_dt.weight", _same, _same, ("mamba1",)),
    ("backbone.layers.{bid}.mixer.dt_proj.bias", "blk.{bid}.ssm_dt.bias", _same, _same, ("mamba1",)),
    ("backbone.layers.{bid}.mixer.dt_bias", "blk.{bid}.ssm_dt.bias", _same, _same, ("mamba2",)),
    ("backbone.layers.{bid}.mixer.A_log", "blk.{bid}.ssm_a", _a_from_log, _log_from_a, ("mamba1", "mamba2")),
    ("backbone.layers.{bid}.mixer.D", "blk.{bid}.ssm_d", _col, _uncol, ("mamba1", "mamba2")),
    ("backbone.layers.{bid}.mixer.norm.weight", "blk.{bid}.ssm_norm.weight", _group_norm, _ungroup_norm,
     ("mamba2",)),
    ("backbone.layers.{bid}.mixer.out_proj.weight", "blk.{bid}.ssm_out.weight", _same, _same, ("mamba1", "mamba2")),
]


def keep_f32(gguf_name: str, ndim: int) -> bool:
    """Tensors every outtype keeps in F32 (as llama.cpp's converter and quantizer do): 1-D
    tensors, norms, anything not named `.weight` (biases, ssm_a, ssm_d) and the small conv."""
    return (ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
            or "ssm_conv1d" in gguf_name)


# ----------------------------------------------------------------------------- output types
# outtype -> (general.file_type, tensor type written in Python, or None = llama.cpp's quantizer)
OUTTYPES = {
    "f32": (FT.ALL_F32, QT.F32),
    "f16": (FT.MOSTLY_F16, QT.F16),
    "bf16": (FT.MOSTLY_BF16, QT.BF16),
    "q8_0": (FT.MOSTLY_Q8_0, QT.Q8_0),
    "q4_0": (FT.MOSTLY_Q4_0, QT.Q4_0),
    "q4_1": (FT.MOSTLY_Q4_1, QT.Q4_1),
    "q5_0": (FT.MOSTLY_Q5_0, QT.Q5_0),
    "q5_1": (FT.MOSTLY_Q5_1, QT.Q5_1),
    "q2_k": (FT.MOSTLY_Q2_K, None),
    "q3_k_m": (FT.MOSTLY_Q3_K_M, None),
    "q4_k_m": (FT.MOSTLY_Q4_K_M, None),
    "q5_k_m": (FT.MOSTLY_Q5_K_M, None),
    "q6_k": (FT.MOSTLY_Q6_K, None),
}
# main tensor type of each llama.cpp-quantized outtype (for the fallback warning)
LLAMACPP_MAIN_TYPE = {"q2_k": QT.Q2_K, "q3_k_m": QT.Q3_K, "q4_k_m": QT.Q4_K, "q5_k_m": QT.Q5_K, "q6_k": QT.Q6_K}
# a type whose block does not divide the row length -> the type llama.cpp falls back to;
# if that does not fit either, F16 (llama-quant.cpp; Q2_K / Q3_K fall back to Q4_0 there, the
# IQ quants to IQ4_NL)
FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
FINAL_FALLBACK = QT.F16


# ----------------------------------------------------------------------------- tokenizer
TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE
# SentencePiece BPE (Llama / Mistral / Mamba-Codestral tokenizer.model): llama.cpp's "SPM"
# vocabulary merges pieces by their scores, as sentencepiece's BPE encoder does
SPM_TOKENIZER_MODEL = "llama"
SPM_PRE = "default"
SPM_PAD_SCORE = -1000.0  # score of the unused rows that pad the vocab to the embedding (as llama.cpp's converter)
SPM_BPE = 2  # sentencepiece ModelProto.TrainerSpec.ModelType: UNIGRAM 1, BPE 2, WORD 3, CHAR 4
SPM_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
# sentencepiece ModelProto.SentencePiece.Type -> gguf TokenType (the same numbers, kept explicit)
SPM_TOKEN_TYPES = {1: TokenType.NORMAL, 2: TokenType.UNKNOWN, 3: TokenType.CONTROL, 4: TokenType.USER_DEFINED,
                   5: TokenType.UNUSED, 6: TokenType.BYTE}
# llama.cpp's defaults for a key a GGUF lacks (llama-vocab.cpp), per tokenizer.ggml.model
ADD_BOS_DEFAULT = {TOKENIZER_MODEL: False, SPM_TOKENIZER_MODEL: True}
ADD_SPACE_PREFIX_KEY = "tokenizer.ggml.add_space_prefix"
SCORES_KEY = "tokenizer.ggml.scores"
# tokenizer.json pre_tokenizer signature -> tokenizer.ggml.pre; llama.cpp's GPT-2 regex is the
# one `ByteLevel(use_regex=True)` applies.
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Sequence", "ByteLevel"): "gpt-2",
}
PAD_TOKEN = "[PAD{id}]"  # unused rows of a padded vocab, as llama.cpp's converter names them
SPECIAL_KEYS = {  # tokenizer_config / config name -> gguf key
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}
TOKENIZER_MODEL_KEY, TOKENIZER_PRE_KEY = "tokenizer.ggml.model", "tokenizer.ggml.pre"
TOKENS_KEY, TOKEN_TYPE_KEY, MERGES_KEY = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"
ADD_EOS_KEY = "tokenizer.ggml.add_eos_token"
# tokens that end generation besides the EOS, as llama.cpp's end-of-generation set has them
END_TOKEN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# The rest of llama.cpp's end-of-generation set (llama-vocab.cpp, as in llama-cpp-python 0.3.36,
# probed one token at a time): tokens it recognises by their text, whatever their type...
EOG_TOKEN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|eom_id|>",
                   "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "[EOT]", "<｜end▁of▁sentence｜>",
                   "</s>", "<eos>")
# ...except "<|end|>" beside both of these (gpt-oss ends a message there, a turn at <|return|> / <|call|>)...
EOG_END_UNLESS = ("<|end|>", ("<|return|>", "<|call|>"))
# ...and the FIM pad / repo / file-separator tokens: the key's id, else a token with one of these texts
EOG_ROLE_TEXTS = {
    "tokenizer.ggml.fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "tokenizer.ggml.fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "tokenizer.ggml.fim_sep_token_id": ("<|file_sep|>",),
}
# Re-export of a .gguf writes back the source's keys under these prefixes that it does not write
# itself (general.license, tokenizer.ggml.eot_token_id, named chat templates...), as they were;
# never these, which describe the old file, not the new one
CARRIED_PREFIXES = ("general.", "tokenizer.")
NOT_CARRIED = frozenset({ARCH_KEY, FILE_TYPE_KEY, "general.quantization_version", ALIGNMENT_KEY})

MODELFILE_NAME = "Modelfile"
INF = math.inf
