"""Chat prompts: a model's chat template (Jinja, as transformers and llama.cpp store it) turned into
the token ids of a conversation, for `generate --chat` and the server's /v1/chat/completions.

Where the template comes from, in order: a chat_template.jinja file (what transformers >= 4.49
saves; it wins, as there), tokenizer_config.json's "chat_template" (a string, or a list of named
templates, of which the one named "default"), a GGUF's tokenizer.chat_template. It renders as transformers' apply_chat_template does
(sandboxed Jinja, trim_blocks / lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, the
special-token names bos_token, eos_token, pad_token, unk_token, ... that the tokenizer defines), and
the text is tokenized WITHOUT the tokenizer's own special tokens: templates write the BOS
themselves ("{{ bos_token }}"), so adding it again would double it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .chat_sandbox import MAX_RENDERED_CHARS, ChatTemplateError, environment
from .errors import ConfigError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
GGUF_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
ROLES = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system turn (o1 and later clients send it): templates know "system"
ROLE_ALIASES = {"developer": "system"}


def read_chat_template(folder) -> str | None:
    """The chat template of a tokenizer folder, or None."""
    from .tokenizer import read_tokenizer_config

    folder = Path(_check_path(folder, "read_chat_template's folder", "a tokenizer folder"))
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():  # first, as transformers reads them: the file wins over tokenizer_config.json's entry
        from .pathnames import check_model_file

        check_model_file(path, folder)
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path} ({e}); copy it again from the original model") from e
    tmpl = read_tokenizer_config(folder).get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        tmpl = _named_templates(tmpl).get("default")  # none of several: transformers refuses to guess, so do we
    if isinstance(tmpl, str) and tmpl.strip():
        return tmpl
    return None


def _named_templates(tmpl) -> dict:
    return {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)} if isinstance(tmpl, list) else {}


def named_chat_templates(folder) -> dict[str, str]:
    """tokenizer_config.json's named chat templates other than "default" (name -> Jinja), which a
    GGUF export writes as llama.cpp's converter does (tokenizer.chat_template.NAME)."""
    from .tokenizer import read_tokenizer_config

    named = _named_templates(read_tokenizer_config(Path(folder)).get("chat_template"))
    return {str(n): t for n, t in named.items() if n != "default" and isinstance(t, str) and t.strip()}


def chat_template_names(folder) -> list[str]:
    """The names of tokenizer_config.json's chat templates when it lists several and none is
    "default" (then none is used: a chat prompt's error names them)."""
    from .tokenizer import read_tokenizer_config

    named = _named_templates(read_tokenizer_config(Path(folder)).get("chat_template"))
    return [] if "default" in named else sorted(map(str, named))


def read_template_file(path) -> str:
    """The text of a --chat-template FILE (generate --chat, serve); ConfigError naming it."""
    _check_path(path, "--chat-template", "a Jinja template file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --chat-template {path!r} ({e}); pass a Jinja template file") from e
    try:
        return check_template(text)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"--chat-template {path!r}: {e}") from e


def _check_path(path, what: str, kind: str):
    """A str or os.PathLike, else a ConfigError (pathlib's own TypeError named neither)."""
    if isinstance(path, (str, os.PathLike)):
        return path
    raise ConfigError(f"{what} must be a path (str or Path) to {kind}, got {type(path).__name__} {path!r:.60}")


