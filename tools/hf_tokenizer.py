"""The tokenizer files of a Hugging Face export (``tools.convert_hf export``): what ``AutoTokenizer``
loads, with the same ids and special tokens the run trained with.

* ``data.tokenizer = "byte"``: an equivalent ``tokenizer.json`` is built (ids 0..255 = the UTF-8
  bytes through GPT-2's byte-to-character table and a merge-free BPE, ``<pad>``/``<bos>``/``<eos>``
  = 256/257/258) whose post-processor prepends ``<bos>``, as the training pipeline does.
* a ``tokenizer.json`` (or a directory holding one): copied, with any BOS/EOS/PAD that our
  tokenizer appended after the file's vocabulary (``train/tokenizer.py``) added as special tokens
  at the same ids.

Both get ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, the special tokens,
``model_max_length``) and ``special_tokens_map.json``.
"""

from __future__ import annotations

import json
import os

import ml_collections

_BYTE_SPECIALS = {256: "<pad>", 257: "<bos>", 258: "<eos>"}  # train.tokenizer.ByteTokenizer's ids


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode``): entry b is byte b's char."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def byte_tokenizer():
    """``train.tokenizer.ByteTokenizer`` as a ``tokenizers.Tokenizer`` (same ids, BOS prepended)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {c: b for b, c in enumerate(_byte_level_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(_BYTE_SPECIALS[i], special=True) for i in sorted(_BYTE_SPECIALS)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
    return tok


def write_tokenizer(spec: str, out_dir: str, *, model_max_length: int) -> dict[str, int]:
    """Writes the tokenizer files of ``data.tokenizer = spec`` into ``out_dir``; returns
    ``{"bos_token_id", "eos_token_id", "pad_token_id"}`` (the run's ids)."""
    from tokenizers import AddedToken, Tokenizer

    from train.tokenizer import load_tokenizer

    ours = load_tokenizer(ml_collections.ConfigDict({"tokenizer": spec}))
    ids = {"bos": ours.bos_id, "eos": ours.eos_id, "pad": ours.pad_id}
    if spec == "byte":
        tok = byte_tokenizer()
    else:
        path = os.path.expanduser(spec)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        tok = Tokenizer.from_file(path)
        for role, i in sorted(ids.items(), key=lambda kv: kv[1]):  # appended ids, in id order
            if tok.id_to_token(i) is None:
                name = f"<|{role}|>"
                tok.add_special_tokens([AddedToken(name, special=True)])
                if tok.token_to_id(name) != i:
                    raise ValueError(f"tokenizer {spec!r}: cannot give {role} the run's id {i} in the export")
    names = {role: tok.id_to_token(i) for role, i in ids.items()}
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {f"{role}_token": name for role, name in names.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length, **special}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w") as fh:
            json.dump(obj, fh, indent=2)
    return {f"{role}_token_id": i for role, i in ids.items()}
