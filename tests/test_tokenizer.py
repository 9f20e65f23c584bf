"""river's tokenizer against transformers' tokenizer read straight from the same GGUF."""

from __future__ import annotations

import json
import shutil

import pytest
import regex

from river.errors import InvalidRequestError, TokenizerError
from river.gguf_tokenizer import byte_alphabet
from river.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\tpass  # comment\n\n\n",
    "Accents: café, naïve, résumé, Ångström, Øre, façade",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 🦀",
    "RTL: שלום עולם, مرحبا بالعالم",
    "Combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0300 \u0915\u093f",
    "runs of spaces:    four,  two, then\n\n\nthree newlines, tabs\t\tdone",
    "windows\r\nline\r\nendings\r\n\r\n",
    "trailing spaces   ",
    "   leading spaces",
    "numbers 1234567 and 3.14159 and -42, 1,000,000 and x2y3",
    "contractions: don't, won't, I'm, they're, we've, she'd, you'll, IT'S",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after end<|endoftext|>",
    "almost special: <|im_start and <im_end|> and < |im_end| >",
    "mixed 中文english混合123",
    "zero\u200bwidth\u200djoiner and nbsp\u00a0here",
    "math: ∑ x² ≤ ∞, arrows → ←, U+F0000: \U000f0000",
    "",
    " ",
    "\n",
    "a",
]
# llama.cpp's "smollm" pre-tokenizer isolates digits before the GPT-2 split, so a whitespace
# run before a digit stays one piece. transformers' GGUF loader uses the plain GPT-2 split for
# "smollm", which breaks that run differently; these texts show the difference.
DIGIT_AFTER_WHITESPACE = ["list:\n\n1. one\n  2. two\n\t3 three", "x  1", "\n\n1", "a \t 7"]
ALL_TEXTS = TEXTS + DIGIT_AFTER_WHITESPACE

# GPT-2's split, as llama.cpp applies it to each non-digit piece.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _llama_cpp_smollm_pieces(text: str) -> list[str]:
    pieces = []
    for chunk in regex.split(r"(\p{N})", text):
        pieces += regex.findall(_GPT2_SPLIT, chunk)
    return pieces


def _hf_agrees(text: str) -> bool:
    return not regex.search(r"\s{2,}\p{N}", text)


@pytest.fixture(scope="module")
def hf_tok(default_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name
    )


@pytest.fixture(scope="module")
def reference(hf_tok):
    """transformers' GGUF tokenizer with the pre-tokenizer llama.cpp uses for "smollm"."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    ref = Backend.from_str(hf_tok.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return ref


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def test_special_ids(tok):
    assert tok.bos_token_id == tok.token_to_id("<|im_start|>") == 1
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    assert tok.vocab_size == 49152
    assert tok.add_bos_token is False
    assert tok.token_to_id("<|im_start|>") in tok.special_token_ids


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_pre_tokenizer_matches_llama_cpp(tok, text):
    back = {c: b for b, c in byte_alphabet().items()}
    pieces = tok._backend.pre_tokenizer.pre_tokenize_str(text)
    ours = [bytes(back[c] for c in p).decode("utf-8") for p, _ in pieces]
    assert ours == _llama_cpp_smollm_pieces(text)


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_encode_decode_parity(tok, hf_tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference.encode(text).ids
    if _hf_agrees(text):
        assert ids == hf_tok(text)["input_ids"]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids  # add_bos_token is false


def test_digit_split_differs_from_transformers_gguf_loader(tok, hf_tok):
    ours = [tok.id_to_token(i) for i in tok.encode("\n\n1")]
    assert ours == ["ĊĊ", "1"]  # llama.cpp's (and SmolLM2's own) split
    assert hf_tok.convert_ids_to_tokens(hf_tok("\n\n1")["input_ids"]) == ["Ċ", "Ċ", "1"]


def test_decode_parity_on_arbitrary_ids(tok, hf_tok):
    import random

    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
                ids, skip_special_tokens=skip
            )


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(InvalidRequestError):
        tok.decode([tok.vocab_size])
    with pytest.raises(InvalidRequestError):
        tok.decode([-1])
    with pytest.raises(InvalidRequestError):
        tok.decode(["a"])


def _stream(tok, ids, skip=False):
    dec = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [dec.feed(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_round_trips(tok, skip):
    ids = tok.encode("".join(ALL_TEXTS))
    pieces, rest = _stream(tok, ids, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(pieces) + rest == full
    assert "\ufffd" not in "".join(pieces)
    assert rest == ""  # the text is valid UTF-8, so nothing is held back at the end
    # Multi-byte characters span several tokens: some feeds must have waited.
    assert any(p == "" for p in pieces)


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_stream_pieces_are_whole_characters(tok, text):
    ids = tok.encode(text)
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == text
    for p in pieces:
        assert p.encode("utf-8").decode("utf-8") == p
        assert "\ufffd" not in p


def test_stream_flushes_invalid_bytes(tok):
    # One lone UTF-8 lead byte, then one lone continuation byte: neither ever completes.
    alphabet = byte_alphabet()
    lead, cont = tok.token_to_id(alphabet[0xE6]), tok.token_to_id(alphabet[0x80])
    ids = tok.encode("ok ") + [lead]
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) == "ok " and rest == "\ufffd"
    ids = [lead, *tok.encode("x"), cont]
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == "\ufffdx\ufffd"


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you?  \n"},
    ],
    [{"role": "user", "content": "No system message here."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def _copy_tokenizer(src, dst, **config_changes):
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(config_changes)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_chat_template_errors(default_model_dir, tmp_path):
    plain = Tokenizer.from_dir(
        _copy_tokenizer(default_model_dir, tmp_path / "a", chat_template=None)
    )
    with pytest.raises(InvalidRequestError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])

    strict = Tokenizer.from_dir(
        _copy_tokenizer(
            default_model_dir,
            tmp_path / "b",
            chat_template="{% if messages[0]['role'] != 'user' %}"
            "{{ raise_exception('first message must be from the user') }}{% endif %}"
            "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}",
        )
    )
    with pytest.raises(InvalidRequestError, match="must be from the user"):
        strict.apply_chat_template([{"role": "assistant", "content": "hi"}])
    assert strict.apply_chat_template([{"role": "user", "content": "<é>"}]) == '<|im_start|>"<é>"'
    with pytest.raises(InvalidRequestError):
        strict.apply_chat_template("not a list")

    tagged = Tokenizer.from_dir(
        _copy_tokenizer(
            default_model_dir,
            tmp_path / "d",
            chat_template="{% for m in messages %}{% if m['role'] == 'assistant' %}"
            "{% generation %}[{{ m['content'] }}]{% endgeneration %}"
            "{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
        )
    )
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tagged.apply_chat_template(convo) == "q[a]"

    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer.from_dir(
            _copy_tokenizer(default_model_dir, tmp_path / "c", chat_template="{% if")
        )


def test_add_bos_token(default_model_dir, tmp_path):
    with_bos = Tokenizer.from_dir(
        _copy_tokenizer(default_model_dir, tmp_path / "a", add_bos_token=True)
    )
    assert with_bos.add_bos_token
    assert with_bos.encode("hi") == [with_bos.bos_token_id, *with_bos.encode("hi", False)]


def test_missing_or_broken_tokenizer(default_model_dir, tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42')
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    broken = _copy_tokenizer(default_model_dir, tmp_path / "cfg")
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(broken)
