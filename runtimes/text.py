"""Text in and out: the tokenizer exported with the base (``tokenizers`` package).

Optional: ``tokenizers`` (and ``jinja2`` for chat templates) are imported only when
text helpers are used, so an app that feeds token ids needs neither.
"""
from __future__ import annotations

import datetime
import os

import numpy as np

from .errors import ArtifactNotFoundError, ConfigError, CorruptArtifactError, InvalidInputError
from .manifest import _read_json

_FIX = "re-export the base with its tokenizer files"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptArtifactError(f"{path}: cannot read it ({e}); {_FIX}") from None


class TextTokenizer:
    """``tokenizer.json`` plus ``tokenizer_config.json`` (special tokens, chat template)."""

    def __init__(self, base_dir: str, padding_side: str = "left", pad_id: int = 0):
        path = os.path.join(base_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise ArtifactNotFoundError(
                f"{path}: the export has no tokenizer; pass token ids, or export from a base folder that has tokenizer.json"
            )
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("text helpers need the `tokenizers` package: pip install tokenizers") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise CorruptArtifactError(f"{path}: not a tokenizer the `tokenizers` package can read ({e}); {_FIX}") from None
        self._tok.no_padding()  # we pad ourselves
        self.padding_side = padding_side
        self.pad_id = pad_id
        self._tok.no_truncation()  # too-long prompts get a clear error, not a silent cut
        config_path = os.path.join(base_dir, "tokenizer_config.json")
        self.config = _read_json(config_path, "tokenizer config", _FIX) if os.path.isfile(config_path) else {}
        template_path = os.path.join(base_dir, "chat_template.jinja")
        self.template_source = config_path
        self.chat_template = self.config.get("chat_template")
        self._template = None  # compiled on first use
        if os.path.isfile(template_path):
            self.chat_template, self.template_source = _read_text(template_path), template_path

    def _special(self, key: str):
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, texts, add_special_tokens: bool = True, pad_id: int | None = None,
               padding_side: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` for a text or a list of texts: padded, (B, T) int64 each.

        Left padding for generation (new tokens follow every row's last real token);
        right padding otherwise, so encoders' absolute positions start at 0 in every row.
        ``pad_id`` defaults to the model's padding token.
        """
        pad_id = self.pad_id if pad_id is None else pad_id
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self._tok.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
        width = max(len(r) for r in rows) if rows else 0
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            if r:
                cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
                ids[i, cols] = r
                mask[i, cols] = 1
        return ids, mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _compiled_template(self):
        """The chat template compiled once, in transformers' environment (loop controls, raise_exception, strftime_now)."""
        if self._template is None:
            if not self.chat_template:
                raise ConfigError("this model has no chat template; pass plain text")
            try:
                import jinja2
            except ImportError:
                raise ConfigError("chat templates need the `jinja2` package: pip install jinja2") from None

            def raise_exception(message):
                raise ConfigError(f"chat template: {message}")

            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise CorruptArtifactError(f"{self.template_source}: the chat template does not parse ({e}); {_FIX}") from None
        return self._template

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        template = self._compiled_template()  # a missing template or jinja2 fails here with a ConfigError
        import jinja2  # present: _compiled_template checked

        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._special("bos_token") or "", eos_token=self._special("eos_token") or "",
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:  # what the messages hold
            raise InvalidInputError(f"the chat template of {self.template_source} cannot render these messages ({e}); "
                                    "give each message the role and the text content it expects") from None
