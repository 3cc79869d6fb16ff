"""Tokenizer from a checkpoint folder: `tokenizers` for tokenizer.json; sentencepiece for a bare
SentencePiece model (Mistral's tokenizer.model.v3, beside a params.json); else transformers."""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import threading
import warnings
from pathlib import Path

from .errors import ConfigError, MambaDeployError, ModelNotFoundError, ShapeError
from .extras import install_hint
from .inputs import token_stream

# Files a tokenizer can be built from. Without any of them transformers still builds the model
# type's tokenizer class (GPT-NeoX for mamba / mamba2), but empty: 2 special tokens, encode -> [].
TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                     "tokenizer.model", "spiece.model", "tokenizer.model.v3")
# SentencePiece models read directly when no tokenizer.json / tokenizer_config.json says more
SENTENCEPIECE_FILES = ("tokenizer.model.v3", "tokenizer.model")
PROBE_TEXT = "def main():\n    return 0\n"  # every real tokenizer encodes this to some tokens
# Fewer tokens than there are bytes and under 1/8 of the model's embedding rows: not the model's
# tokenizer (e.g. transformers' empty one: 2 special tokens for 50k rows); loose enough for test-sized ones.
MIN_VOCAB, MIN_VOCAB_FRACTION = 256, 8
# Embedding rows past the tokenizer's ids that still look like padding: checkpoints round their
# vocabulary up by a few ids (mamba-130m: 50277 tokens, 50280 rows; mamba2: 50288); more than
# this many rows (and 2 % of them) with no token suggests another model's tokenizer.
MAX_PAD_ROWS, MAX_PAD_FRACTION = 1024, 50


def check_text(text) -> str:
    """encode's argument: a str that UTF-8 can encode. Python and JSON ("\\ud800") allow lone
    surrogates, which are not text: the tokenizers raised a raw TypeError / UnicodeEncodeError."""
    if not isinstance(text, str):
        raise ConfigError(f"encode takes a str, got {type(text).__name__} {text!r:.60}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"the text holds {text[e.start:e.end]!r} at character {e.start}, a lone surrogate that "
                          "is not valid Unicode; pass text that encodes as UTF-8") from None
    return text


# the special tokens transformers' apply_chat_template hands a chat template by name (its
# special_tokens_map); bos / eos come from the ids below, the rest from `special_token_ids`
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


PREFIX_MARGIN = 512  # tokens past the limit a prefix must reach: only the last words of a cut text tokenize differently


# characters past which a `tokenizers` encode goes through encode_batch: Tokenizer.encode holds the
# GIL for the whole call, and an 8 MB prompt stopped every running stream and GET /health of the
# server for 5 s (its handler thread tokenizes while the model loop waits for the interpreter)
LONG_TEXT = 4096
MAX_TOKEN_ID = 2**32  # the backends take token ids as unsigned 32-bit integers


