"""Tokenizer metadata for GGUF from a Hugging Face `tokenizer.json` (byte-level BPE).

llama.cpp's "gpt2" tokenizer needs: the token strings in id order (exactly one per embedding
row, so a vocab shorter than the embedding is padded with unused tokens), their types, the
merges, the pre-tokenizer name, and the special token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gguf import TokenType

from ..errors import ExportError, ModelNotFoundError
from ..tokenizer import read_tokenizer_config
from .gguf_tables import PAD_TOKEN, PRE_TOKENIZERS, TOKENIZER_MODEL

EOS_GUESSES = ("<|endoftext|>", "</s>", "<eos>")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)  # "bos" | "eos" | "unk" | "pad" -> id
    add_bos: bool = False
    model: str = TOKENIZER_MODEL
    source: Path | None = None


def find_tokenizer_json(tokenizer, model_source) -> Path:
    """`tokenizer` (a folder, a tokenizer.json, or a hub id) wins over the model's own folder."""
    if tokenizer is not None:
        from ..checkpoint import resolve

        p = resolve(tokenizer)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise ModelNotFoundError(f"--tokenizer {tokenizer!r} has no tokenizer.json; pass a folder or file that has one")
        return p
    if model_source is not None:
        folder = Path(model_source)
        folder = folder.parent if folder.is_file() else folder
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    raise ModelNotFoundError(
        f"the model ({model_source or 'in memory'}) ships no tokenizer.json, and GGUF files carry their "
        "tokenizer; pass one with --tokenizer PATH_OR_HUB_ID (Python: tokenizer=...), e.g. the folder of the "
        "model this checkpoint was trained with"
    )


def _pre_name(pre_tok: dict | None, path: Path) -> str:
    """The tokenizer.ggml.pre name for this pre-tokenizer (see PRE_TOKENIZERS)."""
    if pre_tok is None:
        sig = ()
    elif pre_tok.get("type") == "Sequence":
        sig = ("Sequence", *(p.get("type") for p in pre_tok.get("pretokenizers", [])))
    else:
        sig = (pre_tok.get("type"),)
    byte_level = [p for p in ([pre_tok] + (pre_tok or {}).get("pretokenizers", [])) if p and p.get("type") == "ByteLevel"]
    if sig not in PRE_TOKENIZERS or not all(p.get("use_regex", True) for p in byte_level):
        raise ExportError(
            f"{path}: pre-tokenizer {sig or None} has no known llama.cpp name (known: "
            f"{sorted(set(PRE_TOKENIZERS.values()))} for {sorted(PRE_TOKENIZERS)}); only byte-level BPE "
            "tokenizers with the GPT-2 split are supported"
        )
    return PRE_TOKENIZERS[sig]


def _merges(model: dict) -> list[str]:
    # tokenizers >= 0.20 writes merges as [left, right] pairs; older files as "left right"
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def read_vocab(path: Path, n_rows: int, config_ids: dict | None = None) -> Vocab:
    """tokenizer.json -> Vocab padded to the embedding's `n_rows`."""
    try:
        tj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ModelNotFoundError(f"cannot read tokenizer {path}: {e}; pass a valid tokenizer.json") from e
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if isinstance(model, dict) else None
        raise ExportError(f"{path}: tokenizer model {kind!r} is not byte-level BPE; "
                          "GGUF export supports byte-level BPE (GPT-2 style) tokenizers only")
    try:
        by_id = {int(i): t for t, i in model["vocab"].items()}
        added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{path} has no readable vocab / added_tokens ({type(e).__name__}: {e}); the file is "
                          "corrupt: copy it again from the model, or pass another with --tokenizer") from e
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= n_rows:
        raise ExportError(
            f"{path} has token id {max(by_id)} but the model's embedding has only {n_rows} rows; "
            "this tokenizer does not belong to the model, pass the right one with --tokenizer"
        )
    tokens, types = [], []
    for i in range(n_rows):
        if i not in by_id:
            tokens.append(PAD_TOKEN.format(id=i))
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special", False) else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    special, add_bos = _special_ids(Path(path).parent, tokens, config_ids or {})
    return Vocab(tokens, [int(t) for t in types], _merges(model), _pre_name(tj.get("pre_tokenizer"), path),
                 special, add_bos, source=Path(path))


