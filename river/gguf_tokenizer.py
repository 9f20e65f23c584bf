"""The tokenizer of a GGUF file, rebuilt as a Hugging Face `tokenizers` byte-level BPE.

llama.cpp keeps the vocabulary, merges, token types and the name of the pre-tokenizer family in
the GGUF metadata; this module turns them back into tokenizer.json, tokenizer_config.json and the
eos ids of generation_config.json. river.convert writes what it builds.
"""

from __future__ import annotations

import pathlib

from river.errors import TokenizerError, UnsupportedModelError

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` families. These are the published
# splitting rules of the respective tokenizers (GPT-2, cl100k-style Llama 3, Qwen 2).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp isolates every digit first, then applies the GPT-2 regex to what is left (the
# StarCoder tokenizer family, which SmolLM uses).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# Plain GPT-2 regex. Older files without `pre` (or "default") get it too, as in transformers;
# llama.cpp's own fallback for those differs in small details.
_GPT2 = {None, "default", "gpt2", "mpt", "olmo", "jais"}
_REGEX_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT),
}

# Token texts llama.cpp treats as end-of-generation even when the file names another eos id.
_EOG_TEXTS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>"}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the rest are shifted to code points from 256 up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str | None, path: pathlib.Path):
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _REGEX_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise UnsupportedModelError(
        f"{path}: tokenizer.ggml.pre {pre!r} is a pre-tokenizer river does not know; "
        f"known: {sorted(p for p in _DIGITS_THEN_GPT2 | _GPT2 | set(_REGEX_SPLITS) if p)}"
    )


def build_tokenizer(meta: dict, path: pathlib.Path):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF's vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedModelError(
            f"{path}: tokenizer.ggml.model is {model!r}; river converts byte-level BPE "
            "('gpt2') tokenizers only"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise TokenizerError(f"{path}: the GGUF has no tokenizer vocabulary or merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{path}: {len(tokens)} tokens but {len(types)} token types")

    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    vocab, special = {}, []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if not set(tok) <= letters:
            # A token spelled in raw text rather than the byte alphabet: respell its bytes so
            # the BPE model can produce it. Such tokens cannot also be matched as added tokens.
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        elif kind == _TOKEN_CONTROL:
            special.append(AddedToken(tok, special=True, normalized=False))
        elif kind == _TOKEN_USER_DEFINED:
            special.append(AddedToken(tok, special=False, normalized=False))
        if tok in vocab:
            raise TokenizerError(f"{path}: token {tok!r} appears twice (ids {vocab[tok]}, {i})")
        vocab[tok] = i

    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}: malformed merge {m!r}")
        pairs.append((parts[0], parts[1]))

    pre = meta.get("tokenizer.ggml.pre")
    # Llama 3 style vocabularies look whole pieces up before merging (llama.cpp and the original
    # tokenizer.json both do); merging alone can miss tokens the vocabulary holds.
    ignore_merges = _REGEX_SPLITS.get(pre) is _LLAMA3_SPLIT
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=ignore_merges)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(pre, path)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) must be matched whole in text and skipped on request.
    tok.add_tokens([t for t in special if not t.special])
    tok.add_special_tokens([t for t in special if t.special])

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if _add_bos(meta) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, int(bos_id))],
        )
    return tok


def _add_bos(meta: dict) -> bool:
    # llama.cpp's default for BPE vocabularies is no BOS unless the file asks for it.
    return bool(meta.get("tokenizer.ggml.add_bos_token", False))


def _token_text(meta: dict, key: str) -> str | None:
    idx = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def tokenizer_config(meta: dict, context_length: int) -> dict:
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _add_bos(meta),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": _token_text(meta, "bos_token_id"),
        "eos_token": _token_text(meta, "eos_token_id"),
        "pad_token": _token_text(meta, "padding_token_id"),
        "unk_token": _token_text(meta, "unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def generation_config(meta: dict, config: dict) -> dict:
    """eos ids for generation: the file's eos plus the end-of-turn tokens llama.cpp stops on."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    eos = set()
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            eos.add(int(meta[f"tokenizer.ggml.{key}"]))
    eos |= {
        i
        for i, (t, k) in enumerate(zip(tokens, types, strict=True))
        if k == _TOKEN_CONTROL and t in _EOG_TEXTS
    }
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": sorted(eos),
        "pad_token_id": config["pad_token_id"],
    }
