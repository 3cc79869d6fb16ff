"""Tokenizer metadata for GGUF: from a Hugging Face `tokenizer.json` (byte-level BPE) or a
SentencePiece BPE model (`tokenizer.model`, Mamba-Codestral's `tokenizer.model.v3`).

llama.cpp's "gpt2" tokenizer needs: the token strings in id order (exactly one per embedding
row, so a vocab shorter than the embedding is padded with unused tokens), their types, the
merges, the pre-tokenizer name, and the special token ids. Its "llama" (SentencePiece) tokenizer
needs the pieces, their scores (the merge priorities) and types, and whether a space is
prepended to the text (sentencepiece's add_dummy_prefix); no merges.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from gguf import TokenType

from ..chat import CHAT_TEMPLATE_FILE, GGUF_CHAT_TEMPLATE_KEY, named_chat_templates, read_chat_template
from ..errors import ExportError, ModelNotFoundError
from ..extras import install_hint
from ..tokenizer import (PROBE_TEXT, SENTENCEPIECE_FILES, find_sentencepiece, parse_sentencepiece,
                         read_tokenizer_config, sentencepiece_model_class)
from .gguf_tables import (ADD_BOS_DEFAULT, END_TOKEN_KEYS, EOG_END_UNLESS, EOG_ROLE_TEXTS, EOG_TOKEN_TEXTS, PAD_TOKEN,
                          PRE_TOKENIZERS, SPM_BPE, SPM_MODEL_TYPES, SPM_PAD_SCORE, SPM_PRE, SPM_TOKEN_TYPES,
                          SPM_TOKENIZER_MODEL, TOKENIZER_MODEL)

# a name no vocabulary has: what spm_model_from_vocab names a BOS that is not to be added
NO_PIECE = "\x00no piece\x00"
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
    scores: list[float] | None = None  # SentencePiece: one per token
    add_space_prefix: bool | None = None  # SentencePiece's add_dummy_prefix; None: not written
    chat_template: str | None = None  # Jinja (tokenizer.chat_template), as llama.cpp's server applies it
    chat_templates: dict[str, str] = field(default_factory=dict)  # the other named ones: tokenizer.chat_template.NAME
    add_eos: bool | None = None  # llama.cpp appends the EOS to texts; None: not written (llama.cpp: no)
    end_ids: list[int] = field(default_factory=list)  # eot / eom: generation ends there too, as at the EOS
    role_ids: dict[str, int] = field(default_factory=dict)  # a GGUF's EOG_ROLE_TEXTS keys that it sets
    # a .gguf source's other tokenizer.* keys (gguf_import.carried_fields), written back as they were
    carried: dict = field(default_factory=dict)


def find_tokenizer_file(tokenizer, model_source) -> Path:
    """The tokenizer to write into a GGUF: `tokenizer` (a folder, a tokenizer.json or SentencePiece
    model file, or a hub id) wins over the model's own folder. In a folder, tokenizer.json, unless
    it is a conversion of the SentencePiece model beside it (then that model: its scores are what
    llama.cpp's SentencePiece tokenizer needs)."""
    if tokenizer is not None:
        from ..hub import resolve

        p = resolve(tokenizer, weights=False)  # a hub id's tokenizer files, not its weights
        found = _pick_tokenizer(p) if p.is_dir() else (p if p.is_file() else None)
        if found is None:
            raise ModelNotFoundError(f"--tokenizer {tokenizer!r} has no tokenizer.json or SentencePiece model "
                                     f"({', '.join(SENTENCEPIECE_FILES)}); pass a folder or file that has one")
        return found
    if model_source is not None:
        folder = Path(model_source)
        found = _pick_tokenizer(folder.parent if folder.is_file() else folder)
        if found is not None:
            return found
    raise ModelNotFoundError(
        f"the model ({model_source or 'in memory'}) ships no tokenizer.json or SentencePiece model, and GGUF files "
        "carry their tokenizer; pass one with --tokenizer PATH_OR_HUB_ID (Python: tokenizer=...), e.g. the folder "
        "of the model this checkpoint was trained with"
    )


def _pick_tokenizer(folder: Path) -> Path | None:
    tj = folder / "tokenizer.json"
    spm = find_sentencepiece(folder)
    if tj.is_file() and (spm is None or not _converted_sentencepiece(tj)):
        return tj
    return spm


def _converted_sentencepiece(path: Path) -> bool:
    """A tokenizer.json that transformers converted from a SentencePiece BPE model (byte fallback)."""
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError, AttributeError):
        return False  # read_vocab reports what is wrong with it, if it is used
    return isinstance(model, dict) and model.get("type") == "BPE" and bool(model.get("byte_fallback"))


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
    """tokenizer.json or a SentencePiece model -> Vocab padded to the embedding's `n_rows`."""
    if Path(path).name in SENTENCEPIECE_FILES or Path(path).suffix == ".model":
        return read_spm_vocab(path, n_rows)
    try:
        tj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ModelNotFoundError(f"cannot read tokenizer {path}: {e}; pass a valid tokenizer.json") from e
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = model.get("type") if isinstance(model, dict) else None
        if kind == "BPE":  # byte_fallback: converted from a SentencePiece model, whose scores it lacks
            raise ExportError(f"{path} is a SentencePiece tokenizer converted to tokenizer.json; GGUF export reads "
                              "SentencePiece vocabularies from the model itself: put its tokenizer.model beside it "
                              "or pass it with --tokenizer PATH/tokenizer.model")
        raise ExportError(f"{path}: tokenizer model {kind!r} is not byte-level BPE; GGUF export supports "
                          "byte-level BPE (GPT-2 style) tokenizer.json files and SentencePiece BPE models only")
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
    for gap in _llamacpp_gaps(tj, added):
        warnings.warn(f"{path}: {gap}, which llama.cpp's byte-level BPE does not apply; texts it would change "
                      "tokenize differently from the GGUF than from the checkpoint", stacklevel=3)
    special = _special_ids(Path(path).parent, tokens, config_ids or {})
    add_bos, add_eos = _adds_specials(Path(path), special.get("bos"), special.get("eos"))
    return Vocab(tokens, [int(t) for t in types], _merges(model), _pre_name(tj.get("pre_tokenizer"), path),
                 special, add_bos, source=Path(path), chat_template=read_chat_template(Path(path).parent),
                 chat_templates=named_chat_templates(Path(path).parent),
                 add_eos=add_eos or None, end_ids=_end_ids(Path(path).parent, special.get("eos"), tokens))