def encode_prefix(tok, text: str, max_tokens: int | None, **kw) -> list[int]:
    """tok.encode(text)[:max_tokens] without tokenizing the whole text: a `tokenizers` encoding
    holds ~500 bytes per token (offsets, token strings), 180 MiB per MB of text, where a limit
    asks for a few thousand tokens. Prefixes of doubling length are encoded until one reaches
    PREFIX_MARGIN tokens past the limit: a cut only changes the tokens of the words at its end.
    `kw` goes to tok.encode (add_special_tokens=False)."""
    if max_tokens is None:
        return tok.encode(text, **kw)
    n = max(4096, 8 * (max_tokens + PREFIX_MARGIN))  # characters; most tokens cover 2-6 of them
    while n < len(text):
        ids = tok.encode(text[:n], **kw)
        if len(ids) >= max_tokens + PREFIX_MARGIN:
            return ids[:max_tokens]
        n *= 2
    return tok.encode(text, **kw)[:max_tokens]


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str, eos_token_id / bos_token_id;
    special_token_ids: SPECIAL_TOKEN_NAMES name -> id for those the tokenizer defines."""

    def __init__(self, tok, eos_token_id=None, bos_token_id=None, path=None, chat_template=None,
                 special_token_ids=None, end_token_ids=()):
        self._tok = tok
        self.eos_token_id = eos_token_id
        # where generation ends besides the EOS: a GGUF's eot / eom tokens (llama.cpp's end-of-generation set)
        self.end_token_ids = tuple(end_token_ids)
        self.bos_token_id = bos_token_id
        self.path = path
        self.chat_template = chat_template  # Jinja source (see chat.py), or None
        self.special_token_ids = dict(special_token_ids or {})
        self._bytes = None  # see _byte_pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's ids with the special tokens the tokenizer itself adds (a Llama-style <s>), as
        transformers' tokenizer(text) gives them; the same through every backend. Without them
        for text that writes its own (a rendered chat template)."""
        check_text(text)
        _check_flag(add_special_tokens)
        if hasattr(self._tok, "token_to_id"):
            if len(text) > LONG_TEXT:  # encode_batch lets go of the GIL; encode holds it throughout
                return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The token's own text ("<s>", "<|endoftext|>"), as chat templates write it; None for an id
        outside the vocabulary."""
        token_id = _token_id(token_id)
        if not 0 <= token_id < MAX_TOKEN_ID:
            return None
        if hasattr(self._tok, "id_to_token"):
            return self._tok.id_to_token(token_id)
        return self._tok.convert_ids_to_tokens(token_id)

    def encode_batch(self, texts) -> list[list[int]]:
        """Same ids as encode() per text; the `tokenizers` backend encodes them in parallel."""
        # a str is iterable too: each character was encoded as its own text
        if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):
            raise ConfigError(f"encode_batch takes a list of texts, got {type(texts).__name__} {texts!r:.60}; "
                              "for one text call encode(text), or pass [text]")
        texts = list(texts)
        if hasattr(self._tok, "token_to_id"):
            return [e.ids for e in self._tok.encode_batch([check_text(t) for t in texts])]
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """ids (n,) or (1, n) -> text. An id past the vocabulary decodes to nothing, as transformers'
        tokenizers do (a model's embedding rows may outnumber its tokenizer's tokens)."""
        # the generation loop decodes its own lists of ints a few times per token: those skip the
        # tensor round trip that checks anything else
        if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            ids = token_stream(ids, "decode's ids").tolist()
        if ids and min(ids) < 0:
            raise ShapeError(f"decode got token id {min(ids)}; token ids are >= 0")
        # as transformers' skip_special_tokens, the eos / pad / ... the configs name, flagged special
        # in tokenizer.json or not; ids from 2**32 are past any vocabulary and what the backends take
        named = set(self.special_token_ids.values())
        ids = [i for i in ids if i < MAX_TOKEN_ID and i not in named]
        text = self._tok.decode(ids, skip_special_tokens=True)
        if "\ufffd" in text and self._byte_pieces():
            return self._decode_byte_fallback(ids)
        return text

    def _byte_pieces(self) -> dict[str, int]:
        """"<0xHH>" -> byte, for a `tokenizers` tokenizer whose decoder turns those pieces into
        bytes (ByteFallback: Llama / Mistral-style tokenizer.json); empty otherwise. Made once."""
        if self._bytes is None:
            self._bytes = {}
            tok = self._backend()
            # a transformers tokenizer without a `tokenizers` backend (LlamaTokenizer over a
            # sentencepiece model) decodes byte runs as sentencepiece does already
            if hasattr(tok, "get_added_tokens_decoder") and getattr(tok, "decoder", None) is not None:
                pieces = {f"<0x{b:02X}>": b for b in range(256)}
                vocab = tok.get_vocab()
                if all(p in vocab for p in pieces) and tok.decode([vocab["<0x41>"]]) == "A":
                    self._bytes = pieces
        return self._bytes

    def _backend(self):
        """The `tokenizers` Tokenizer behind this one (a transformers fast tokenizer's
        backend_tokenizer), else the object itself."""
        return getattr(self._tok, "backend_tokenizer", self._tok)

    def _decode_byte_fallback(self, ids: list[int]) -> str:
        """decode for byte-fallback tokenizers where some run of byte pieces is not valid UTF-8.
        `tokenizers`' ByteFallback then replaces *every* byte of the run with U+FFFD, so a
        completion cut inside "本" after "日" decodes to four U+FFFD and the "日" is lost, and
        its text is not a continuation of the previous token's. Here each run is split into its
        valid UTF-8 parts, decoded as before, and U+FFFD for each byte of the invalid parts,
        which is what sentencepiece and llama.cpp return ("日\ufffd")."""
        tok, byte_of = self._backend(), self._bytes
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        pieces = [tok.id_to_token(i) for i in ids if i not in special]
        pieces = [p for p in pieces if p is not None]  # ids past the vocabulary decode to nothing
        out, run = [], []
        for piece in pieces + [None]:
            if piece is not None and piece in byte_of:
                run.append(piece)
                continue
            out.extend(_valid_utf8_pieces(run, byte_of))
            run = []
            if piece is not None:
                out.append(piece)
        return tok.decoder.decode(out)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token's own text ("<s>"), or None when the vocabulary has no such token."""
        if not isinstance(token, str):
            raise ConfigError(f"token_to_id takes a token's text (a str such as \"<s>\"), got "
                              f"{type(token).__name__} {token!r:.60}; id_to_token goes the other way")
        if hasattr(self._tok, "token_to_id"):
            return self._tok.token_to_id(token)
        i = self._tok.convert_tokens_to_ids(token)
        return None if i == self._tok.unk_token_id and token != self._tok.unk_token else i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if hasattr(self._tok, "get_vocab_size") else len(self._tok)


