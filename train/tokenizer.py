"""Tokenizers for the data pipeline: a byte-level one and a Hugging Face `tokenizer.json` wrapper.

Both expose the same interface (`Tokenizer`):
    encode(text) -> int32 ids (no BOS/EOS; the pipeline adds those per document),
    decode(ids) -> str (special ids are dropped),
    vocab_size, pad_id, bos_id, eos_id,
    token_bytes(ids) -> int32 array of the same shape: how many UTF-8 bytes each token stands for
        (0 for specials). Summed over targets this gives the byte count for bits-per-byte, so
        bits/byte = sum(nll_nats) / (ln 2 * sum(target_bytes)) is comparable across tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Protocol

import numpy as np
from etils import epath


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    fingerprint: str  # identifies the vocabulary and special ids (checked by pre-tokenized sources)

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def token_bytes(self, ids) -> np.ndarray: ...


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes; PAD=256, BOS=257, EOS=258; vocab_size=259."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    fingerprint = "byte"

    def __init__(self):
        self._bytes_table = np.zeros(self.vocab_size, np.int32)
        self._bytes_table[:256] = 1

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self, ids) -> np.ndarray:
        return self._bytes_table[np.asarray(ids)]


# Common special-token spellings, tried in order when the tokenizer.json does not say which is which.
_BOS_NAMES = ("<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<s>", "<bos>", "[CLS]", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>", "<eos>", "[SEP]", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<｜▁pad▁｜>", "<|finetune_right_pad_id|>")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _gpt2_byte_chars() -> set[str]:
    """The 256 printable characters GPT-2's ByteLevel pre-tokenizer uses for raw bytes (one char = one byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            cs.append(256 + n)
            n += 1
    return {chr(c) for c in cs}


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_types(d) for d in decoder.get("decoders", [])))
    return {decoder.get("type")}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json behind the `Tokenizer` interface.

    Given a model directory, BOS/EOS/PAD are the `bos_token` / `eos_token` / `pad_token` of its
    tokenizer_config.json, overridden by its special_tokens_map.json (transformers' order); a role
    they leave unset (or null) gets a fresh id. Given a bare tokenizer.json (or a directory with
    neither file), they are looked up among common spellings (`_BOS_NAMES` ...). Fresh ids are appended after the vocabulary, so
    `vocab_size` may exceed the file's own size. `encode` never adds the file's post-processor
    specials (the pipeline adds BOS/EOS itself) and encodes a special token's spelling found in the
    text as plain text. `fingerprint` hashes the vocabulary file and the special ids.
    """

    def __init__(self, path: str):
        import tokenizers  # local: only needed for this tokenizer

        p = epath.Path(path)
        directory = None
        if p.is_dir():
            if not (p / "tokenizer.json").is_file():
                raise ValueError(f"data.tokenizer: directory {path!r} has no tokenizer.json")
            directory, p = p, p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(f"data.tokenizer: {path!r} is neither 'byte' nor an existing tokenizer.json file")
        try:
            text = p.read_text()
            self._tok = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception for a malformed file
            raise ValueError(
                f"data.tokenizer: cannot read {str(p)!r} as a Hugging Face tokenizer.json "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            ) from None
        self.directory = None if directory is None else str(directory)
        # Text that spells a special token ("<s>" in a source file) is encoded as plain text.
        self._tok.encode_special_tokens = True
        base = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        base = max(base, max(vocab.values(), default=-1) + 1)
        self._base = base
        next_id = base
        named = _named_special_tokens(directory) if directory is not None else None

        def find(role, names):
            nonlocal next_id
            if named is not None:  # a model directory: its files say, nothing is guessed
                token, where = named.get(role, (None, None))
                if token is not None and token not in vocab:
                    raise ValueError(
                        f"data.tokenizer: {where} sets {role}={token!r}, which tokenizer.json does not have"
                    )
                names = () if token is None else (token,)
            for name in names:
                if name in vocab:
                    return vocab[name]
            next_id += 1
            return next_id - 1

        self.bos_id = find("bos_token", _BOS_NAMES)
        self.eos_id = find("eos_token", _EOS_NAMES)
        self.pad_id = find("pad_token", _PAD_NAMES)
        self.vocab_size = next_id
        specials = json.dumps([self.bos_id, self.eos_id, self.pad_id, self.vocab_size])
        self.fingerprint = hashlib.sha256((text + specials).encode()).hexdigest()[:16]
        self._bytes_table = self._build_bytes_table(json.loads(self._tok.to_str()).get("decoder"))

    def _build_bytes_table(self, decoder: dict | None) -> np.ndarray:
        """UTF-8 bytes per id. Exact for ByteLevel (GPT-2/Llama-3/DeepSeek-V3) and byte-fallback vocabularies;
        elsewhere the length of the token decoded alone (word-level tokenizers lose the spaces between words)."""
        table = np.zeros(self.vocab_size, np.int32)
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        special |= {self.bos_id, self.eos_id, self.pad_id}
        kinds = _decoder_types(decoder)
        byte_chars = _gpt2_byte_chars() if "ByteLevel" in kinds else None
        ids = [i for i in range(self._base) if i not in special and self._tok.id_to_token(i) is not None]
        decoded = self._tok.decode_batch([[i] for i in ids], skip_special_tokens=True)
        for i, text in zip(ids, decoded):
            token = self._tok.id_to_token(i)
            if byte_chars is not None:
                table[i] = sum(1 if c in byte_chars else len(c.encode("utf-8")) for c in token)
            elif _BYTE_FALLBACK.match(token):
                table[i] = 1
            elif "Metaspace" in kinds or "Replace" in kinds:
                table[i] = len(token.replace("▁", " ").encode("utf-8"))
            else:
                table[i] = len(text.encode("utf-8"))
        return table

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return self._tok.decode([int(i) for i in ids if i < self._base], skip_special_tokens=True)

    def token_bytes(self, ids) -> np.ndarray:
        return self._bytes_table[np.asarray(ids)]


def _named_special_tokens(directory: epath.Path) -> dict[str, tuple] | None:
    """{role: (token or None, file that set it)} from tokenizer_config.json, then special_tokens_map.json
    on top; None when the directory has neither. A value is a string, or an AddedToken dict with its
    "content"."""
    named = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text())
        except ValueError as e:
            raise ValueError(f"data.tokenizer: {f} is not valid JSON ({e})") from None
        named = named or {}
        for role in ("bos_token", "eos_token", "pad_token"):
            if role in cfg:
                v = cfg[role]
                token = v.get("content") if isinstance(v, dict) else v
                if token is not None and not isinstance(token, str):
                    raise ValueError(f"data.tokenizer: {f} sets {role} to {v!r}, not a token string")
                named[role] = (token, name)
    return named


def load_tokenizer(data_cfg) -> Tokenizer:
    """`data_cfg.tokenizer`: "byte", a Hugging Face tokenizer.json, or a model directory holding one
    (with tokenizer_config.json / special_tokens_map.json naming BOS/EOS/PAD)."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    path = data_cfg.tokenizer
    return HFTokenizer(path if "://" in path else os.path.expanduser(path))