# normalizers llama.cpp's converter also leaves out without changing real texts: GPT-NeoX's
# tokenizer (the state-spaces Mamba models') has NFC, and text is nearly always NFC already
QUIET_NORMALIZERS = ("NFC",)


def _llamacpp_gaps(tj: dict, added: dict) -> list[str]:
    """What in a byte-level BPE tokenizer.json llama.cpp's tokenizer does not do (GGUF has no key
    for it): a normalizer, a ByteLevel prefix space, added tokens that strip their neighbours'
    spaces or match whole words only."""
    gaps = []
    norm = tj.get("normalizer")
    if isinstance(norm, dict):
        kinds = [n.get("type") for n in norm.get("normalizers", [])] if norm.get("type") == "Sequence" else \
            [norm.get("type")]
        kinds = [k for k in kinds if k not in QUIET_NORMALIZERS]
        if kinds:
            gaps.append(f"normalizer {', '.join(map(str, kinds))}")
    pre = tj.get("pre_tokenizer")
    pres = [pre] + (pre.get("pretokenizers") or [] if isinstance(pre, dict) else [])
    if any(isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in pres):
        gaps.append("ByteLevel add_prefix_space (a space before each text)")
    flagged = [a.get("content") for a in added.values() if any(a.get(k) for k in ("lstrip", "rstrip", "single_word"))]
    if flagged:
        gaps.append(f"added tokens with lstrip / rstrip / single_word {flagged[:5]}"
                    f"{f' and {len(flagged) - 5} more' if len(flagged) > 5 else ''}")
    return gaps


