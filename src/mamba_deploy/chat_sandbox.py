"""The Jinja environment chat templates render in: transformers' sandboxed setup (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`, `{% generation %}`)
with bounds on what one render may cost.

A chat template comes with the model, from whoever published it, and the server renders it for
every request. Jinja's sandbox keeps a template from reaching Python's internals, not from taking
the machine: one expression ("x" * 10**10, "a".center(10**10), s.replace("a", s)) could allocate
gigabytes, and nested loops over range(100000) ran for hours without writing a character. Here:
- every loop iteration checks the render's deadline (RENDER_SECONDS), through a call the code
  generator puts at the start of each loop body (recursive loops included);
- `*` and `**`, the str methods and filters that grow a string or list by an argument, and
  `%` / str.format widths are checked before they run against MAX_RENDERED_CHARS;
- chat.render_chat caps the characters written.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

from .errors import ConfigError


class ChatTemplateError(ConfigError):
    """The template refused the conversation (its raise_exception), or could not be rendered."""


MAX_RENDERED_CHARS = 64 * 2**20  # a rendered conversation: 8x the server's request body limit
MAX_POWER = 4096  # exponents a template's `**` may use on integers
MAX_FILL = 2**20  # items the batch / slice filters may create to pad their groups
RENDER_SECONDS = 5.0  # real templates render in milliseconds
# str methods whose result grows with an argument (its size: _method_size); format's widths: _check_width
GROWING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "replace", "join", "expandtabs"})
_DIGITS = re.compile(r"\d{9,}")  # a width of 100000000 or more in a %- or {}-format string


def _too_big(what: str) -> ChatTemplateError:
    return ChatTemplateError(f"the chat template {what}, past {MAX_RENDERED_CHARS} characters or items")


def _check_width(fmt) -> None:
    if isinstance(fmt, str) and any(int(d) > MAX_RENDERED_CHARS for d in _DIGITS.findall(fmt)):
        raise _too_big(f"formats with a width in {fmt[:60]!r}")


def _method_size(s: str, name: str, args, kwargs) -> int:
    """The length of s.<name>(*args) before it runs (0 where it cannot grow past s)."""
    arg = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("ljust", "rjust", "center", "zfill"):
        return arg if isinstance(arg, int) else 0
    if name == "expandtabs":
        return len(s) + s.count("\t") * (arg if isinstance(arg, int) else 8)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        hits = s.count(old) if old else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            hits = min(hits, args[2])
        return len(s) + hits * (len(new) - len(old))
    if name == "join" and isinstance(arg, (list, tuple)):
        return len(s) * max(len(arg) - 1, 0) + sum(len(x) for x in arg if isinstance(x, str))
    return 0


def _filter_size(name: str, value, args: tuple, kwargs: dict) -> int:
    """The length of value|name(*args) before it runs (0 where it cannot grow past value);
    ChatTemplateError for a fill count past MAX_FILL."""
    arg = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("batch", "slice"):
        if isinstance(arg, int) and arg > MAX_FILL:
            raise ChatTemplateError(f"the chat template's |{name} filter makes groups of {arg}, past {MAX_FILL}")
        return 0
    if name == "format":
        _check_width(value)
        return 0
    if not isinstance(value, str) and name != "join":
        return 0
    if name == "center":
        return arg if isinstance(arg, int) else 0
    if name == "indent":
        width = arg if isinstance(arg, int) else len(arg) if isinstance(arg, str) else 4
        return len(value) + width * (value.count("\n") + 1)
    if name == "replace":
        return _method_size(value, "replace", args, kwargs)
    if name == "join" and isinstance(value, (list, tuple)):
        sep = arg if isinstance(arg, str) else ""
        return _method_size(sep, "join", (value,), {})
    return 0


def _bounded_filter(name: str, fn):
    """A builtin filter checked by _filter_size before it runs."""
    lead = 1 if hasattr(fn, "jinja_pass_arg") else 0  # @pass_eval_context filters take the context first

    def bounded(*args, **kwargs):
        if len(args) > lead and _filter_size(name, args[lead], args[lead + 1:], kwargs) > MAX_RENDERED_CHARS:
            raise _too_big(f"grows a value with |{name}")
        return fn(*args, **kwargs)

    if lead:
        bounded.jinja_pass_arg = fn.jinja_pass_arg
    return bounded


BOUNDED_FILTERS = ("center", "indent", "replace", "join", "batch", "slice", "format")


def environment():
    """A fresh sandboxed environment whose renders must end by time.monotonic() + RENDER_SECONDS
    from when this is called (chat.render_chat makes one per render)."""
    try:
        from jinja2 import ext, nodes
        from jinja2.compiler import CodeGenerator
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ModuleNotFoundError as e:  # torch depends on jinja2, so this is rare
        raise ConfigError("chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int) and indent > 64:  # repeated per nesting level and line
            raise ChatTemplateError(f"the chat template's |tojson takes indent={indent}, past 64")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class GenerationBlock(ext.Extension):
        """{% generation %}...{% endgeneration %}, which transformers' templates use to mark the
        assistant's tokens (assistant-only training losses; SmolLM3): its body, as rendered."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class TimedLoops(CodeGenerator):
        """Each loop body starts with a call of environment.loop_tick (the deadline check)."""

        def visit_For(self, node, frame):
            tick = nodes.Call(nodes.EnvironmentAttribute("loop_tick", lineno=node.lineno), [], [], None, None,
                              lineno=node.lineno)
            node.body = [nodes.ExprStmt(tick, lineno=node.lineno), *node.body]
            super().visit_For(node, frame)

    class Bounded(ImmutableSandboxedEnvironment):
        """`*`, `**`, `%` and the growing str methods checked before they run."""
        intercepted_binops = frozenset(["*", "**", "%"])
        code_generator_class = TimedLoops

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                    raise _too_big(f"repeats a {type(seq).__name__} {n} times")
            elif operator == "%":
                _check_width(left)
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > MAX_POWER:
                raise ChatTemplateError(f"the chat template raises {left} to the power {right}, past {MAX_POWER}")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value):
            if getattr(value, "__name__", "") in ("format", "format_map"):
                _check_width(getattr(value, "__self__", None))
            return super().wrap_str_format(value)

        def call(self, context, obj, /, *args, **kwargs):
            owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
            if isinstance(owner, str) and name in GROWING_METHODS \
                    and _method_size(owner, name, args, kwargs) > MAX_RENDERED_CHARS:
                raise _too_big(f"calls str.{name} for a result")
            return super().call(context, obj, *args, **kwargs)

    deadline = time.monotonic() + RENDER_SECONDS

    def loop_tick():
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"the chat template ran past {RENDER_SECONDS:g} s for this conversation; "
                                    "check its loops")
        return ""

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols, GenerationBlock])
    env.loop_tick = loop_tick
    env.deadline = deadline
    for name in BOUNDED_FILTERS:
        env.filters[name] = _bounded_filter(name, env.filters[name])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