def _check_flag(add_special_tokens) -> None:
    if not isinstance(add_special_tokens, bool):  # "no" is truthy: the tokenizers' own TypeError named no argument
        raise ConfigError(f"add_special_tokens must be True or False, got {type(add_special_tokens).__name__} "
                          f"{add_special_tokens!r:.40}")


def _token_id(token_id) -> int:
    """An integer id (int, numpy integer, 0-d integer tensor) as an int; int() truncated 1.7 to
    id 1, and a str or None raised int()'s own error."""
    try:
        if isinstance(token_id, bool):
            raise TypeError
        return operator.index(token_id)
    except TypeError:
        raise ShapeError(f"a token id must be an integer, got {type(token_id).__name__} {token_id!r:.40}; "
                         "token_to_id looks a token's text up") from None


def _valid_utf8_pieces(run: list[str], byte_of: dict[str, int]) -> list[str]:
    """A run of byte pieces whose invalid UTF-8 parts (as Python's decoder delimits them) become
    literal U+FFFD pieces, one per byte as sentencepiece writes them, which a ByteFallback
    decoder passes through as text."""
    data, out, i = bytes(byte_of[p] for p in run), [], 0
    while i < len(data):
        try:
            data[i:].decode("utf-8")
            return out + run[i:]
        except UnicodeDecodeError as e:
            out += run[i:i + e.start] + ["\ufffd"] * (e.end - e.start)
            i += e.end
    return out


def _special_id(tok, cfg: dict, key: str):
    name = cfg.get(key)
    if isinstance(name, dict):
        name = name.get("content")
    if name and isinstance(name, str):
        return tok.token_to_id(name)
    return None


def _named_special_ids(tok, folder: Path, tcfg: dict) -> dict[str, int]:
    """SPECIAL_TOKEN_NAMES -> id as tokenizer_config.json (`tcfg`, read by the caller) and
    special_tokens_map.json name them (the latter wins, as in transformers), for those in the vocabulary."""
    from .atomic import read_json_object
    from .pathnames import check_model_file

    check_model_file(folder / "special_tokens_map.json", folder)  # a pipe there: a read that never returns
    cfg = {**tcfg, **read_json_object(folder / "special_tokens_map.json")}
    ids = {key: _special_id(tok, cfg, key) for key in SPECIAL_TOKEN_NAMES}
    return {k: i for k, i in ids.items() if i is not None}


# state-spaces' original (mamba_ssm) repos ship no tokenizer; their README loads this one
MAMBA_SSM_TOKENIZER = "EleutherAI/gpt-neox-20b"


def _no_tokenizer(folder, why: str) -> ModelNotFoundError:
    folder = Path(folder)
    # a hub download's snapshot is shared, symlinked cache: files are not added there by hand
    where = ("a local copy of it (`mamba-deploy convert MODEL OUT_DIR` writes one)"
             if "snapshots" in folder.parts else "that folder")
    hint = ""
    try:
        from .checkpoint import read_raw_config

        if "d_model" in read_raw_config(folder):  # mamba_ssm's key (state-spaces' -hf configs carry it too)
            hint = (f"; original mamba_ssm checkpoints (state-spaces/mamba-*) use {MAMBA_SSM_TOKENIZER}'s tokenizer, "
                    "or use the -hf repo (state-spaces/mamba-130m-hf), which ships it")
    except (OSError, ValueError, TypeError, MambaDeployError):
        pass
    return ModelNotFoundError(
        f"no tokenizer in {folder} ({why}); copy the model's tokenizer.json and tokenizer_config.json into "
        f"{where}, or pass --tokenizer PATH where the command has one (from Python: give token ids instead of "
        f"text){hint}")


