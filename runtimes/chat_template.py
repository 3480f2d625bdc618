"""Chat templates rendered as transformers renders them: the template of ``tokenizer_config.json`` (or
``chat_template.jinja``) in a sandboxed, immutable jinja2 environment with transformers' loop controls,
``{% generation %}`` blocks, ``raise_exception``, ``strftime_now``, ``tojson``, ``dict`` and a ``namespace`` that
stores no ``_`` names; the messages handed over as plain data. ``jinja2`` (3.1.6 or later, as transformers asks:
older ones let a template out of its sandbox) is imported only when a template is used."""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Mapping

import numpy as np

from .errors import STOPS, ConfigError, CorruptArtifactError, InvalidInputError, MissingDependencyError, raise_if_stopped
from .sentence import TOKENIZER_FIX as _FIX
from .values import HALF_CHARACTER, half_character

# a template's own code (the export copies the model's as it is: copying it again, or re-exporting, gives it back)
TEMPLATE_FIX = ("correct it in the model's folder and export into a fresh --out (the export copies it as it is; a "
                "damaged copy of OUT: copy the export's base folder again), or pass plain text (chat=False)")


# what messages a template refuses or cannot render take: at the command line (one user message, which `run --chat`
# builds), the plain text (as_flags: "no --chat"; a hunt: the CLI's users had no fix they could follow)
MESSAGES_FIX = "give each message the role and the text content the template expects, or pass plain text (chat=False)"


def default_template(template, path: str):
    """The template transformers uses without tools: a single one, or the one named "default" of several
    (tokenizer_config.json may list them as [{"name": ..., "template": ...}])."""
    if isinstance(template, list):
        try:
            template = {t["name"]: t["template"] for t in template}
        except (TypeError, KeyError):
            raise CorruptArtifactError(f"{path}: chat_template lists entries without a name and a template; {_FIX}") from None
    if isinstance(template, dict):
        if "default" not in template:
            raise CorruptArtifactError(f"{path}: has chat templates named {', '.join(sorted(map(str, template)))} but "
                                       "none named default, which transformers would use; add one or pass plain text")
        template = template["default"]
    if template is not None and not isinstance(template, str):
        raise CorruptArtifactError(f"{path}: chat_template must be a template (a string), got {type(template).__name__}; {_FIX}")
    return template


def compile_template(text: str | None, source: str, fix: str = TEMPLATE_FIX):
    """``text`` compiled in an environment like transformers': sandboxed and immutable (a template is code from the
    model's files), loop controls, ``{% generation %}`` blocks, ``raise_exception``, ``strftime_now``, and a
    ``tojson`` that keeps key order and non-ASCII text. ``source``: the file it came from, and ``fix``, for messages."""
    if not text:
        raise ConfigError(f"{source}: has no chat_template (nor does chat_template.jinja beside it); "
                          "pass plain text (chat=False)")
    try:
        import jinja2
    except ImportError as e:
        raise_if_stopped(e)
        jinja2 = None
    if jinja2 is None or tuple(map(int, re.findall(r"\d+", jinja2.__version__)[:3])) < (3, 1, 6):
        raise MissingDependencyError(
            "chat templates need jinja2 3.1.6 or later (older ones let a template out of its sandbox), "
            f"{'which is not installed' if jinja2 is None else f'not {jinja2.__version__}'}: pip install -U 'jinja2>=3.1.6'")

    def raise_exception(message):  # the template refuses what the messages hold
        raise InvalidInputError(f"{source}: the chat template refuses these messages ({message}); {MESSAGES_FIX}")

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _generation_blocks(jinja2)])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["dict"], env.globals["namespace"] = _Dict(), _namespace(jinja2)
    try:
        tree = env.parse(text)
        if any(tree.find_all((jinja2.nodes.Include, jinja2.nodes.Import, jinja2.nodes.FromImport, jinja2.nodes.Extends))):
            raise CorruptArtifactError(f"{source}: the chat template takes in other templates ({{% include %}}, "
                                       f"{{% import %}} or {{% extends %}}), which a chat template has none of; {fix}")
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError as e:  # an unknown filter too, found as it compiles
        if isinstance(e.__cause__, STOPS):  # jinja's lexer makes any error of a token's value a syntax error
            raise e.__cause__ from None
        raise CorruptArtifactError(f"{source}: the chat template does not parse ({e}); {fix}") from None


