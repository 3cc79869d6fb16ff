"""The Jinja environment chat templates render in: transformers' sandboxed setup (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`, `{% generation %}`)
with bounds on what one render may cost.

A chat template comes with the model, from whoever published it, and the server renders it for
every request. Jinja's sandbox keeps a template from reaching Python's internals, not from taking
the machine: one expression ("x" * 10**10, "a".center(10**10), s.replace("a", s)) could allocate
gigabytes, a few `{% set a = a ~ a %}` double a string past any memory, and nested loops over
range(100000), or a macro that calls itself twice, ran for hours without writing a character.
Here:
- the render's deadline (RENDER_SECONDS) is checked at every loop iteration (a call the code
  generator puts at the start of each loop body), every call (macros, methods) and every filter;
- what a value would cost as text (`weight`: its characters, 8 per other item, through nested
  lists and dicts) is checked before the operations that build values run: `*`, `+`, `~`, `**`,
  `%` and str.format (widths and precisions, also those taken from the arguments), the str
  methods and filters that grow a string by an argument, `join` over any iterable; and after
  every call and filter, against MAX_RENDERED_CHARS;
- chat.render_chat caps the characters written.
"""

from __future__ import annotations

import json
import re
import string
import time
from datetime import datetime

from .errors import ConfigError


class ChatTemplateError(ConfigError):
    """The template refused the conversation (its raise_exception), or could not be rendered."""


MAX_RENDERED_CHARS = 64 * 2**20  # a rendered conversation: 8x the server's request body limit
MAX_POWER = 4096  # exponents a template's `**` may use on integers
MAX_FILL = 2**20  # items the batch / slice filters may create to pad their groups
MAX_LIPSUM = 64  # paragraphs (and words per paragraph / 16) of the lipsum global
RENDER_SECONDS = 5.0  # real templates render in milliseconds
ITEM_WEIGHT = 8  # what a non-string item (a number, None) is counted as in `weight`
# str methods whose result grows with an argument (their size before they run: _method_size)
GROWING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "replace", "join", "expandtabs"})
# a printf-style conversion: (width, precision), either may be "*" (taken from the arguments)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[diouxXeEfFgGcrsa%]")
_SPEC_NUMBERS = re.compile(r"\d+")


def _too_big(what: str) -> ChatTemplateError:
    return ChatTemplateError(f"the chat template {what}, past {MAX_RENDERED_CHARS} characters (or items)")


def weight(x, budget: int = MAX_RENDERED_CHARS) -> int:
    """Roughly the characters str(x) would take: a string's length, ITEM_WEIGHT for any other
    item, through nested lists, tuples and dicts (each shared reference counted again, as str()
    writes it again). Stops once past `budget` (the answer is then > budget)."""
    stack, total = [x], 0
    while stack and total <= budget:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += 2
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            total += ITEM_WEIGHT
    return total


def _check_result(value, what: str):
    if isinstance(value, (str, list, tuple, dict)) and weight(value) > MAX_RENDERED_CHARS:
        raise _too_big(what)
    return value


def _check_printf(fmt, args) -> None:
    """`fmt % args`: no width or precision past the bound, written or taken from args ("*")."""
    if not isinstance(fmt, str):
        return
    star_args = args if isinstance(args, tuple) else (args,)
    for width, precision in _PRINTF.findall(fmt):
        numbers = [int(n) for n in (width, precision) if n.isdigit()]
        if "*" in (width, precision):  # taken from the arguments: any of them may be the one
            numbers += [a for a in star_args if isinstance(a, int) and not isinstance(a, bool)]
        if any(n > MAX_RENDERED_CHARS for n in numbers):
            raise _too_big(f"formats {fmt[:60]!r} with a width or precision")


