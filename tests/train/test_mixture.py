"""Tests for weighted mixtures of data sources (`data.mixture`, train/data.py)."""

import json

import numpy as np
import pytest

from tests.train.test_data import _cfg, _pieces, assert_resumes_bitwise
from tests.train.test_sources import _write_array_record
from train import data

LETTERS = "abc"


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Three sources in three formats; source i's documents are its letter repeated 3..8 times, so
    every piece names its source (one chunk per document at seq_len 16). 1,000 documents each: grain's
    index shuffle is ~1 ms per index below a few hundred (cycle walking), ~60 us at 1,000."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    docs = [[LETTERS[i] * int(rng.integers(3, 9)) for _ in range(1000)] for i in range(3)]
    (root / "a").mkdir()
    for j, t in enumerate(docs[0]):
        (root / "a" / f"{j:04d}.txt").write_text(t)
    for f in range(20):
        (root / f"b{f:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[1][f::20]))
    _write_array_record(root / "c.array_record", docs[2])
    return (
        dict(source=str(root / "a" / "*.txt"), weight=5),
        dict(source=str(root / "b*.jsonl"), format="jsonl", weight=3),
        dict(source=str(root / "c.array_record"), format="arrayrecord", weight=2.0),
    )


def _sources_of(batch):
    """The source (0, 1, 2) of every packed piece; a piece never mixes sources."""
    out = []
    for inputs, _ in _pieces(batch):
        letters = {chr(x) for x in inputs if x < 256}
        assert len(letters) == 1, letters
        out.append(LETTERS.index(letters.pop()))
    return out


def test_proportions_within_2_percent_over_10000_sequences(mixture):
    cfg = _cfg(mixture=mixture, seq_len=16, val_percent=0)
    it = data.make_train_iterator(cfg, global_batch_size=64)
    seen = []
    while len(seen) < 10_000:
        seen += _sources_of(next(it))
    share = np.bincount(seen, minlength=3) / len(seen)
    np.testing.assert_allclose(share, [0.5, 0.3, 0.2], atol=0.02)


def test_mixture_resumes_exactly_and_follows_the_seed(mixture):
    # val_percent=90 leaves ~100 training documents (= chunks) per source: every source starts a new
    # epoch within the batches checked after the saved state
    cfg = _cfg(mixture=mixture, seq_len=16, val_percent=90)
    state, after = assert_resumes_bitwise(cfg, 8, 7, 30)
    chunks = [len(data.load_corpus(c, "train")) for c, _ in data.mixture_components(cfg)]
    assert (np.bincount([s for b in after for s in _sources_of(b)], minlength=3) > chunks).all()

    def first(seed):
        it = data.make_train_iterator(_cfg(mixture=mixture, seq_len=16, seed=seed), global_batch_size=8)
        return np.stack([next(it)["inputs"] for _ in range(4)])

    np.testing.assert_array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))
    other = dict(mixture[0], weight=1)
    reweighted = data.make_train_iterator(
        _cfg(mixture=(other,) + mixture[1:], seq_len=16, val_percent=90), global_batch_size=8
    )
    with pytest.raises(ValueError, match="different stream.*mixture"):
        reweighted.set_state(state)


def test_mixture_eval_and_unigram_baseline(mixture):
    cfg = _cfg(mixture=mixture, seq_len=16, val_percent=30)
    batches = data.make_eval_batches(cfg, batch_size=4, num_batches=3)
    assert len(batches) == 3 and all(set(_sources_of(b)) <= {0, 1, 2} for b in batches)
    # each source's text is one letter: the weighted byte distribution is the weights themselves
    w = np.array([0.5, 0.3, 0.2])
    assert data.unigram_bits_per_byte(cfg) == pytest.approx(float(-(w * np.log2(w)).sum()), rel=1e-12)


def test_mixture_errors(mixture):
    a = mixture[0]
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"data\.mixture\[1\]\.weight must be a positive number"):
            data.make_train_iterator(_cfg(mixture=(a, dict(a, weight=bad))), global_batch_size=2)
    with pytest.raises(ValueError, match=r"data\.mixture\[0\] needs 'source' and 'weight'.*got \['source', 'wieght'\]"):
        data.make_train_iterator(_cfg(mixture=(dict(source=a["source"], wieght=1),)), global_batch_size=2)
    with pytest.raises(ValueError, match=r"data\.mixture\[0\]\.format must be one of .*; got 'xml'"):
        data.make_train_iterator(_cfg(mixture=(dict(a, format="xml"),)), global_batch_size=2)
    with pytest.raises(ValueError, match="data.mixture is set"):
        data.load_corpus(_cfg(mixture=mixture), "train")
