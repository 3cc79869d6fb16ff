"""docs/cli.md, generated from the parser that `mamba-deploy` itself runs (cli.build_parser), so
the reference lists every verb and flag the code has, with its help text and default:

    python -m mamba_deploy.cli_doc > docs/cli.md

tests/test_cli_doc.py regenerates it and fails when docs/cli.md differs.
"""

from __future__ import annotations

import argparse
import sys

from .errors import BackendUnavailableError

REGENERATE = "python -m mamba_deploy.cli_doc > docs/cli.md"
# argparse wraps usage lines at the terminal's width ($COLUMNS); a fixed width keeps the file the
# same wherever it is generated
WIDTH = 100


class _FixedWidth(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=WIDTH)


def _cell(text: str, code: bool = False) -> str:
    """Text for one markdown table cell: on one line, pipes escaped, and outside a code span `<`
    escaped too (GitHub drops `<glob>` as an unknown HTML tag)."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return f"`{text}`" if code else text.replace("<", "&lt;")


def _metavar(action: argparse.Action) -> str:
    """The value placeholder argparse shows for an argument, e.g. `{fp32,fp16}`, `[M ...]`."""
    if action.metavar is not None:
        name = action.metavar
    elif action.choices is not None:
        name = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        name = action.dest if not action.option_strings else action.dest.upper()
    names = name if isinstance(name, tuple) else (name,)
    n = action.nargs
    if n is None:
        return names[0]
    if n == argparse.OPTIONAL:
        return f"[{names[0]}]"
    if n == argparse.ZERO_OR_MORE:
        return f"[{names[0]} ...]"
    if n == argparse.ONE_OR_MORE:
        return f"{names[0]} [{names[-1]} ...]"
    if n == argparse.REMAINDER:
        return "..."
    return " ".join(names if len(names) == n else names * n)  # an int nargs


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return _metavar(action)
    flags = ", ".join(action.option_strings)
    return flags if action.nargs == 0 else f"{flags} {_metavar(action)}"


def _default(action: argparse.Action) -> str:
    if action.required or (not action.option_strings and action.nargs not in (argparse.OPTIONAL,
                                                                                argparse.ZERO_OR_MORE)):
        return "required"
    if action.nargs == 0:  # a switch: store_true "off"; --version has no default to show
        return "" if action.default == argparse.SUPPRESS else "off"
    value = action.default
    if value is None or value == argparse.SUPPRESS:
        return "not set"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))  # as it would be typed
    return _cell(value, code=True)


def _help(action: argparse.Action, prog: str) -> str:
    """The help text with argparse's %(default)s-style fields filled in, as --help shows it, and
    the choices named where a metavar hides them."""
    text = action.help or ""
    if "%" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params.update(prog=prog)
        if action.choices is not None:
            params["choices"] = ", ".join(map(str, action.choices))
        text = text % params
    if action.choices is not None and action.metavar is not None:
        text = f"{text} (one of: {', '.join(map(str, action.choices))})".lstrip()
    return text


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments worth a row: not -h (every verb has it) nor the sub-verb slot (listed apart)."""
    # argparse has no public list of a parser's arguments; _actions is what its own help reads
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-verb, in the order they were registered."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}  # the help= of add_parser
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _section(parser: argparse.ArgumentParser, summary: str) -> list[str]:
    unavailable = parser.get_default("unavailable")
    if unavailable:  # a placeholder verb: its real flags are unknown here
        raise BackendUnavailableError(f"cannot document `{parser.prog}`: {unavailable}")
    parser.formatter_class = _FixedWidth
    parser.color = False  # Python 3.14+ colours usage lines when it thinks it writes to a terminal
    lines = [f"## `{parser.prog}`", ""]
    if summary:
        lines += [summary[0].upper() + summary[1:] + ("" if summary.endswith(".") else "."), ""]
    lines += ["```text", parser.format_usage().rstrip(), "```", ""]
    subs = _subcommands(parser)
    if subs:
        lines += ["| verb | what it does |", "| --- | --- |"]
        lines += [f"| [{_cell(name, code=True)}](#{_anchor(sub.prog)}) | {_cell(text)} |"
                  for name, text, sub in subs] + [""]
    args = _arguments(parser)
    if args:
        lines += ["| argument | default | description |", "| --- | --- | --- |"]
        lines += [f"| {_cell(_invocation(a), code=True)} | {_default(a)} | {_cell(_help(a, parser.prog))} |"
                  for a in args] + [""]
    return lines


def _anchor(prog: str) -> str:
    """GitHub's heading anchor for `## \\`prog\\``: lower case, spaces to hyphens."""
    return prog.lower().replace(" ", "-")


def _walk(parser: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = _section(parser, summary)
    for _, text, sub in _subcommands(parser):
        lines += _walk(sub, text)
    return lines


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The markdown of docs/cli.md for `parser` (default: the `mamba-deploy` parser). Raises
    BackendUnavailableError where a verb is a placeholder for a missing optional package."""
    if parser is None:
        from .cli import build_parser

        parser = build_parser()
    head = ["# Command-line reference", "",
            f"Generated from the argument parser by `{REGENERATE}`; do not edit it by hand",
            "(`tests/test_cli_doc.py` fails when this file and the parser differ). README's \"Command line\"",
            "section has the overview.", ""]
    return "\n".join(head + _walk(parser, parser.description or "")).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