def _model_vocab(folder: Path) -> int | None:
    try:
        from .checkpoint import read_raw_config

        return int(read_raw_config(folder)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checked_tokenizer(tokenizer, vocab_size: int, label: str | None = None):
    """`tokenizer` for a model of `vocab_size` ids: a folder or hub id with tokenizer files is
    loaded, an object with encode / decode / vocab_size is taken as it is (a Tokenizer, a
    LlamaCppTokenizer), and one with more ids than the model's vocabulary, which belongs to
    another model, is refused. `label` names the value in errors (the CLI: "--tokenizer X")."""
    label = label or f"set_tokenizer({tokenizer!r:.100})"
    if isinstance(tokenizer, (str, os.PathLike)):
        from .hub import resolve

        try:
            tokenizer = load_tokenizer(resolve(tokenizer, weights=False))
        except ModelNotFoundError as e:  # its own fix speaks of the model; the flag is what to change
            raise ModelNotFoundError(f"{label}: {e} (this is the tokenizer: give a folder holding tokenizer.json or "
                                     "tokenizer.model, or a hub id, or leave the option out)") from e
    elif not all(hasattr(tokenizer, a) for a in ("encode", "decode", "vocab_size")):
        raise ConfigError(f"{label}: a tokenizer is a folder or hub id with tokenizer files, or a loaded one "
                          f"(mamba_deploy.tokenizer.load_tokenizer(folder)); got {type(tokenizer).__name__}")
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"{label}: {tokenizer.vocab_size} tokens, more than the model's vocabulary of {vocab_size}; "
                          "it belongs to another model: pass the tokenizer this one was trained with")
    warn_unused_rows(tokenizer.vocab_size, vocab_size, label, "pass the tokenizer this model was trained with")
    return tokenizer


