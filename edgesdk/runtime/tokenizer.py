"""Tokenizer (the `tokenizers` library on the artifact's tokenizer.json), the model's own
chat template (jinja2, rendered like transformers does), and incremental detokenization.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from ..errors import ArtifactError, InvalidArgumentError


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{folder} has no tokenizer.json; re-export the artifact")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ArtifactError(f"{path} cannot be read ({str(e).splitlines()[0][:200]}); re-export the artifact") from None
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tpl_path = folder / "chat_template.jinja"
        self.chat_template: str | None = tpl_path.read_text() if tpl_path.is_file() else self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def fingerprint(self) -> dict[str, Any]:
        """What must be equal for two models to share token ids (draft/target, eval baseline)."""
        return {"vocab": self._tok.get_vocab(with_added_tokens=True),
                "special": sorted(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)}

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        if not self.chat_template:
            raise InvalidArgumentError("this model has no chat template; pass prompt= instead of messages=")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise InvalidArgumentError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        try:
            extra = {"tools": tools} if tools else {}
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **extra, **special)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidArgumentError(f"the chat template rejected these messages: {e}") from None


class IncrementalDecoder:
    """Turns a growing list of token ids into text chunks.

    Decodes a small window that starts a few tokens back, so tokenizers whose decoding
    depends on the previous token (leading spaces, byte fallback) stay exact, and holds
    back output while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self._prefix = ""  # decode(ids[prefix_offset:read_offset]), kept until the offsets move

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(self._prefix) and not full.endswith("\ufffd"):
            new = full[len(self._prefix):]
            self._prefix = self.tok.decode(self.ids[self.read_offset:], self.skip)
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += new
            return new
        return ""

    def finish(self) -> str:
        """Whatever is left once generation stops (may include a lone replacement char)."""
        full = self.tok.decode(self.ids, self.skip)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        return rest
