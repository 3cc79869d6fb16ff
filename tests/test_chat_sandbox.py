"""chat_sandbox: a chat template's render is bounded in time (every loop iteration checks a
deadline) and in size (the growing operations are checked before they run), while templates that
stay within the bounds render exactly as transformers' apply_chat_template renders them.

The hostile templates here were not run on the previous code: there the loops ran for hours and
the growing expressions asked for gigabytes to terabytes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mamba_deploy import chat_sandbox
from mamba_deploy.chat import ChatTemplateError, render_chat

MESSAGES = [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "again"}]

LOOPS = {
    "nested": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "filtered": "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}x",
    "recursive": ("{% for i in range(100000) recursive %}{% if loop.depth < 4 %}{{ loop(range(100000)) }}"
                  "{% endif %}{% endfor %}x"),
    "in_macro": ("{% macro spin(n) %}{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}"
                 "{% endmacro %}{{ spin(100000) }}"),
    # no loop at all: 2**40 calls of a macro that writes nothing
    "recursive_macro": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}.",
}


@pytest.mark.parametrize("name", list(LOOPS))
def test_a_template_that_loops_without_writing_stops_at_the_deadline(monkeypatch, name):
    monkeypatch.setattr(chat_sandbox, "RENDER_SECONDS", 0.5)
    t = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"ran past 0.5 s for this conversation; check its loops"):
        render_chat(LOOPS[name], MESSAGES)
    assert time.monotonic() - t < 5  # the deadline, not the loops' hours


GROWING = {
    "|center": ("{{ 'a'|center(10**10) }}", "|center"),
    "str.center": ("{{ 'a'.center(10**10) }}", "str.center"),
    "str.zfill": ("{{ '1'.zfill(10**11) }}", "str.zfill"),
    "str.replace": ("{% set s = 'a' * 1000000 %}{{ s.replace('a', s) }}", "str.replace"),
    "|replace": ("{% set s = 'a' * 1000000 %}{{ s|replace('a', s) }}", "|replace"),
    "str.join": ("{% set s = 'a' * 1000000 %}{{ s.join(['x'] * 100000) }}", "str.join"),
    "|join": ("{% set s = 'a' * 1000000 %}{{ (['x'] * 100000)|join(s) }}", "|join"),
    "str.expandtabs": ("{% set s = '\t' * 1000000 %}{{ s.expandtabs(1000) }}", "str.expandtabs"),
    "|indent": ("{% set s = '\n' * 1000000 %}{{ s|indent(100000) }}", "|indent"),
    "%": ("{{ '%1000000000s' % 'x' }}", "'%1000000000s'"),
    "str.format": ("{{ '{:>1000000000}'.format('x') }}", "'{:>1000000000}'"),
    "|format": ("{{ '%1000000000s'|format('x') }}", "'%1000000000s'"),
    "|batch": ("{{ [1]|batch(10**9, 0)|list|length }}", "|batch filter makes groups of 1000000000"),
    "|slice": ("{{ [1]|slice(10**9, 0)|list|length }}", "|slice filter makes groups of 1000000000"),
    "|tojson": ("{{ messages|tojson(indent=10**8) }}", "indent=100000000, past 64"),
    "list *": ("{{ ([1] * 10**9)|length }}", "repeats a list 1000000000 times"),
    # a review's escapes from the first version of these bounds
    "~ doubling": ('{% set a = "x" * 60000000 %}{% set a = a ~ a %}{% set a = a ~ a %}{{ a|length }}',
                   "joins strings with `~`"),
    "+ doubling": ('{% set a = "x" * 60000000 %}{% set a = a + a + a + a %}{{ a|length }}', "adds two strs"),
    "% width from args": ('{{ ("%*s" % (10**8 * 2, ""))|length }}', "formats '%*s' with a width"),
    "% precision": ('{{ "%.200000000f" % 1.5 }}', "with a width or precision"),
    "format nested width": ('{{ "{:{}}".format("", 200000000)|length }}', "formats '{:{}}' with a width"),
    "|format width from args": ('{{ ("%*s"|format(200000000, ""))|length }}', "formats '%*s' with a width"),
    "map|join": ('{% set s = "a" * 1000000 %}{{ range(100000)|map("string")|join(s)|length }}', "|join"),
    "str.join of a generator": ('{% set s = "a" * 1000000 %}{{ s.join(range(100000)|map("string"))|length }}',
                                "str.join"),
    "nested lists": ('{% set x = [1] * 4000000 %}{{ ([x] * 60)|string|length }}', "repeats a list 60 times"),
    "lipsum": ("{{ lipsum(n=20000, html=False, min=100, max=101)|length }}", "lipsum asks for n=20000"),
}


@pytest.mark.parametrize("name", list(GROWING))
def test_growing_expressions_are_refused_before_they_run(name):
    template, words = GROWING[name]
    t = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        render_chat(template, MESSAGES)
    assert words in str(e.value), str(e.value)
    assert time.monotonic() - t < 2


# templates that use what the bounds touch (loops with loop.*, recursion, else, the bounded
# filters and methods at ordinary sizes); transformers renders each for the same conversation
WITHIN = [
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role|center(12) }}:{{ m.content|indent(2) }}"
    "{% if not loop.last %}|{% endif %}{% endfor %}{% for i in [] %}x{% else %}(none){% endfor %}",
    "{% for m in messages if m.role == 'user' %}{{ m.content|replace('\n', ' ') }}{{ loop.cycle(';', ',') }}"
    "{% endfor %}{{ messages|map(attribute='role')|join(', ') }}{{ '%-6s|' % 'ab' }}{{ '{:>5}'.format('z') }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% for c in m.content %}{% set ns.n = ns.n + 1 %}"
    "{% endfor %}{% endfor %}{{ ns.n }} {{ (messages|batch(2, 'pad')|list)|length }} {{ messages|tojson(indent=2) }}"
    "{{ 'ab'.ljust(4, '.') }}{{ '7'.zfill(3) }}",
    "{% for m in [{'content': 'a', 'kids': [{'content': 'b', 'kids': []}]}] recursive %}{{ m.content }}"
    "{% if m.kids %}[{{ loop(m.kids) }}]{% endif %}{% endfor %}{{ raise_exception is defined }}",
]


WITHIN += [
    # a number of 9+ digits in a formatted string is text, not a width
    '{{ "id-%s-1234567890" % "x" }} {{ "{}-{:>8}-123456789012".format(1, "y") }} {{ "%d" % 1700000000123 }}',
    (Path(__file__).parent / "data" / "chat_templates" / "features.jinja").read_text(),  # a review's feature tour
]


@pytest.mark.parametrize("i", range(len(WITHIN)))
def test_templates_within_the_bounds_render_as_transformers_renders_them(i, tmp_path):
    transformers = pytest.importorskip("transformers")
    import json
    import shutil

    demo = Path(__file__).resolve().parents[1] / "models" / "demo-mamba2"
    folder = tmp_path / "m"
    shutil.copytree(demo, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": WITHIN[i]}))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    want = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render_chat(WITHIN[i], MESSAGES, tok.bos_token or "", tok.eos_token or "") == want


TEMPLATES = sorted((Path(__file__).parent / "data" / "chat_templates").glob("*.jinja"))
CONVERSATIONS = {
    "system_user_assistant_user": [
        {"role": "system", "content": "Be nice.\nAlways."},
        {"role": "user", "content": "Hello there friend, how are you today"},
        {"role": "assistant", "content": "<think>\nhm\n</think>\nFine\nthanks"},
        {"role": "user", "content": "good  \n  bye"}],
    "user_assistant_user": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                            {"role": "user", "content": "one two three four five six"}],
    "tool_calls": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_w", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "20C"}, {"role": "tool", "content": "sunny"}],
}


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_model_style_templates_render_as_transformers_renders_them(path):
    """Templates written after ChatML, Llama 3 / 3.1, Mistral, Gemma, Phi-3, Qwen 2.5 (tools) and
    Qwen 3 (namespace), Falcon, and a tour of Jinja features (caller macros, break / continue,
    recursive loops, loop.cycle / previtem / changed, batch / slice, indent, tojson, format):
    the bounded sandbox renders each as transformers' own renderer does (or both refuse)."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    if not hasattr(utils, "render_jinja_template"):
        pytest.skip("this transformers has no render_jinja_template")
    template = path.read_text()
    for name, conversation in CONVERSATIONS.items():
        for gen in (True, False):
            try:
                want = utils.render_jinja_template([conversation], chat_template=template, add_generation_prompt=gen,
                                                   bos_token="<s>", eos_token="</s>")[0][0]
            except Exception as e:  # noqa: BLE001  (the template's own refusal)
                with pytest.raises(ChatTemplateError, match="refused the conversation"):
                    render_chat(template, conversation, "<s>", "</s>", add_generation_prompt=gen)
                assert "roles must alternate" in str(e) or "not supported" in str(e), str(e)
                continue
            assert render_chat(template, conversation, "<s>", "</s>", add_generation_prompt=gen) == want, (name, gen)
