"""argparse `type=` callables for numbers with a valid range, shared by every verb's parser: a bad
value is reported by argparse itself (usage line, the flag's name, exit code 2) before any model
is loaded, instead of failing deep inside a stage after minutes of work."""

from __future__ import annotations

import argparse
import difflib
import math
import numbers
import re


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _at_least(kind, text: str, low, strict: bool):
    value = _number(kind, text)
    if value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"{value:g} must be {'>' if strict else '>='} {low:g}")
    return value


def positive_int(text: str) -> int:
    return _at_least(int, text, 1, strict=False)


def bpe_vocab_size(text: str) -> int:
    """A byte-level BPE vocabulary (data.train_tokenizer): at least data.MIN_BPE_VOCAB."""
    from .data import MIN_BPE_VOCAB

    return _at_least(int, text, MIN_BPE_VOCAB, strict=False)


def nonnegative_int(text: str) -> int:
    return _at_least(int, text, 0, strict=False)


def positive_float(text: str) -> float:
    return _at_least(float, text, 0.0, strict=True)


def nonnegative_float(text: str) -> float:
    return _at_least(float, text, 0.0, strict=False)


def _fraction(text: str, low_open: bool, high_open: bool) -> float:
    value = _number(float, text)
    if value < 0 or value > 1 or (low_open and value == 0) or (high_open and value == 1):
        raise argparse.ArgumentTypeError(f"{value:g} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}")
    return value


def top_p(text: str) -> float:
    """Nucleus mass: (0, 1]."""
    return _fraction(text, low_open=True, high_open=False)


def min_p(text: str) -> float:
    """Min-p ratio: [0, 1] (1 keeps only the most probable tokens, as in transformers)."""
    return _fraction(text, low_open=False, high_open=False)


def unit_fraction(text: str) -> float:
    """[0, 1] (SmoothQuant's alpha)."""
    return _fraction(text, low_open=False, high_open=False)


def opset(text: str) -> int:
    """An ONNX opset this exporter can write (the upper bound is the installed onnx's, checked later)."""
    from .export.onnx import MIN_OPSET

    return _at_least(int, text, MIN_OPSET, strict=False)


def scan_chunk(text: str) -> int:
    """export onnx --scan-chunk: 1..MAX_SCAN_CHUNK tokens per Mamba1 prefill Scan iteration."""
    from .errors import ConfigError
    from .export.onnx import check_scan_chunk

    try:
        return check_scan_chunk(_number(int, text))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def is_finite(v) -> bool:
    """math.isfinite that answers False for an int past float's range (10**400) instead of raising."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def check_switch(name: str, value, none: str | None = None):
    """`value` of a yes/no option of the Python API: True or False (and None when `none` says
    what None means); else ConfigError naming it. Used as a bare truth value, "false" or "no"
    switched the option on."""
    from .errors import ConfigError

    if isinstance(value, bool) or (value is None and none is not None):
        return value
    allowed = "True, False or None" + (f" ({none})" if none else "") if none is not None else "True or False"
    raise ConfigError(f"{name} must be {allowed}, got {value!r:.40}")


def is_whole(value, low: int | None = None) -> bool:
    """An integer of the Python API (an int or a numpy integer, not a bool), and >= low when given."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and (low is None or value >= low)


