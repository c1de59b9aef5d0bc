"""Tests for train/tokenizer.py: a Hugging Face model directory's special tokens come from its files."""

import json

import numpy as np
import pytest

from tests.train.test_data import _cfg, _texts, _write_text_corpus
from train import data

# "<s>", "</s>" and "<pad>" are the common spellings a bare tokenizer.json is searched for; the
# directory's files name other tokens, so a guess would pick the wrong ids.
SPECIALS = ["<s>", "</s>", "<pad>", "<|bos|>", "<|eos|>", "<|pad|>", "<|other|>"]


def _tokenizer_dir(path, tokenizer_config=None, special_tokens_map=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_texts(40), trainer)
    tok.save(str(path / "tokenizer.json"))
    for name, content in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_tokens_map)):
        if content is not None:
            (path / name).write_text(json.dumps(content))
    return str(path), {t: tok.token_to_id(t) for t in SPECIALS}


def test_special_tokens_from_a_model_directory(tmp_path):
    added = {"__type": "AddedToken", "content": "<|eos|>", "lstrip": False, "rstrip": False, "special": True}
    path, ids = _tokenizer_dir(
        tmp_path / "model",
        tokenizer_config={"bos_token": "<|bos|>", "eos_token": added, "pad_token": "<|pad|>"},
        special_tokens_map={"bos_token": "<|bos|>"},
    )
    tok = data.load_tokenizer(_cfg(tokenizer=path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ids["<|bos|>"], ids["<|eos|>"], ids["<|pad|>"])
    assert tok.vocab_size == len(json.loads(open(f"{path}/tokenizer.json").read())["model"]["vocab"])
    # the batches use them: EOS ends every document, PAD fills the rest
    glob_, _ = _write_text_corpus(tmp_path, n=8)
    batch = next(data.make_train_iterator(_cfg(source=glob_, seq_len=16, tokenizer=path), global_batch_size=4))
    assert ids["<|eos|>"] in batch["targets"] and ids["</s>"] not in batch["targets"]
    np.testing.assert_array_equal(batch["targets"][batch["loss_mask"] == 0], ids["<|pad|>"])
    # a bare tokenizer.json (or a directory without those files) still guesses the common spellings
    bare = data.load_tokenizer(_cfg(tokenizer=f"{path}/tokenizer.json"))
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (ids["<s>"], ids["</s>"], ids["<pad>"])
    assert bare.fingerprint != tok.fingerprint


def test_special_tokens_map_overrides_tokenizer_config_as_in_transformers(tmp_path):
    path, ids = _tokenizer_dir(
        tmp_path / "model",
        tokenizer_config={"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": None},
        special_tokens_map={"eos_token": {"content": "<|other|>"}},
    )
    tok = data.load_tokenizer(_cfg(tokenizer=path))
    assert (tok.bos_id, tok.eos_id) == (ids["<|bos|>"], ids["<|other|>"])
    assert tok.pad_id == tok.vocab_size - 1 and tok.pad_id not in ids.values()  # unset: a fresh id
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, None)


def test_tokenizer_directory_errors(tmp_path):
    path, _ = _tokenizer_dir(tmp_path / "model", tokenizer_config={"bos_token": "<|nope|>"})
    with pytest.raises(ValueError, match=r"tokenizer_config\.json sets bos_token='<\|nope\|>', which tokenizer\.json"):
        data.load_tokenizer(_cfg(tokenizer=path))
    (tmp_path / "model" / "tokenizer_config.json").write_text('{"eos_token": 5}')
    with pytest.raises(ValueError, match="sets eos_token to 5, not a token string"):
        data.load_tokenizer(_cfg(tokenizer=path))
    (tmp_path / "model" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        data.load_tokenizer(_cfg(tokenizer=path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory .*empty' has no tokenizer.json"):
        data.load_tokenizer(_cfg(tokenizer=str(tmp_path / "empty")))