def _end_ids(folder: Path, eos: int | None, tokens: list[str]) -> list[int]:
    """The folder's ids besides the EOS that end generation (generation_config.json's eos_token_id
    list), which the GGUF names as its eot / eom tokens, in that order. GGUF has no key for
    more: a warning names the rest that llama.cpp would not recognise by their text either
    (EOG_TOKEN_TEXTS), since generation from the GGUF would run past them."""
    from ..checkpoint import generation_end_ids

    ids = list(dict.fromkeys(i for i in generation_end_ids(folder) if i != eos and i < len(tokens)))
    kept, rest = ids[:len(END_TOKEN_KEYS)], ids[len(END_TOKEN_KEYS):]
    lost = [f"{i} ({tokens[i]!r})" for i in rest if tokens[i] not in EOG_TOKEN_TEXTS]
    if lost:
        warnings.warn(f"{folder}: the checkpoint ends generation at {len(ids)} ids besides the EOS, and GGUF names "
                      f"{len(END_TOKEN_KEYS)} (eot, eom: {kept}); llama.cpp and this project's GGUF readers will not "
                      f"stop at {', '.join(lost)}: pass them with generate's --stop (or as stop strings)",
                      stacklevel=3)
    return kept


def _adds_specials(path: Path, bos: int | None, eos: int | None) -> tuple[bool, bool]:
    """Whether tokenizer.json itself prepends the BOS / appends the EOS (its post-processor), as this
    project's tokenizer and transformers' generic one encode: tokenizer_config.json's add_bos_token
    is not what they follow, so a GGUF that took it from there made llama.cpp add a BOS they do not."""
    if bos is None and eos is None:
        return False, False
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_buffer(Path(path).read_bytes())  # from_file takes UTF-8 text only: not every file name is
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for any bad file)
        raise ExportError(f"cannot read tokenizer {path} ({e}); copy it again from the model, or pass another "
                          "with --tokenizer") from e
    ids = tok.encode(PROBE_TEXT).ids
    added = len(ids) > len(tok.encode(PROBE_TEXT, add_special_tokens=False).ids)
    return added and bos is not None and ids[0] == bos, added and eos is not None and ids[-1] == eos


def _special_ids(folder: Path, tokens: list[str], config_ids: dict) -> dict:
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
    return ids


# ----------------------------------------------------------------------------- SentencePiece

def _missing(e: ModuleNotFoundError) -> ExportError:
    return ExportError(f"reading or writing a SentencePiece model needs {e.name}: "
                       f"{install_hint(e.name or 'sentencepiece')}")


def read_spm_proto(path: Path):
    """A SentencePiece model file as its ModelProto; typed errors for a missing or corrupt one."""
    try:
        return parse_sentencepiece(Path(path).read_bytes())
    except ModuleNotFoundError as e:
        raise _missing(e) from e
    except OSError as e:
        raise ModelNotFoundError(f"cannot read SentencePiece model {path}: {e}; check the path, or pass the "
                                 "model's tokenizer.model with --tokenizer") from e
    except ValueError as e:
        raise ExportError(f"{path}: {e}; copy it again from the original model") from e


def read_spm_vocab(path: Path, n_rows: int) -> Vocab:
    """A SentencePiece BPE model -> Vocab (llama.cpp's "llama" tokenizer) padded to `n_rows`."""
    proto, path = read_spm_proto(path), Path(path)
    kind = proto.trainer_spec.model_type
    if kind != SPM_BPE:
        raise ExportError(f"{path} is a SentencePiece {SPM_MODEL_TYPES.get(kind, kind)} model; GGUF export writes "
                          "SentencePiece BPE models only (llama.cpp's 'llama' tokenizer merges pieces by score, "
                          "which encodes other model types differently)")
    if len(proto.pieces) > n_rows:
        raise ExportError(f"{path} has {len(proto.pieces)} pieces but the model's embedding has only {n_rows} rows; "
                          "this tokenizer does not belong to the model, pass the right one with --tokenizer")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        # llama.cpp applies neither: texts where they change something encode differently there
        warnings.warn(f"{path}: SentencePiece normalization {norm.name!r} (remove_extra_whitespaces="
                      f"{norm.remove_extra_whitespaces}) is not applied by llama.cpp; texts it would change "
                      "(runs of spaces, compatibility characters) tokenize differently there", stacklevel=3)
    tokens = [p.piece for p in proto.pieces] + [PAD_TOKEN.format(id=i) for i in range(len(proto.pieces), n_rows)]
    scores = [float(p.score) for p in proto.pieces] + [SPM_PAD_SCORE] * (n_rows - len(proto.pieces))
    types = [int(SPM_TOKEN_TYPES[p.type]) for p in proto.pieces] + [int(TokenType.UNUSED)] * (n_rows - len(proto.pieces))
    spec = proto.trainer_spec
    special = {kind: int(i) for kind, i in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id),
                                            ("pad", spec.pad_id)) if 0 <= i < len(proto.pieces)}
    if "eos" not in special and len(tokens) > 2:
        # GGUF cannot say "none": llama.cpp then takes id 2 as end of text and stops generating there
        warnings.warn(f"{path} defines no end-of-text piece; llama.cpp will take token 2 ({tokens[2]!r}) as its "
                      "EOS and stop generation when it is sampled", stacklevel=3)
    # tokenizer_config.json's flags, which transformers' SentencePiece tokenizers (load_tokenizer's,
    # for a folder that has that file) follow, as llama.cpp's converter writes them
    tcfg = read_tokenizer_config(path.parent)
    add_bos, add_eos = tcfg.get("add_bos_token"), tcfg.get("add_eos_token")
    add_bos = add_bos if isinstance(add_bos, bool) else "bos" in special
    add_eos = add_eos if isinstance(add_eos, bool) and "eos" in special else None
    return Vocab(tokens, types, [], SPM_PRE, special, add_bos=add_bos and "bos" in special,
                 model=SPM_TOKENIZER_MODEL, source=path, scores=scores, add_space_prefix=bool(norm.add_dummy_prefix),
                 add_eos=add_eos,
                 chat_template=read_chat_template(path.parent), chat_templates=named_chat_templates(path.parent),
                 end_ids=_end_ids(path.parent, special.get("eos"), tokens))


def spm_model_from_vocab(vocab: Vocab) -> bytes:
    """A GGUF's SentencePiece vocabulary as a sentencepiece model file that encodes as llama.cpp
    does with it: BPE over the same pieces and scores, no normalization (llama.cpp applies none),
    a space prepended when the GGUF says so, byte fallback when it has byte tokens."""
    where = vocab.source or "the GGUF"
    if vocab.model != SPM_TOKENIZER_MODEL or vocab.scores is None or len(vocab.scores) != len(vocab.tokens):
        raise ExportError(f"{where}: a {vocab.model!r} tokenizer without one score per token has no SentencePiece "
                          "equivalent")
    try:
        proto = sentencepiece_model_class()()
    except ModuleNotFoundError as e:
        raise _missing(e) from e
    from_gguf = {int(t): k for k, t in SPM_TOKEN_TYPES.items()}
    for piece, score, kind in zip(vocab.tokens, vocab.scores, vocab.types):
        if int(kind) not in from_gguf:
            raise ExportError(f"{where}: token {piece!r} has type {kind}, which SentencePiece does not have")
        proto.pieces.add(piece=piece, score=float(score), type=from_gguf[int(kind)])
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size = SPM_BPE, len(vocab.tokens)
    spec.byte_fallback = int(TokenType.BYTE) in vocab.types
    for kind in ("bos", "eos", "unk", "pad"):
        i = int(vocab.special.get(kind, -1))
        setattr(spec, f"{kind}_id", i)
        if kind != "unk" and 0 <= i < len(vocab.tokens):
            # sentencepiece finds bos / eos / pad by these names (defaults "<s>", "</s>", "<pad>"), not by
            # the ids (and the unknown piece by its type)
            setattr(spec, f"{kind}_piece", vocab.tokens[i])
    if not vocab.add_bos:  # llama.cpp adds no BOS to this vocabulary's texts: nor may a tokenizer built from it
        spec.bos_id, spec.bos_piece = -1, NO_PIECE
    if "unk" not in vocab.special:  # sentencepiece requires an unknown piece
        unk = next((i for i, t in enumerate(vocab.types) if t == TokenType.UNKNOWN), None)
        if unk is None:
            raise ExportError(f"{where} has no unknown token, which a SentencePiece model needs")
        spec.unk_id = unk
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", True if vocab.add_space_prefix is None else vocab.add_space_prefix
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    return proto.SerializeToString()