def warn_unused_rows(n: int, rows: int, where: str, fix: str) -> None:
    """Warn when a tokenizer of `n` tokens leaves far more of a model's `rows` embedding rows
    without a token than a checkpoint's vocabulary padding does: likely another model's."""
    if rows - n > max(MAX_PAD_ROWS, rows // MAX_PAD_FRACTION):
        warnings.warn(f"{where}: its tokenizer has {n} tokens for a model of {rows} embedding rows, so the "
                      f"{rows - n} ids from {n} up decode to no text (sampled text comes out empty) and a GGUF "
                      "export pads them as unused tokens; a checkpoint pads its vocabulary by a few ids only. If "
                      f"this is not the model's own tokenizer, {fix}", stacklevel=3)


def load_tokenizer(folder) -> Tokenizer:
    if folder is None:
        raise ModelNotFoundError("this model has no source folder to load a tokenizer from; "
                                 "give token ids instead of text (Python API)")
    folder = _local_or_hub(folder)
    if folder.is_file():
        folder = folder.parent
    # a folder that does not exist locally may be a hub id: transformers resolves those
    if folder.is_dir() and not any((folder / n).is_file() for n in TOKENIZER_SOURCES):
        raise _no_tokenizer(folder, f"none of {', '.join(TOKENIZER_SOURCES)}")
    spm_file = find_sentencepiece(folder)
    if (folder / "tokenizer.json").exists():
        tok = _from_tokenizer_json(folder)
    elif spm_file is not None and not (folder / "tokenizer_config.json").exists():
        tok = _from_sentencepiece(spm_file)
    else:
        tok = _from_transformers(folder)
    rows = _model_vocab(folder)
    if rows is not None and tok.vocab_size < min(MIN_VOCAB, rows // MIN_VOCAB_FRACTION):
        raise _no_tokenizer(folder, f"its tokenizer has {tok.vocab_size} tokens, for a model of {rows}")
    if rows is not None:
        warn_unused_rows(tok.vocab_size, rows, str(folder), "copy the right one in or pass --tokenizer PATH")
    if folder.is_dir():
        from .chat import chat_template_names, read_chat_template
        from .checkpoint import generation_end_ids

        tok.chat_template = read_chat_template(folder)
        tok.chat_template_choices = [] if tok.chat_template else chat_template_names(folder)
        # transformers' generate stops at each of them, and a chat model samples its end-of-turn one
        ends = generation_end_ids(folder)
        tok.end_token_ids = tuple(i for i in ends if i != tok.eos_token_id and i < max(tok.vocab_size, rows or 0))
    return tok


def _local_or_hub(folder) -> Path:
    """load_tokenizer's argument as a local path, or as given where it can only be a hub id
    ("name", "namespace/name") that transformers resolves. A local path that does not exist
    ("/x/missing", "./m", "models/typo" beside a models/ folder: hub.local_path's rule) is refused
    here: transformers took it for a repo id and blamed its form."""
    from .hub import local_path

    if not isinstance(folder, (str, os.PathLike)) or not str(folder).strip():  # Path("") is the working folder
        raise ConfigError(f"load_tokenizer takes a folder (a non-empty str or Path) or a hub id, got "
                          f"{type(folder).__name__} {folder!r:.60}")
    name = str(folder)
    if "/" not in name and os.sep not in name and not name.startswith((".", "~")) and not Path(name).exists():
        return Path(name)  # a bare hub id ("gpt2"): transformers resolves it (hub.local_path takes org/name only)
    try:
        found = local_path(folder)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"the tokenizer folder {str(folder)!r:.120} does not exist; give the folder holding "
                                 "the model's tokenizer.json or tokenizer.model (check the path for a typo, or whether "
                                 f"the model was moved), or a hub id such as {MAMBA_SSM_TOKENIZER!r}") from e
    return Path(folder) if found is None else found


def _corrupt(path: Path, e: Exception) -> ConfigError:
    return ConfigError(f"cannot read {path} ({type(e).__name__}: {e}); the file is corrupt or not a tokenizer file: "
                       "copy it again from the original model, or re-save the tokenizer (save_pretrained)")


def _from_tokenizer_json(folder: Path) -> Tokenizer:
    from .pathnames import check_model_file

    path = folder / "tokenizer.json"
    check_model_file(path, folder)
    try:
        tok = _shared_tokenizer(path.read_bytes())  # from_file takes UTF-8 text only: not every file name is
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for any bad file)
        raise _corrupt(path, e) from e
    tcfg = read_tokenizer_config(folder)
    named = _named_special_ids(tok, folder, tcfg)  # special_tokens_map.json wins, as in transformers
    eos, bos = named.get("eos_token"), named.get("bos_token")
    if eos is None:
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            if tok.token_to_id(name) is not None:
                eos = tok.token_to_id(name)
                break
    return Tokenizer(tok, eos, bos, folder, special_token_ids=named)


# tokenizer.json contents (sha256) -> its `tokenizers.Tokenizer`, most recent last. One per file
# content for the process: the library does not free a dropped BPE tokenizer's cache (~1-2 MB
# once it has encoded text; huggingface/tokenizers #1539), and every load_model / open_runner
# built a new one: a loop of loads that encode text (quantize's calibration, eval) grew without
# bound. Shared safely: nothing here changes a tokenizer after it is made, and encode is
# thread-safe in the library.
_SHARED: dict = {}
_SHARED_MAX = 16
_SHARED_LOCK = threading.Lock()


def _shared_tokenizer(data: bytes):
    from tokenizers import Tokenizer as HFTok

    key = hashlib.sha256(data).digest()
    with _SHARED_LOCK:
        tok = _SHARED.pop(key, None)
        if tok is None:
            tok = HFTok.from_buffer(data)
            # a "truncation" / "padding" block saved in the file (a tokenizer set up for fixed-size
            # training batches) would cut every text to max_length and pad batches with pad ids: eval
            # scored 128 of 2627 tokens without a word. transformers turns both off per call unless
            # asked; so does every encode here
            tok.no_truncation()
            tok.no_padding()
        _SHARED[key] = tok
        while len(_SHARED) > _SHARED_MAX:
            _SHARED.pop(next(iter(_SHARED)))
        return tok


PREFIX = 3  # characters of a special piece that index it (see _SentencePiece)


class _SentencePiece:
    """A sentencepiece processor behind the `tokenizers` calls that Tokenizer makes."""

    def __init__(self, sp, specials, add_eos=False):
        self.sp, self.add_eos = sp, add_eos  # add_eos: a GGUF's add_eos_token (llama.cpp appends the EOS)
        # control / unknown / user-defined pieces written in the text ("</s>", "[INST]") are those
        # tokens, as tokenizer.json's added tokens are and as llama.cpp matches them (parse_special)
        self._specials = sorted(((p, sp.piece_to_id(p)) for p in set(specials) - {""}),
                                key=lambda t: (-len(t[0]), t[1]))
        # where a special may start: one regex scan for their few distinct first PREFIX characters,
        # then a set lookup per distinct length. Mamba-Codestral has ~770 "[control_N]" pieces: a
        # scan of the text per piece cost 2.5x sentencepiece's own encode on bracket-heavy code
        self._pieces = {p for p, _ in self._specials}
        self._lens = sorted({len(p) for p in self._pieces})
        heads = sorted({p[:PREFIX] for p in self._pieces}, key=len, reverse=True)
        self._starts = re.compile("(?=" + "|".join(map(re.escape, heads)) + ")") if heads else None

    def _present(self, text: str) -> set[str]:
        """The special pieces that occur in the text, overlapping ones included."""
        found = set()
        for m in self._starts.finditer(text) if self._starts else ():
            i = m.start()
            found.update(text[i:i + n] for n in self._lens if text[i:i + n] in self._pieces)
        return found

    def _partition(self, text: str) -> list:
        """text -> [str | int]: each special piece cut out, the longest first over the whole text (so
        of two overlapping ones the longer wins, wherever it starts), as llama.cpp's
        tokenizer_st_partition does; each text segment between them is then encoded on its own,
        with its own leading space, as there."""
        parts, present = [text], self._present(text)
        for piece, pid in self._specials:
            if piece not in present:
                continue
            out = []
            for part in parts:
                if isinstance(part, int) or piece not in part:
                    out.append(part)
                    continue
                for j, chunk in enumerate(part.split(piece)):
                    out += ([pid] if j else []) + ([chunk] if chunk else [])
            parts = out
        return parts

    def encode(self, text: str, add_special_tokens: bool = True):
        # a leading <s> where the model has one, as mistral_inference encodes prompts (bos=True)
        ids = [self.sp.bos_id()] if self.sp.bos_id() >= 0 and add_special_tokens else []
        for part in self._partition(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self.sp.encode(part)
        if self.add_eos and self.sp.eos_id() >= 0 and add_special_tokens:
            ids.append(self.sp.eos_id())
        return _Encoding(ids)

    def encode_batch(self, texts, add_special_tokens: bool = True):
        # as `tokenizers`' encode_batch: Tokenizer.encode sends a long text (LONG_TEXT) through it
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids, skip_special_tokens=True):
        # control tokens (bos, eos, [INST]...) decode to nothing; ids past the model's pieces (an
        # embedding padded beyond the vocabulary) are dropped, as `tokenizers` does, not an IndexError
        n = self.sp.get_piece_size()
        return self.sp.decode([i for i in ids if 0 <= i < n])

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # unknown pieces map to <unk>

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    def get_vocab_size(self) -> int:
        return self.sp.get_piece_size()


class _Encoding:
    def __init__(self, ids):
        self.ids = ids


def _from_sentencepiece(path: Path) -> Tokenizer:
    try:
        return sentencepiece_tokenizer(path.read_bytes(), path.parent)
    except OSError as e:
        raise _corrupt(path, e) from e
    except ModuleNotFoundError as e:
        raise _no_tokenizer(path.parent, f"{path.name} is a SentencePiece model, which needs {e.name}: "
                                         f"{install_hint(e.name or 'sentencepiece')}") from e
    except ValueError as e:
        raise _corrupt(path, e) from e


def find_sentencepiece(folder: Path) -> Path | None:
    """The folder's SentencePiece model file (SENTENCEPIECE_FILES, in that order), or None."""
    return next((folder / n for n in SENTENCEPIECE_FILES if (folder / n).is_file()), None)


def sentencepiece_model_class():
    """sentencepiece's ModelProto class (its generated protobuf module, which needs `protobuf`);
    ModuleNotFoundError without either."""
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto


