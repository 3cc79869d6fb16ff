"""docs/cli.md is generated from the CLI's argparse parser, and README's "Command line" table
names only flags the parser has: a flag added, renamed or removed without the docs fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mamba_deploy.cli import build_parser
from mamba_deploy.cli_doc import REGENERATE, render
from mamba_deploy.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]


def _render() -> str:
    try:
        return render()
    except BackendUnavailableError as e:  # a verb is a placeholder: its flags cannot be read here
        pytest.skip(f"an optional package is missing, so the full CLI cannot be documented: {e}")


def test_docs_cli_md_is_up_to_date():
    doc = ROOT / "docs" / "cli.md"
    want = _render()
    got = doc.read_text(encoding="utf-8") if doc.exists() else ""
    assert got == want, f"docs/cli.md differs from the CLI parser; regenerate it: {REGENERATE}"


def test_the_reference_does_not_depend_on_the_terminal_width(monkeypatch):
    """argparse wraps usage at $COLUMNS; the generated file must be the same everywhere."""
    monkeypatch.setenv("COLUMNS", "40")
    narrow = _render()
    monkeypatch.setenv("COLUMNS", "300")
    assert _render() == narrow


def test_the_reference_lists_every_verb_and_flag():
    """A spot check that the walk reaches nested verbs and options registered by stage modules."""
    text = _render()
    for heading in ("## `mamba-deploy generate`", "## `mamba-deploy export onnx`", "## `mamba-deploy serve`"):
        assert heading in text
    assert "| `--stop-string TEXT` | not set | stop at this text" in text
    assert "| `--max-new-tokens MAX_NEW_TOKENS` | `64` |" in text


def _readme_command_rows() -> list[str]:
    """The first cell of each row of the table in README's "## Command line" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `mamba-deploy ")]
    assert rows, "README's Command line section has no table rows naming `mamba-deploy VERB`"
    return [re.split(r"(?<!\\)\|", row)[1] for row in rows]


def _verb_parser(words: list[str]):
    """The parser of the deepest verb that `words` names (`export onnx` -> its own parser)."""
    parser = build_parser()
    for word in words:
        subs = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


_ROWS = _readme_command_rows()


@pytest.mark.parametrize("cell", _ROWS, ids=[re.search(r"mamba-deploy ([a-z -]*[a-z])", c).group(1) for c in _ROWS])
def test_readme_command_table_names_real_flags(cell):
    for usage in re.findall(r"`(mamba-deploy [^`]*)`", cell):
        parser = _verb_parser(usage.split()[1:])
        assert parser.prog != "mamba-deploy", f"README's Command line table shows `{usage}`, which names no verb"
        if parser.get_default("unavailable"):
            pytest.skip(parser.get_default("unavailable"))
        options = {s for a in parser._actions for s in a.option_strings}
        missing = sorted(set(re.findall(r"--[a-z][a-z0-9-]*", usage)) - options)
        assert not missing, f"README's Command line table shows {missing} for `{parser.prog}`, which has no such flag"
