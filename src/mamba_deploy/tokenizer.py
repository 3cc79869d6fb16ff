"""Tokenizer from a checkpoint folder: `tokenizers` for tokenizer.json, else transformers."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelNotFoundError


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str, eos_token_id / bos_token_id."""

    def __init__(self, tok, eos_token_id=None, bos_token_id=None, path=None):
        self._tok = tok
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids if hasattr(self._tok, "token_to_id") else self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if hasattr(self._tok, "token_to_id"):
            return self._tok.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if hasattr(self._tok, "get_vocab_size") else len(self._tok)


def _special_id(tok, cfg: dict, key: str):
    name = cfg.get(key)
    if isinstance(name, dict):
        name = name.get("content")
    if name:
        return tok.token_to_id(name)
    return None


def load_tokenizer(folder) -> Tokenizer:
    if folder is None:
        raise ModelNotFoundError("this model has no source folder to load a tokenizer from; pass token ids instead of text")
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    tj = folder / "tokenizer.json"
    if tj.exists():
        import json

        from tokenizers import Tokenizer as HFTok

        tok = HFTok.from_file(str(tj))
        tcfg = {}
        if (folder / "tokenizer_config.json").exists():
            tcfg = json.loads((folder / "tokenizer_config.json").read_text())
        eos = _special_id(tok, tcfg, "eos_token")
        bos = _special_id(tok, tcfg, "bos_token")
        if eos is None:
            for name in ("<|endoftext|>", "</s>", "<eos>"):
                if tok.token_to_id(name) is not None:
                    eos = tok.token_to_id(name)
                    break
        return Tokenizer(tok, eos, bos, folder)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise ModelNotFoundError(
            f"no tokenizer in {folder} (no tokenizer.json, and transformers could not load one: {e}); "
            "copy the tokenizer files into the folder or pass token ids"
        ) from e
    return Tokenizer(tok, tok.eos_token_id, tok.bos_token_id, folder)