def parse_sentencepiece(model: bytes):
    """A serialized SentencePiece model as its ModelProto. ModuleNotFoundError without
    sentencepiece / protobuf; ValueError for bytes that are not a model."""
    proto = sentencepiece_model_class()()
    try:
        proto.ParseFromString(model)
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError; its base class differs by backend)
        raise ValueError(f"not a SentencePiece model: {type(e).__name__}: {e}") from e
    if not proto.pieces:
        raise ValueError("not a SentencePiece model: it holds no pieces")
    return proto


def sentencepiece_tokenizer(model: bytes, folder=None, add_eos=False) -> Tokenizer:
    """A Tokenizer over a serialized SentencePiece model; errors as parse_sentencepiece.
    add_eos: append the EOS to each text, as llama.cpp does for a GGUF that says add_eos_token."""
    import sentencepiece

    proto = parse_sentencepiece(model)
    kind = proto.SentencePiece  # pieces matched in the text as whole tokens: llama.cpp's parse_special set
    specials = [p.piece for p in proto.pieces if p.type in (kind.UNKNOWN, kind.CONTROL, kind.USER_DEFINED)]
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece refused the model: {e}") from e
    ids = (sp.eos_id(), sp.bos_id())  # -1 where the model defines none
    named = {"unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    return Tokenizer(_SentencePiece(sp, specials, add_eos), *(i if i >= 0 else None for i in ids), folder,
                     special_token_ids={k: i for k, i in named.items() if i >= 0})


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json as a dict ({} when absent), or a ConfigError naming the file."""
    from .pathnames import check_model_file

    path = folder / "tokenizer_config.json"
    if not path.exists():
        return {}
    check_model_file(path, folder)  # not a pipe (a read that never returns) nor a device
    try:
        tcfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # bad JSON, not UTF-8, or nested past the parser
        raise _corrupt(path, e) from e
    if not isinstance(tcfg, dict):
        raise _corrupt(path, TypeError(f"it holds a {type(tcfg).__name__}, not a JSON object"))
    return tcfg


def _own_model_config(folder: Path) -> dict:
    """{"config": ...} for a quantized checkpoint's folder: without a tokenizer_class in its
    tokenizer_config.json, AutoTokenizer picks the class by config.json's model_type, which there
    is config.QUANTIZED_MODEL_TYPE (unknown to transformers on purpose); the model's own type is
    kept beside it. {} for any other folder."""
    from .atomic import read_json_object
    from .config import QUANTIZED_MODEL_TYPE, QUANTIZED_TYPE_KEY

    raw = read_json_object(folder / "config.json")  # {} when absent or unreadable
    if raw.get("model_type") != QUANTIZED_MODEL_TYPE:
        return {}
    from transformers import AutoConfig

    try:
        return {"config": AutoConfig.for_model(raw.get(QUANTIZED_TYPE_KEY))}
    except (ValueError, TypeError):  # a broken marker: load_model names it (config.unmark_quantized)
        return {}


def _from_transformers(folder: Path) -> Tokenizer:
    read_tokenizer_config(folder)  # a corrupt one: name the file, not transformers' JSONDecodeError
    try:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(str(folder), **_own_model_config(folder))
    except Exception as e:  # noqa: BLE001
        # transformers itself missing, or a package its tokenizer class needs (sentencepiece): say how to get it
        why = f"{e}; {install_hint(e.name)}" if isinstance(e, ModuleNotFoundError) and e.name else str(e)
        raise _no_tokenizer(folder, f"no tokenizer.json, and transformers could not load one: {why}") from e
    named = {k: auto.convert_tokens_to_ids(v) for k, v in auto.special_tokens_map.items()
             if k in SPECIAL_TOKEN_NAMES and isinstance(v, str)}
    tok = Tokenizer(auto, auto.eos_token_id, auto.bos_token_id, folder,
                    special_token_ids={k: i for k, i in named.items() if isinstance(i, int)})
    if not tok.encode(PROBE_TEXT):  # files that name a tokenizer class but hold no vocabulary
        raise _no_tokenizer(folder, f"transformers built a tokenizer of {tok.vocab_size} tokens from its files, "
                                    f"which encodes {PROBE_TEXT!r} to no tokens")
    return tok