def render(template, source: str, messages: list, add_generation_prompt: bool, special_tokens: dict,
           continue_final_message: bool | None = False) -> str:
    """``compile_template``'s template rendered for ``messages``; what the messages hold that it cannot render is an
    InvalidInputError, what the template itself may not do a CorruptArtifactError. ``continue_final_message``: the
    text ends where the last message's text does (an answer begun, which the model continues), as transformers';
    None: as transformers' text-generation pipeline, where the last message is the assistant's (no generation
    prompt then: a new answer was begun after the one given)."""
    from jinja2.exceptions import SecurityError  # present: compile_template imported jinja2

    if isinstance(messages, (str, dict)):  # one message, or a text: read as its characters or keys below
        raise InvalidInputError(f"chat messages are a list of {{'role': ..., 'content': ...}} dicts, got a "
                                f"{type(messages).__name__}; pass [message]")
    messages = list(messages)  # a generator: used up by the checks below, and the template got none
    if not messages:  # as transformers refuses it (a batch's [] was rendered as a bare generation prompt)
        raise InvalidInputError("a chat holds no message; give each chat at least one {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):  # templates skip what is no dict: a message left out, silently
        if not (isinstance(m, Mapping) or _an_object(m)):  # a dataclass or pydantic message: its fields, a dict
            raise InvalidInputError(f"chat message {i} is {type(m).__name__} {m!r:.40}, not a dict; give each message "
                                    "as {'role': ..., 'content': ...}, as transformers takes them")
    messages = [_plain(m) for m in messages]  # as transformers hands them over, once
    for i, m in enumerate(messages):
        if (half := _half_character(m)) is not None:  # named here: the rendered chat's own text said nothing
            raise InvalidInputError(f"chat message {i}'s text {half[:40]!r} {HALF_CHARACTER}")
    messages = [_as_transformers_gives(m) for m in messages]
    if continue_final_message is None:
        continue_final_message = bool(messages) and messages[-1].get("role") == "assistant"
        add_generation_prompt = add_generation_prompt and not continue_final_message
    if continue_final_message:  # its text marked (a list of parts: its last text part's), the chat cut at the mark below
        content = messages[-1].get("content") if messages else None
        parts = [dict(p) if isinstance(p, dict) else p for p in content] if isinstance(content, (list, tuple)) else None
        last = next((p for p in reversed(parts or []) if isinstance(p, dict) and isinstance(p.get("text"), str)), None)
        if not isinstance(content, str) and last is None:
            raise InvalidInputError("an answer to continue is the last message's text (a string, or a part with text)")
        if last is not None:
            last["text"] += CONTINUE
        messages[-1] = {**messages[-1], "content": content + CONTINUE if isinstance(content, str) else parts}
    try:
        text = template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except SecurityError as e:  # the template's own code, not the messages
        raise CorruptArtifactError(f"{source}: the chat template does what a template may not ({e}); "
                                   f"{TEMPLATE_FIX}") from None
    except (InvalidInputError, *STOPS):  # raise_exception's, and an app's timeout
        raise
    except Exception as e:  # what the messages hold (a KeyError, an IndexError, 1 // 0 of too few messages, ...)
        raise InvalidInputError(f"the chat template of {source} cannot render these messages ({type(e).__name__}: "
                                f"{e}); {MESSAGES_FIX}") from None
    if not continue_final_message:
        return text
    if CONTINUE.strip() not in text:  # as transformers refuses it
        raise InvalidInputError(f"the chat template of {source} drops the last (assistant) message's text, which would "
                                "be continued; end the chat with a user message")
    at = text.rindex(CONTINUE.strip())  # the text up to the answer begun (its trailing space, where the template trims
    return text[:at] if text[at:at + len(CONTINUE)] == CONTINUE else text[:at].rstrip()  # it, trimmed too)


CONTINUE = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' mark of where the answer begun ends


def _half_character(value) -> str | None:
    """The first string in a message (its content, a part's text, a tool call's arguments) holding a lone
    surrogate, else None."""
    if isinstance(value, str):
        return value if half_character(value) else None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((s for s in map(_half_character, items) if s is not None), None)


def _as_transformers_gives(message: dict) -> dict:
    """A message as transformers hands it to a template: keys whose value is None dropped (templates test for a
    key: 'tool_calls' in m), reasoning under every name templates read it by (reasoning_content, thinking)."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _an_object(value) -> bool:
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or callable(getattr(value, "model_dump", None))


def _plain(value):
    """What a template sees of a message's value, as transformers hands it over: JSON's types rebuilt (a str-Enum
    is its text, a numpy number its value, a dataclass or pydantic model its fields), anything else a placeholder
    naming its type ("<ndarray>"): an object's methods are out of the sandbox's view."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, int, float):  # subclasses: an Enum's or numpy's methods stay behind
        if isinstance(value, kind):
            return getattr(kind, f"__{kind.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map(_plain, value)) if type(value) in (list, tuple) else list(map(_plain, value))
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


class _Dict:
    """transformers' ``dict`` of templates: a call and ``fromkeys``, nothing of the type to reach through."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _namespace(jinja2):
    """transformers' ``namespace``: a name beginning with ``_`` is refused (a SecurityError), stored or given."""
    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace may not store {name!r}, a name beginning with _")

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja2's own signature: namespace(self=...) works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return Namespace


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' ``tojson``: JSON as written (jinja2's own sorts keys and escapes HTML and non-ASCII)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_blocks(jinja2):
    """``{% generation %}...{% endgeneration %}`` (transformers marks the assistant's text with it): its body, in a
    scope of its own."""
    import jinja2.ext  # noqa: F401  (the package does not import its extensions module)

    class GenerationBlocks(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):  # a call block, as transformers': a {% set %} inside stays inside
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationBlocks
