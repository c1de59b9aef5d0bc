"""tools.convert_hf export writes a directory transformers uses as is: AutoTokenizer and
AutoModelForCausalLM load it and ``generate`` gives our greedy tokens; special-token ids, world-readable
files, ``--step``, and the byte tokenizer's equivalent tokenizer.json."""

import dataclasses
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.config import ModelConfig
from tests.train.test_trainer import TINY_MODEL
from tools import convert_hf
from train.checkpoint import Checkpointer
from train.tokenizer import ByteTokenizer, HFTokenizer

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.numpy")
pytest.importorskip("torch")

WORDS = "def return import class for while if else alpha beta gamma delta expert router latent".split()


def _random(x, rng):
    """A random weight of ``x``'s shape: 1 +- 0.1 for vectors (norms, biases), N(0, 0.5^2 / fan-in) else."""
    if x.ndim == 1:
        return (1 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
    return (0.5 / x.shape[-2] ** 0.5 * rng.standard_normal(x.shape)).astype(x.dtype)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Weights-only checkpoints of a tiny random model at steps 1 and 2 (different weights); the states."""
    out = tmp_path_factory.mktemp("weights")
    cfg = ModelConfig.from_dict({**dataclasses.asdict(ModelConfig()), **TINY_MODEL})
    _, abstract = convert_hf._abstract_weights(cfg)  # no eager init: random numpy weights
    ck = Checkpointer(out, save_every=1, async_save=False)
    states = {}
    for step in (1, 2):
        rng = np.random.default_rng(step)
        states[step] = jax.tree.map(lambda x: _random(x, rng), abstract)
        ck.save(step, states[step], data_state={}, meta={"model": dataclasses.asdict(cfg)}, force=True)
    ck.close()
    return out, states


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small BPE tokenizer.json trained here with the tokenizers library (<pad>, <s>, </s> = 0, 1, 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(WORDS, 30)) for _ in range(50)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<s>", "</s>"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_transformers_loads_the_export_and_generates(checkpoint, tokenizer_file, tmp_path):
    ckpt, states = checkpoint
    out = tmp_path / "hf"
    old = os.umask(0o077)  # a private umask: the export is still world-readable
    try:
        convert_hf.main(
            ["export", "--ckpt", str(ckpt), "--out", str(out), "--step", "1", "--tokenizer", tokenizer_file]
        )
    finally:
        os.umask(old)
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= names
    assert all(stat.S_IMODE((out / n).stat().st_mode) == 0o644 for n in names)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    ours = HFTokenizer(tokenizer_file)
    ids = {"bos_token_id": ours.bos_id, "eos_token_id": ours.eos_id, "pad_token_id": ours.pad_id}
    assert ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ids} == ids

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    text = "def alpha return beta"
    prompt = tok(text, return_tensors="pt").input_ids
    got = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)[0].tolist()
    assert len(got) == prompt.shape[1] + 8 and isinstance(tok.decode(got), str)
    # our model of --step 1 (not the newest, 2), teacher-forced on that text: the same greedy tokens
    ours_model = convert_hf.load_model(str(ckpt), step=1)
    logits = np.asarray(nnx.jit(lambda m, x: m(x).logits)(ours_model, jnp.asarray([got[:-1]], jnp.int32)))[0]  # [t, V]
    assert logits[prompt.shape[1] - 1 :].argmax(-1).tolist() == got[prompt.shape[1] :]
    embed = safetensors.load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    step1 = [x for p, x in jax.tree_util.tree_leaves_with_path(states[1]) if "embed" in jax.tree_util.keystr(p)]
    assert len(step1) == 1 and np.array_equal(embed, step1[0])


def test_byte_tokenizer_export_matches_the_training_ids(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    out = tmp_path / "hf"
    convert_hf.export_hf(str(ckpt), str(out))  # a weights-only checkpoint: the byte tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    byte = ByteTokenizer()
    text = "def fib(n):\n\treturn n if n < 2 else fib(n - 1)  # héllo ✓ \x00"
    assert tok(text).input_ids == [byte.bos_id] + byte.encode(text).tolist()  # BOS + bytes, as in training
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 256}


def test_step_that_is_not_a_checkpoint_is_one_line(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    with pytest.raises(SystemExit, match=r"^error: .*no committed checkpoint of step 5 \(have \[1, 2\]\)$"):
        convert_hf.main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--step", "5"])
    assert not (tmp_path / "hf").exists()


def test_generate_step_selects_the_checkpoint(monkeypatch):
    from tools import generate

    def load(path, step=None):
        raise SystemExit(f"load_model({path}, step={step})")

    monkeypatch.setattr(convert_hf, "load_model", load)
    with pytest.raises(SystemExit, match=r"^load_model\(ckpt, step=7\)$"):
        generate.main(["--ckpt", "ckpt", "--prompt", "x", "--step", "7"])