def is_seed(value) -> bool:
    """An int torch.Generator.manual_seed takes: 0 <= seed < 2**64 (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < 2**64


def torch_generator(value):
    """A torch.Generator (CPU) for a seed in 0..2**64-1: seeds below 2**32 as they are, larger ones
    through sha256 to 32 bits. torch's CPU generator keeps only a seed's low 32 bits, so seeds 1
    and 2**32 + 1 made the same inputs; now only a hash collision can."""
    import hashlib

    import torch

    value = int(value)  # a numpy integer passes is_seed
    if value >= 2**32:
        value = int.from_bytes(hashlib.sha256(value.to_bytes(8, "little")).digest()[:4], "little")
    return torch.Generator().manual_seed(value)


def seed(text: str) -> int:
    """--seed: a random seed (is_seed)."""
    value = _number(int, text)
    if not is_seed(value):
        raise argparse.ArgumentTypeError(f"seed {value} is outside 0..2**64-1")
    return value


def threads(text: str) -> int:
    from .errors import ConfigError
    from .runners.base import check_threads

    try:
        return check_threads(_number(int, text))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def threads_or_all(text: str) -> int:
    """0 (every core) or a thread count as for `threads`."""
    value = _number(int, text)
    if value < 0:  # `threads` alone would say ">= 1", but 0 is taken here
        raise argparse.ArgumentTypeError(f"threads must be 0 (every core) or a count >= 1, got {value}")
    return 0 if value == 0 else threads(text)


def port(text: str) -> int:
    value = _number(int, text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535")
    return value


def host_list(text: str) -> list[str]:
    """--allowed-hosts: comma-separated host names or addresses, or * (serve_http.check_allowed_hosts)."""
    from .errors import ConfigError
    from .serve_http import check_allowed_hosts

    try:
        return list(check_allowed_hosts(text.split(",")))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("allowed_hosts", "--allowed-hosts", 1)) from None


def _int_list_problem(text: str) -> tuple[list[int], str | None]:
    """(the integers of a comma-separated list, None), or ([], why `text` is not a list of
    integers >= 1, naming the bad value)."""
    parts = text.split(",")
    values = []
    for x in parts:
        if x.strip():
            try:
                values.append(int(x))
            except ValueError:
                return [], f"{text!r} has {x.strip()!r}, which is not an integer"
    if not values:  # an empty list would skip every case and still pass
        return [], f"{text!r} names no value"
    if len(values) < len(parts):  # "1,,2": a typo, not a list of two
        return [], f"{text!r} has an empty entry"
    bad = [x for x in values if x < 1]
    if bad:
        return [], f"{text!r} has {bad[0]}, which is below 1"
    return values, None


def positive_int_list(text: str) -> list[int]:
    """A comma-separated list of integers >= 1 (`verify --lengths 1,7,257`, `bench --batch 1,8`),
    refused by argparse (`argument --lengths: '1,0' has 0; ...`) otherwise."""
    values, problem = _int_list_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}; give comma-separated integers >= 1, e.g. 1,8")
    return values


def int_list(text, flag: str, example: str) -> list[int]:
    """`text` as in positive_int_list, or the list it already gave (argparse's type=), checked
    again; a ConfigError naming the flag otherwise (callers that build their arguments without the
    parser)."""
    from .errors import ConfigError

    if not isinstance(text, str):
        text = ",".join(map(str, text))
    values, problem = _int_list_problem(text)
    if problem:
        raise ConfigError(f"{flag} {problem}; give comma-separated integers >= 1, e.g. {example}")
    return values


def backend_choice(text: str) -> str:
    """--backend: folded to the name BACKENDS uses (llamacpp -> llama.cpp), refused by argparse otherwise."""
    from .errors import BackendUnavailableError
    from .runners import backend_name

    try:
        return backend_name(text)
    except BackendUnavailableError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for a mistyped verb or flag. An unknown flag is reported by
    the verb it was given to, with that verb's usage (plain argparse names it in the top-level
    usage, which lists verbs, not the flags the user was looking for)."""

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._chosen(ns)
            flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
            hints = [m[0] for e in extras if e.startswith("-")
                     for m in [difflib.get_close_matches(e.split("=", 1)[0], flags, n=1)] if m]
            hint = f" (did you mean {' / '.join(dict.fromkeys(hints))}?)" if hints else ""
            parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return ns

    def _chosen(self, ns) -> argparse.ArgumentParser:
        """The innermost verb's parser that parsing went through (`export onnx`'s for its flags)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest, None))
                if chosen is not None:
                    return chosen._chosen(ns) if isinstance(chosen, Parser) else chosen
        return self

    def error(self, message: str):
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            choices = re.findall(r"'([^']*)'", bad.group(2)) or [c.strip() for c in bad.group(2).split(",")]
            close = difflib.get_close_matches(bad.group(1), choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        super().error(message)