def _check_format(fmt, args, kwargs) -> None:
    """`fmt.format(*args, **kwargs)`: the same for str.format's specs, nested ones ("{:{}}") too."""
    if not isinstance(fmt, str):
        return
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
    except ValueError:  # malformed: str.format raises it itself
        return
    for spec in specs:
        numbers = [int(n) for n in _SPEC_NUMBERS.findall(spec)]
        if "{" in spec:  # a nested field takes the width from the arguments
            numbers += [a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
        if any(n > MAX_RENDERED_CHARS for n in numbers):
            raise _too_big(f"formats {fmt[:60]!r} with a width or precision")


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
        return len(s) * max(len(arg) - 1, 0) + weight(arg)
    return 0


def _filter_size(name: str, value, args: tuple, kwargs: dict) -> int:
    """The length of value|name(*args) before it runs, where an argument can grow it (0 for
    the rest); ChatTemplateError for a fill count past MAX_FILL or a format width past the bound."""
    arg = args[0] if args else next(iter(kwargs.values()), None)
    if name in ("batch", "slice"):
        if isinstance(arg, int) and arg > MAX_FILL:
            raise ChatTemplateError(f"the chat template's |{name} filter makes groups of {arg}, past {MAX_FILL}")
    elif name == "format":  # value % (args or kwargs), as jinja's filter does
        _check_printf(value, args)
    elif name == "center" and isinstance(value, str):
        return arg if isinstance(arg, int) else 0
    elif name == "indent" and isinstance(value, str):
        width = arg if isinstance(arg, int) else len(arg) if isinstance(arg, str) else 4
        return len(value) + width * (value.count("\n") + 1)
    elif name == "replace" and isinstance(value, str):
        return _method_size(value, "replace", args, kwargs)
    elif name == "join" and isinstance(value, (list, tuple)):
        return _method_size(arg if isinstance(arg, str) else "", "join", (value,), {})
    return 0


def environment():
    """A fresh sandboxed environment whose renders must end by time.monotonic() + RENDER_SECONDS
    from when this is called (chat.render_chat makes one per render)."""
    try:
        from jinja2 import ext, nodes
        from jinja2.compiler import CodeGenerator
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import generate_lorem_ipsum
    except ModuleNotFoundError as e:  # torch depends on jinja2, so this is rare
        raise ConfigError("chat templates need jinja2: pip install jinja2") from e

    deadline = time.monotonic() + RENDER_SECONDS

    def tick(*_):
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"the chat template ran past {RENDER_SECONDS:g} s for this conversation; "
                                    "check its loops and recursive macros")
        return ""

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int) and indent > 64:  # repeated per nesting level and line
            raise ChatTemplateError(f"the chat template's |tojson takes indent={indent}, past 64")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def lipsum(n=5, html=True, min=20, max=100):  # noqa: A002  (jinja's own argument names)
        if any(isinstance(v, int) and v > MAX_LIPSUM * (16 if i else 1) for i, v in enumerate((n, min, max))):
            raise ChatTemplateError(f"the chat template's lipsum asks for n={n}, min={min}, max={max}; "
                                    f"at most {MAX_LIPSUM} paragraphs of {MAX_LIPSUM * 16} words")
        return generate_lorem_ipsum(n, html, min, max)

    def concat(parts):
        """`a ~ b ~ ...`: its parts as text, their total checked before they are joined."""
        tick()
        texts = [p if isinstance(p, str) else str(_check_result(p, "writes a value")) for p in parts]
        if sum(len(t) for t in texts) > MAX_RENDERED_CHARS:
            raise _too_big("joins strings with `~`")
        return "".join(texts)

    def bounded_filter(name: str, fn):
        lead = 1 if hasattr(fn, "jinja_pass_arg") else 0  # @pass_eval_context filters take the context first

        def bounded(*args, **kwargs):
            tick()
            if len(args) > lead:
                value = args[lead]
                if name == "join" and not isinstance(value, (str, list, tuple, dict)):
                    value = list(value)  # a generator (|map): its items, to measure before joining
                    args = (*args[:lead], value, *args[lead + 1:])
                if _filter_size(name, value, args[lead + 1:], kwargs) > MAX_RENDERED_CHARS:
                    raise _too_big(f"grows a value with |{name}")
            return _check_result(fn(*args, **kwargs), f"makes a value with |{name}")

        if lead:
            bounded.jinja_pass_arg = fn.jinja_pass_arg
        return bounded

    class GenerationBlock(ext.Extension):
        """{% generation %}...{% endgeneration %}, which transformers' templates use to mark the
        assistant's tokens (assistant-only training losses; SmolLM3): its body, as rendered."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedCode(CodeGenerator):
        """Each loop body starts with environment.tick() (the deadline check); `~` goes through
        environment.checked_concat."""

        def visit_For(self, node, frame):
            call = nodes.Call(nodes.EnvironmentAttribute("tick", lineno=node.lineno), [], [], None, None,
                              lineno=node.lineno)
            node.body = [nodes.ExprStmt(call, lineno=node.lineno), *node.body]
            super().visit_For(node, frame)

        def visit_Concat(self, node, frame):
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Bounded(ImmutableSandboxedEnvironment):
        """The operators and calls that build values, checked (module docstring)."""
        intercepted_binops = frozenset(["*", "**", "%", "+"])
        code_generator_class = BoundedCode

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 0 \
                        and weight(seq, MAX_RENDERED_CHARS // n) * n > MAX_RENDERED_CHARS:
                    raise _too_big(f"repeats a {type(seq).__name__} {n} times")
            elif operator == "+":
                if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                        and weight(left) + weight(right) > MAX_RENDERED_CHARS:
                    raise _too_big(f"adds two {type(left).__name__}s")
            elif operator == "%":
                _check_printf(left, right)
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > MAX_POWER:
                raise ChatTemplateError(f"the chat template raises {left} to the power {right}, past {MAX_POWER}")
            return _check_result(super().call_binop(context, operator, left, right), f"makes a value with {operator}")

        def wrap_str_format(self, value):
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            fmt = value.__self__

            def checked(*args, **kwargs):
                _check_format(fmt, args, args[0] if value.__name__ == "format_map" and args else kwargs)
                return _check_result(wrapped(*args, **kwargs), "formats a string")

            return checked

        def call(self, context, obj, /, *args, **kwargs):
            tick()
            owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
            if isinstance(owner, str) and name == "join" and args and not isinstance(args[0], (list, tuple, str)):
                args = (list(args[0]), *args[1:])  # a generator: its items, to measure before joining
            if isinstance(owner, str) and name in GROWING_METHODS \
                    and _method_size(owner, name, args, kwargs) > MAX_RENDERED_CHARS:
                raise _too_big(f"calls str.{name} for a result")
            return _check_result(super().call(context, obj, *args, **kwargs), f"calls {name or 'a function'}")

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols, GenerationBlock])
    env.tick, env.checked_concat, env.deadline = tick, concat, deadline
    for name in list(env.filters):
        env.filters[name] = bounded_filter(name, tojson if name == "tojson" else env.filters[name])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["lipsum"] = lipsum
    return env