def _special_ids(folder: Path, tokens: list[str], config_ids: dict) -> tuple[dict, bool]:
    """Special ids from tokenizer_config.json names, then config.json ids, then common names."""
    index = {t: i for i, t in enumerate(tokens)}
    tcfg = read_tokenizer_config(folder)  # a corrupt one is an error naming it, as everywhere
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        name = tcfg.get(f"{kind}_token")
        name = name.get("content") if isinstance(name, dict) else name
        if name in index:
            ids[kind] = index[name]
        elif config_ids.get(kind) is not None and 0 <= int(config_ids[kind]) < len(tokens):
            ids[kind] = int(config_ids[kind])
    if "eos" not in ids:
        ids.update({"eos": index[n] for n in EOS_GUESSES[::-1] if n in index})
    return ids, bool(tcfg.get("add_bos_token", False))


def vocab_from_gguf(path, reader=None) -> Vocab:
    """The tokenizer metadata of an existing GGUF (re-export / re-quantization of a .gguf);
    `reader`: the file already open."""
    from .gguf_import import field, open_reader
    from .gguf_tables import ADD_BOS_KEY, SPECIAL_KEYS

    reader = open_reader(path) if reader is None else reader
    model = field(reader, "tokenizer.ggml.model")
    if model != TOKENIZER_MODEL:
        raise ExportError(f"{path} has a {model!r} tokenizer; re-export supports {TOKENIZER_MODEL!r} (byte-level BPE)")
    special = {k: int(field(reader, key)) for k, key in SPECIAL_KEYS.items() if field(reader, key, None) is not None}
    return Vocab(field(reader, "tokenizer.ggml.tokens"), [int(t) for t in field(reader, "tokenizer.ggml.token_type")],
                 field(reader, "tokenizer.ggml.merges", []), field(reader, "tokenizer.ggml.pre", "default"),
                 special, bool(field(reader, ADD_BOS_KEY, False)), source=Path(path))


def add_vocab(writer, vocab: Vocab) -> None:
    from .gguf_tables import ADD_BOS_KEY, SPECIAL_KEYS

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for kind, tid in vocab.special.items():
        writer.add_uint32(SPECIAL_KEYS[kind], int(tid))
    writer.add_bool(ADD_BOS_KEY, vocab.add_bos)


# llama.cpp pre-tokenizer names that split text with GPT-2's regex (one case in llama-vocab.cpp),
# i.e. what tokenizers' ByteLevel(use_regex=True) does
GPT2_REGEX_PRE = ("gpt-2", "mpt", "olmo", "jais")


def tokenizer_from_vocab(vocab: Vocab):
    """A GGUF vocabulary as a `tokenizers.Tokenizer` that encodes text as llama.cpp does with it
    (control tokens in the text are matched, as tokenizer.json always does and llama.cpp with
    parse_special). Raises ExportError where no tokenizer.json can (another pre-tokenizer or token kind)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    where = vocab.source or "the GGUF"
    if vocab.model != TOKENIZER_MODEL or vocab.pre not in GPT2_REGEX_PRE:
        raise ExportError(f"{where} has a {vocab.model!r} tokenizer with pre-tokenizer {vocab.pre!r}; only "
                          f"{TOKENIZER_MODEL!r} with one of {GPT2_REGEX_PRE} has a tokenizer.json equivalent")
    kinds = {TokenType.NORMAL, TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNUSED}
    odd = sorted({t for t in vocab.types if t not in kinds})
    if odd:
        raise ExportError(f"{where} has tokens of type {odd}; only normal, control, user-defined and "
                          "unused tokens have a tokenizer.json equivalent")
    kept = {t: i for i, (t, k) in enumerate(zip(vocab.tokens, vocab.types)) if k != TokenType.UNUSED}
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    # checked here: tokenizers' BPE panics (a BaseException) on a merge outside its vocabulary
    bad = next((m for m in merges if len(m) != 2 or not {m[0], m[1], m[0] + m[1]} <= kept.keys()), None)
    if bad is not None:
        raise ExportError(f"{where}: merge {' '.join(bad)!r} uses or makes a token that is not in its vocabulary")
    tok = Tokenizer(models.BPE(vocab=kept, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # added tokens the source tokenizer.json matched verbatim before BPE, as llama.cpp does
    # (control tokens only with parse_special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(vocab.tokens, vocab.types) if k == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(vocab.tokens, vocab.types) if k == TokenType.USER_DEFINED])
    return tok


def write_gguf_tokenizer(gguf_path, folder) -> None:
    """The GGUF's vocabulary as tokenizer.json + tokenizer_config.json in `folder`, for runtimes
    without llama.cpp; ExportError where that cannot be done faithfully (see tokenizer_from_vocab)."""
    vocab = vocab_from_gguf(gguf_path)
    tok = tokenizer_from_vocab(vocab)
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": vocab.add_bos,
            "clean_up_tokenization_spaces": False}
    tcfg.update({f"{kind}_token": vocab.tokens[i] for kind, i in vocab.special.items() if 0 <= i < len(vocab.tokens)})
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
