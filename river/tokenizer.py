"""Tokenizer of a Hugging Face model directory: encode, decode, stream-decode, chat templates.

Wraps a `tokenizers.Tokenizer` read from tokenizer.json and adds what river needs around it: the
special-token settings from tokenizer_config.json, the end-of-sequence ids from every file that
names them, and a sandboxed Jinja chat template renderer that behaves like transformers'.
"""

from __future__ import annotations

import json
import operator
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from river.errors import InvalidRequestError, TokenizerError

_REPLACEMENT = "\ufffd"


def _read_json(path: pathlib.Path, required: bool = False) -> dict:
    if not path.exists():
        if required:
            raise TokenizerError(f"tokenizer file missing: {path}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return data


def _token_str(value) -> str | None:
    """Special tokens appear as plain strings or as serialized AddedToken dicts."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _pick_template(value, where: pathlib.Path) -> str | None:
    # Some models keep several named templates; "default" is the one for plain chat.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        return named.get("default")
    raise TokenizerError(f"{where}: chat_template must be a string or a list of named templates")


class _TemplateError(Exception):
    """Raised by a chat template's own `raise_exception(...)` call."""


def _compile_template(source: str, where: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        # transformers' `{% generation %}...{% endgeneration %}` marks assistant text for
        # training masks; for inference it renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise _TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    # trim_blocks/lstrip_blocks match transformers, so templates render byte-identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{where}: chat template does not compile: {e}") from e


class Tokenizer:
    """A model's tokenizer. Build with `Tokenizer.from_dir(model_dir)`."""

    def __init__(
        self,
        backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        fallback_bos_token_id: int | None = None,
        source: str = "<tokenizer>",
    ):
        self._backend = backend
        self._source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        # None: the file did not say, so tokenizer.json's post-processor decides what to add.
        self._add_bos = add_bos_token
        self.chat_template = chat_template
        self._template = _compile_template(chat_template, source) if chat_template else None

        bos_id = self.token_to_id(bos_token) if bos_token else None
        self.bos_token_id: int | None = bos_id if bos_id is not None else fallback_bos_token_id
        if self._add_bos and self.bos_token_id is None:
            raise TokenizerError(f"{source}: add_bos_token is set but there is no BOS token")
        eos = set(extra_eos_token_ids)
        eos_id = self.token_to_id(eos_token) if eos_token else None
        if eos_id is not None:
            eos.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.pad_token_id: int | None = self.token_to_id(pad_token) if pad_token else None

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        """Load from an HF model directory (tokenizer.json + optional config files)."""
        from tokenizers import Tokenizer as Backend

        model_dir = pathlib.Path(path).expanduser()
        if not model_dir.is_dir():
            raise TokenizerError(f"model directory does not exist: {model_dir}")
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {model_dir}")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or schema
            raise TokenizerError(f"cannot read {tok_file}: {e}") from e

        tcfg = _read_json(model_dir / "tokenizer_config.json")
        config = _read_json(model_dir / "config.json")
        gen = _read_json(model_dir / "generation_config.json")
        template = _pick_template(tcfg.get("chat_template"), model_dir / "tokenizer_config.json")
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():  # newer transformers saves the template beside the config
            try:
                template = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read {jinja_file}: {e}") from e
        add_bos = tcfg.get("add_bos_token")
        bos_ids = _id_list(config.get("bos_token_id"))
        return cls(
            backend,
            bos_token=_token_str(tcfg.get("bos_token")),
            eos_token=_token_str(tcfg.get("eos_token")),
            pad_token=_token_str(tcfg.get("pad_token")),
            unk_token=_token_str(tcfg.get("unk_token")),
            add_bos_token=bool(add_bos) if add_bos is not None else None,
            chat_template=template,
            extra_eos_token_ids=_id_list(config.get("eos_token_id"))
            + _id_list(gen.get("eos_token_id")),
            fallback_bos_token_id=bos_ids[0] if bos_ids else None,
            source=str(model_dir),
        )

    # ------------------------------------------------------------------ basics

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS."""
        if self._add_bos is not None:
            return self._add_bos
        ids = self._backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(
            i for i, t in self._backend.get_added_tokens_decoder().items() if t.special
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (<|im_start|>) are always
        recognized; `add_special_tokens` only controls adding BOS."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to encode must be a str, got {type(text).__name__}")
        if self._add_bos is None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        try:
            ids = [operator.index(i) for i in ids]  # accepts numpy/torch integer scalars too
        except TypeError as e:
            raise InvalidRequestError(f"token ids must be integers: {e}") from e
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {n}): {bad[:5]}")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render a conversation to prompt text with the model's template (not tokenized).

        Extra keyword arguments (tools=..., etc.) are passed to the template as variables.
        """
        if self._template is None:
            raise InvalidRequestError(
                f"the model at {self._source} has no chat template; send a plain prompt instead"
            )
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise InvalidRequestError(f"message {i} must be a mapping with a string 'role'")
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
            **kwargs,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except _TemplateError as e:
            raise InvalidRequestError(f"chat template rejected the messages: {e}") from e
        except Exception as e:  # a template bug or a message shape it cannot handle
            raise InvalidRequestError(f"chat template failed: {type(e).__name__}: {e}") from e


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, one `feed` at a time.

    Byte-level tokens can end in the middle of a UTF-8 character; that text is held back until a
    later token completes it, so a piece never contains half a character. Joining every piece
    from `feed` plus `flush()` gives exactly `tokenizer.decode(all_ids)`.

    Each step decodes only a short window: the tokens since the last emitted piece plus the
    tokens of that piece. The extra left context keeps decoders that treat the start of text
    specially (SentencePiece drops a leading space) from changing the middle of the stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: first token of the last emitted piece
        self._read = 0  # tokens before this are fully emitted

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def feed(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (often "", never a partial char)."""
        self._ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """Everything still held back (call once the stream ends)."""
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        decode = self._tok.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        text = decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        # A trailing U+FFFD is an incomplete character: wait for the bytes that finish it. On
        # flush it is final, because decode(all ids) shows the same replacement character.
        if not final and (len(text) <= len(before) or text.endswith(_REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]