def vocab_from_gguf(path, reader=None) -> Vocab:
    """The tokenizer metadata of an existing GGUF (re-export / re-quantization of a .gguf);
    `reader`: the file already open."""
    from .gguf_import import carried_fields, field, open_reader
    from .gguf_tables import (ADD_BOS_KEY, ADD_EOS_KEY, ADD_SPACE_PREFIX_KEY, MERGES_KEY, SCORES_KEY,
                              SPECIAL_KEYS, TOKEN_TYPE_KEY, TOKENIZER_MODEL_KEY, TOKENIZER_PRE_KEY, TOKENS_KEY)

    reader = open_reader(path) if reader is None else reader

    def typed(key, kind: type, what: str, default=None):
        """The field's value, or `default` when absent; ExportError when it has another type."""
        value = field(reader, key, default)
        ok = isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)
        if value is not default and not ok:
            raise ExportError(f"{path}: GGUF metadata {key} must be {what}, not {value!r:.60}; the file's metadata "
                              "is corrupt: re-export it or re-download it")
        return value

    model = typed(TOKENIZER_MODEL_KEY, str, "a string", "")
    if model not in ADD_BOS_DEFAULT:
        raise ExportError(f"{path} has a {model!r} tokenizer; re-export supports {sorted(ADD_BOS_DEFAULT)} "
                          "(byte-level BPE, SentencePiece)")
    special = {k: typed(key, int, "a token id") for k, key in SPECIAL_KEYS.items()}
    special = {k: i for k, i in special.items() if i is not None}
    scores = typed(SCORES_KEY, list, "a list of numbers")
    prefix = typed(ADD_SPACE_PREFIX_KEY, bool, "true or false")
    pre = typed(TOKENIZER_PRE_KEY, str, "a string", "default")
    template = typed(GGUF_CHAT_TEMPLATE_KEY, str, "a string")
    add_bos = typed(ADD_BOS_KEY, bool, "true or false", ADD_BOS_DEFAULT[model])
    tokens = field(reader, TOKENS_KEY)
    # optional, as for llama.cpp: every token normal
    types = field(reader, TOKEN_TYPE_KEY, None)
    types = [int(TokenType.NORMAL)] * len(tokens) if types is None and isinstance(tokens, list) else types
    merges = field(reader, MERGES_KEY, None)
    if merges is None and model == TOKENIZER_MODEL:  # byte by byte otherwise, without a word
        raise ExportError(f"{path}: a byte-level BPE ({model!r}) vocabulary without tokenizer.ggml.merges, which "
                          "llama.cpp refuses too; convert the model again with its tokenizer.json (mamba-deploy "
                          "export gguf MODEL_FOLDER OUT.gguf)")
    merges = [] if merges is None else merges
    lists = [("tokens", tokens, str, "str"), ("token_type", types, int, "int"), ("merges", merges, str, "str")]
    lists += [("scores", scores, (int, float), "numbers")] if scores is not None else []
    for key, value, kind, what in lists:
        if not (isinstance(value, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)):
            raise ExportError(f"{path}: GGUF metadata tokenizer.ggml.{key} must be a list of {what}, not "
                              f"{value!r:.60}; the file's metadata is corrupt: re-export it or re-download it")
    if len(types) != len(tokens):
        raise ExportError(f"{path}: GGUF metadata has {len(tokens)} tokenizer.ggml.tokens but {len(types)} "
                          "tokenizer.ggml.token_type; the file's metadata is corrupt: re-export it or re-download it")
    add_eos = typed(ADD_EOS_KEY, bool, "true or false")
    bad = {k: i for k, i in special.items() if not 0 <= i < len(tokens)}
    if bad:  # llama.cpp loads such a file; its generation never stops at a token that cannot be drawn
        warnings.warn(f"{path}: GGUF metadata {', '.join(f'{SPECIAL_KEYS[k]} = {i}' for k, i in bad.items())} "
                      f"{'is' if len(bad) == 1 else 'are'} outside the {len(tokens)}-token vocabulary and ignored; "
                      "re-export the model to fix the file", stacklevel=3)
        special = {k: i for k, i in special.items() if k not in bad}
    ends = [field(reader, key, None) for key in END_TOKEN_KEYS]
    roles = {key: field(reader, key, None) for key in EOG_ROLE_TEXTS}

    def an_id(i) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)

    # token-id keys that hold no id of this vocabulary are not carried into a re-export either
    # (the warning above says they are ignored; the export writes the valid ones itself)
    id_keys = {*SPECIAL_KEYS.values(), *END_TOKEN_KEYS, *EOG_ROLE_TEXTS}
    carried = {k: v for k, v in carried_fields(reader, "tokenizer.").items()
               if k not in id_keys or an_id(field(reader, k, None))}
    return Vocab(tokens, types, merges, pre, special, add_bos, model=model, source=Path(path),
                 scores=None if scores is None else [float(v) for v in scores],
                 add_space_prefix=prefix, chat_template=template, add_eos=add_eos,
                 end_ids=[int(i) for i in ends if an_id(i)],
                 role_ids={k: int(i) for k, i in roles.items() if an_id(i)}, carried=carried)


def llama_end_ids(vocab: Vocab) -> list[int]:
    """The ids besides the EOS where llama.cpp ends generation with this vocabulary: eot / eom,
    the tokens it recognises by their text, and the FIM role tokens (EOG_ROLE_TEXTS). Where
    several tokens could take one role, llama.cpp's pick is unordered; this takes the lowest id."""
    index: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        index.setdefault(t, i)
    named = set(EOG_TOKEN_TEXTS)
    end, unless = EOG_END_UNLESS
    if all(t in index for t in unless):
        named.discard(end)
    ids = list(vocab.end_ids) + sorted(index[t] for t in named if t in index)
    for key, texts in EOG_ROLE_TEXTS.items():
        found = [index[t] for t in texts if t in index]
        ids += [vocab.role_ids[key]] if key in vocab.role_ids else [min(found)] if found else []
    eos = vocab.special.get("eos")
    return [i for i in dict.fromkeys(ids) if i != eos]


def add_vocab(writer, vocab: Vocab) -> None:
    from .gguf_tables import ADD_BOS_KEY, ADD_EOS_KEY, ADD_SPACE_PREFIX_KEY, SPECIAL_KEYS

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges or vocab.model == TOKENIZER_MODEL:
        writer.add_token_merges(vocab.merges)
    for kind, tid in vocab.special.items():
        writer.add_uint32(SPECIAL_KEYS[kind], int(tid))
    writer.add_bool(ADD_BOS_KEY, vocab.add_bos)
    if vocab.add_space_prefix is not None:
        writer.add_bool(ADD_SPACE_PREFIX_KEY, vocab.add_space_prefix)
    if vocab.add_eos is not None:
        writer.add_bool(ADD_EOS_KEY, vocab.add_eos)
    for key, tid in zip(END_TOKEN_KEYS, vocab.end_ids):
        writer.add_uint32(key, int(tid))
    if vocab.chat_templates:  # named ones, as llama.cpp's converter writes a list of them ("default" the plain key)
        default = [{"name": "default", "template": vocab.chat_template}] if vocab.chat_template else []
        writer.add_chat_template(default + [{"name": n, "template": t} for n, t in vocab.chat_templates.items()])
    elif vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
    add_carried(writer, vocab.carried)


def add_carried(writer, carried: dict) -> None:
    """A source's carried keys (gguf_import.carried_fields) that the writer holds no value for yet:
    what this export derives itself (the tokens, general.name) wins over the old file's."""
    for key, (value, kind, item_kind) in carried.items():
        if not any(key in kv for kv in writer.kv_data):
            writer.add_key_value(key, value, kind, sub_type=item_kind)


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
    _add_bos_eos(tok, vocab)
    return tok


def _add_bos_eos(tok, vocab: Vocab) -> None:
    """The BOS / EOS llama.cpp adds around a text (add_bos_token / add_eos_token), as the
    tokenizer's post-processor, so that every backend encodes the same ids."""
    from tokenizers import processors

    def named(kind, wanted):
        i = vocab.special.get(kind)
        return vocab.tokens[i] if wanted and i is not None and 0 <= i < len(vocab.tokens) else None

    bos, eos = named("bos", vocab.add_bos), named("eos", vocab.add_eos)
    if bos is None and eos is None:
        return
    single = " ".join(t for t in (bos, "$A", eos) if t)
    pair = " ".join(t for t in (bos, "$A", eos, "$B", eos) if t)
    kept = {t: vocab.special[k] for k, t in (("bos", bos), ("eos", eos)) if t}
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(kept.items()))


def matching_neighbour(gguf_path, reader=None) -> Path | None:
    """The tokenizer beside a GGUF (tokenizer.json, else a SentencePiece model) when its tokens are
    the GGUF's own, id for id, or when the GGUF has no vocabulary to compare with; else None, and
    a warning naming the file there: the GGUF's vocabulary is what llama.cpp encodes with, so a stray
    tokenizer from another model in the same folder must not be what the other backends and the
    exports use."""
    folder = Path(gguf_path).parent
    found = folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else find_sentencepiece(folder)
    if found is None:
        return None
    try:
        ours = vocab_from_gguf(gguf_path, reader).tokens
    except Exception:  # noqa: BLE001  (no or unreadable tokenizer metadata: nothing to compare with)
        return found
    theirs = _pieces_by_id(found, len(ours))
    differ = None if theirs is None else next((i for i, t in sorted(theirs.items()) if i >= len(ours) or ours[i] != t),
                                              None)
    if theirs is not None and differ is None:
        return found
    why = ("cannot be read" if theirs is None else
           f"has token {differ} = {theirs[differ]!r} where the GGUF has "
           f"{ours[differ]!r}" if differ < len(ours) else f"has token id {differ}, past the GGUF's {len(ours)}")
    warnings.warn(f"{found} {why}: it belongs to another model, so the GGUF's own vocabulary is used "
                  "(the one llama.cpp encodes with); move that file away to silence this", stacklevel=3)
    return None


def _pieces_by_id(path: Path, n_rows: int) -> dict[int, str] | None:
    """id -> token string of a tokenizer.json (any model type, added tokens included) or a
    SentencePiece model; None when it cannot be read."""
    try:
        if path.name != "tokenizer.json":
            return dict(enumerate(read_spm_vocab(path, n_rows).tokens[:n_rows]))
        tj = json.loads(path.read_text(encoding="utf-8"))
        vocab = tj["model"]["vocab"]
        by_id = ({int(i): t for t, i in vocab.items()} if isinstance(vocab, dict)
                 else {i: piece[0] for i, piece in enumerate(vocab)})  # Unigram: [[piece, score], ...]
        by_id.update({int(a["id"]): a["content"] for a in tj.get("added_tokens", [])})
        return by_id
    except Exception:  # noqa: BLE001  (any unreadable file: the caller says so)
        return None


def write_gguf_tokenizer(gguf_path, folder) -> None:
    """The GGUF's vocabulary as tokenizer files in `folder`, for runtimes without llama.cpp:
    tokenizer.json + tokenizer_config.json for byte-level BPE, tokenizer.model for SentencePiece;
    ExportError where that cannot be done faithfully (see tokenizer_from_vocab, spm_model_from_vocab)."""
    vocab = vocab_from_gguf(gguf_path)
    folder = Path(folder)
    ends = llama_end_ids(vocab)
    if ends and vocab.special.get("eos") is not None:  # read back by load_tokenizer / generation_end_ids
        from ..checkpoint import GENERATION_CONFIG

        ends = [vocab.special["eos"], *ends]
        (folder / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": ends}, indent=2), encoding="utf-8")
    if vocab.model == SPM_TOKENIZER_MODEL:  # no tokenizer_config.json: load_tokenizer reads the model itself
        (folder / "tokenizer.model").write_bytes(spm_model_from_vocab(vocab))
        if vocab.chat_template:
            (folder / CHAT_TEMPLATE_FILE).write_text(vocab.chat_template, encoding="utf-8")
        return
    tok = tokenizer_from_vocab(vocab)
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": vocab.add_bos,
            "add_eos_token": bool(vocab.add_eos), "clean_up_tokenization_spaces": False}
    if vocab.chat_template:
        tcfg["chat_template"] = vocab.chat_template
    tcfg.update({f"{kind}_token": vocab.tokens[i] for kind, i in vocab.special.items() if 0 <= i < len(vocab.tokens)})
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