def check_messages(messages) -> list[dict]:
    """OpenAI-style messages -> a list of {"role", "content"} dicts; ConfigError naming the bad one."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"`messages` must be a non-empty list of {{\"role\", \"content\"}} objects, "
                          f"got {_show(messages)}")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") in ROLE_ALIASES:
            m = {**m, "role": ROLE_ALIASES[m["role"]]}
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ConfigError(f"message {i} must be an object with a role in {list(ROLES) + list(ROLE_ALIASES)}, "
                              f"got {_show(m)}")
        content = m.get("content")
        if content is None and m["role"] == "assistant":  # OpenAI's shape of a turn that only called tools
            content = ""
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ConfigError(f"message {i}: only text content parts are supported (a language model), "
                                  f"got {_show(content)}")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ConfigError(f"message {i} content must be a string, got {_show(content)}")
        out.append({**m, "content": content})
    return out


def _show(x) -> str:
    """A short JSON view of what the caller sent (Python objects too: repr where JSON has none)."""
    return json.dumps(x, default=repr)[:80]


def check_template(template) -> str:
    """A chat template that compiles (syntax only): ChatTemplateError naming the error and its line,
    before a server starts or a model loads, not at the first request."""
    from jinja2 import TemplateSyntaxError

    if not isinstance(template, str) or not template.strip():
        raise ChatTemplateError(f"a chat template must be a non-empty Jinja string, got {template!r:.80}")
    if "{" not in template and template.strip().endswith((".jinja", ".j2", ".txt", ".json")):
        # a file name is also a valid (constant) template: every chat would render that name
        raise ChatTemplateError(f"chat template {template!r:.80} looks like a file name, not Jinja text; pass the "
                                "file's contents (chat.read_template_file(path) reads one)")
    try:
        environment().from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from e
    return template


def render_chat(template: str, messages, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, **special_tokens: str) -> str:
    """The conversation as the template writes it (the assistant's turn opened when
    add_generation_prompt). special_tokens: the other names transformers passes (pad_token,
    unk_token, ...). ChatTemplateError where the template fails or refuses it."""
    from jinja2 import TemplateError

    env = environment()
    messages = check_messages(messages)  # outside the try: a bad conversation is the caller's error, not the template's
    try:
        pieces, n = [], 0
        for piece in env.from_string(template).generate(
                messages=messages, **special_tokens, bos_token=bos_token, eos_token=eos_token,
                add_generation_prompt=add_generation_prompt):
            n += len(piece)
            if n > MAX_RENDERED_CHARS:  # a loop that writes without end took all memory
                raise ChatTemplateError(f"the chat template wrote more than {MAX_RENDERED_CHARS} characters for this "
                                        "conversation; check its loops")
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:  # its own raise_exception, or a bound above
        raise
    except (TemplateError, TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as e:  # a template bug
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e


def chat_ids(tokenizer, messages, template: str | None = None, max_tokens: int | None = None,
             name: str | None = None) -> list[int]:
    """The token ids of a conversation, ready for the assistant's reply. `template` overrides the
    tokenizer's own; ConfigError when there is none. max_tokens: only the first that many ids
    (the rest of a long conversation is not tokenized: tokenizer.encode_prefix). `name`: how
    errors name the model (the server's clients are not told its path), else the tokenizer's path."""
    from .tokenizer import encode_prefix

    if not all(callable(getattr(tokenizer, a, None)) for a in ("encode", "id_to_token")):
        # the template writes bos / eos by name, and the rendered text is encoded: both need one
        raise ConfigError(f"chat_ids needs a loaded tokenizer (runner.tokenizer, or "
                          f"mamba_deploy.tokenizer.load_tokenizer(folder)), got {type(tokenizer).__name__} "
                          f"{tokenizer!r:.60}")
    own = template is None
    template = template if template is not None else getattr(tokenizer, "chat_template", None)
    where = name or getattr(tokenizer, "path", None) or "this model"
    sources = f"tokenizer_config.json \"chat_template\", {CHAT_TEMPLATE_FILE}, or a GGUF's {GGUF_CHAT_TEMPLATE_KEY}"
    if not template:
        choices = getattr(tokenizer, "chat_template_choices", None)
        if choices:
            raise ConfigError(f"{where} has chat templates named {choices} and none named 'default', so none is "
                              "taken (as transformers does); save the one you want to a file and give it with "
                              "--chat-template FILE")
        raise ConfigError(f"{where} has no chat template ({sources}); give one with "
                          "--chat-template FILE, or send plain prompts")
    named = getattr(tokenizer, "special_token_ids", None) or {}  # a duck-typed tokenizer may have none
    names = {k: _token_text(tokenizer, i) for k, i in named.items()}
    names.update(bos_token=_token_text(tokenizer, tokenizer.bos_token_id),
                 eos_token=_token_text(tokenizer, tokenizer.eos_token_id))
    try:
        text = render_chat(template, messages, **names)
    except ChatTemplateError as e:
        if not own or e.__cause__ is None:  # the caller's template, or a refusal of this conversation
            raise
        raise ChatTemplateError(f"{e} (the chat template of {where}: {sources}); fix it there, or give a "
                                "working one with --chat-template FILE") from e
    if not text.strip():  # else it surfaces later as "a prompt is empty", pointing at the prompt
        raise ChatTemplateError(f"the chat template rendered nothing for this conversation ({text!r}); check "
                                "that it writes `messages` (e.g. {% for m in messages %}...{% endfor %})")
    return encode_prefix(tokenizer, text, max_tokens, add_special_tokens=False)


def _token_text(tokenizer, token_id) -> str:
    if token_id is None:
        return ""
    return tokenizer.id_to_token(token_id) or ""
