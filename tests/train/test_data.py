"""Tests for train/data.py and train/tokenizer.py: tiny corpora in tmp_path plus one stdlib smoke test."""

import hashlib
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest

from train import chunks, data
from train.tokenizer import ByteTokenizer

WORDS = "alpha beta gamma delta épsilon ζeta η 数据 lorem ipsum dolor sit amet".split()


def _cfg(**overrides):
    cfg = data.default_data_config()
    cfg.update(overrides)
    return cfg


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    # lengths straddle seq_len (16 in most tests): short docs get packed, long ones chunked
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) + f" #{i}" for i in range(n)]


def _write_text_corpus(tmp_path, n=24, seed=0):
    d = tmp_path / "corpus"
    d.mkdir()
    texts = _texts(n, seed)
    for i, t in enumerate(texts):
        (d / f"doc_{i:03d}.txt").write_text(t, encoding="utf-8")
    return str(d / "*.txt"), texts


def _pieces(batch):
    """(inputs, targets) of every packed piece, checking the row layout on the way."""
    out = []
    for inp, tgt, seg, pos, mask in zip(
        *(batch[k] for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"))
    ):
        ids = [s for s in np.unique(seg) if s > 0]
        assert ids == list(range(1, len(ids) + 1))
        last = 0
        for s in ids:
            (where,) = np.nonzero(seg == s)
            assert where[0] == last and np.all(np.diff(where) == 1), "segments must be contiguous, in order"
            last = where[-1] + 1
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            # the target of each position is the next input of the same piece
            np.testing.assert_array_equal(tgt[where][:-1], inp[where][1:])
            out.append((tuple(inp[where]), tuple(tgt[where])))
        assert np.all(seg[last:] == 0), "padding only at the end of a row"
        pad = seg == 0
        assert np.all(inp[pad] == 256) and np.all(tgt[pad] == 256) and np.all(pos[pad] == 0)
        np.testing.assert_array_equal(mask, (~pad).astype(np.float32))
    return out


def _expected_pieces(texts, seq_len):
    out = []
    for t in texts:
        ids = [257] + list(t.encode("utf-8")) + [258]
        for s in range(0, len(ids) - 1, seq_len):
            w = ids[s : s + seq_len + 1]
            out.append((tuple(w[:-1]), tuple(w[1:])))
    return out


def _split_texts(cfg, texts_by_path, split):
    corpus = data.load_corpus(cfg, split)
    return [texts_by_path[corpus.paths[f]] for f in corpus.docs[:, 0]]


def test_byte_tokenizer():
    tok = ByteTokenizer()
    ids = tok.encode("aé数")
    assert ids.dtype == np.int32 and ids.tolist() == list("aé数".encode())
    assert tok.decode(np.concatenate([[257], ids, [258, 256]])) == "aé数"
    np.testing.assert_array_equal(tok.token_bytes([97, 256, 257, 258]), [1, 0, 0, 0])
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)


def test_eval_pass_is_exactly_the_chunked_validation_docs(tmp_path):
    glob_, texts = _write_text_corpus(tmp_path)
    cfg = _cfg(source=glob_, seq_len=16, val_percent=50)
    by_path = {os.path.abspath(str(tmp_path / "corpus" / f"doc_{i:03d}.txt")): t for i, t in enumerate(texts)}
    val_texts = _split_texts(cfg, by_path, "validation")
    batches = data.make_eval_batches(cfg, batch_size=4, num_batches=10_000)
    got = [p for b in batches for p in _pieces(b)]
    # every token of every validation document is a target exactly once, never across documents
    assert sorted(got) == sorted(_expected_pieces(val_texts, 16))
    for b in batches:
        assert all(v.shape == (4, 16) for v in b.values())
        assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    total_bytes = sum(len(t.encode()) for t in val_texts)
    assert sum(int(b["target_bytes"].sum()) for b in batches) == total_bytes
    assert (
        data.make_eval_batches(cfg, batch_size=4, num_batches=2)[1]["inputs"].tolist() == batches[1]["inputs"].tolist()
    )


def test_train_pieces_come_from_train_docs(tmp_path):
    glob_, texts = _write_text_corpus(tmp_path)
    cfg = _cfg(source=glob_, seq_len=16, val_percent=50)
    by_path = {os.path.abspath(str(tmp_path / "corpus" / f"doc_{i:03d}.txt")): t for i, t in enumerate(texts)}
    allowed = set(_expected_pieces(_split_texts(cfg, by_path, "train"), 16))
    it = data.make_train_iterator(cfg, global_batch_size=4)
    for _ in range(30):  # several epochs of this tiny split
        assert set(_pieces(next(it))) <= allowed


def test_split_is_by_file_and_deterministic(tmp_path, monkeypatch):
    glob_, _ = _write_text_corpus(tmp_path, n=60)
    cfg = _cfg(source=glob_, val_percent=30)
    train, val = data.load_corpus(cfg, "train"), data.load_corpus(cfg, "validation")
    train_files = {train.paths[f] for f in train.docs[:, 0]}
    val_files = {val.paths[f] for f in val.docs[:, 0]}
    assert not train_files & val_files and len(train_files | val_files) == 60 and val_files
    for path in train_files | val_files:  # the documented rule: sha256(relative path) % 100 < val_percent
        h = int.from_bytes(hashlib.sha256(os.path.basename(path).encode()).digest()[:8], "big")
        assert (h % 100 < 30) == (path in val_files)
    # same answer from another working directory and with the glob spelled relative
    monkeypatch.chdir(tmp_path)
    val2 = data.load_corpus(_cfg(source="corpus/*.txt", val_percent=30), "validation")
    assert {val2.paths[f] for f in val2.docs[:, 0]} == val_files


def test_small_corpus_gets_both_splits(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    cfg = _cfg(source=str(tmp_path / "*.txt"), val_percent=5)
    assert len(data.load_corpus(cfg, "train")) == 1 and len(data.load_corpus(cfg, "validation")) == 1


def assert_resumes_bitwise(cfg, batch_size, n_before, n_after):
    """A state saved after `n_before` batches (through JSON, as a checkpoint stores it) restored in a
    fresh iterator gives bitwise the next `n_after` batches; returns (state, those batches)."""
    it = data.make_train_iterator(cfg, global_batch_size=batch_size)
    for _ in range(n_before):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(n_after)]
    resumed = data.make_train_iterator(cfg, global_batch_size=batch_size)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(got[k], want[k])
    return state, expected


@pytest.mark.parametrize("n_before", [0, 1, 7, 23])
def test_resume_is_bitwise(tmp_path, n_before):
    glob_, _ = _write_text_corpus(tmp_path)
    assert_resumes_bitwise(_cfg(source=glob_, seq_len=16, val_percent=20), 4, n_before, 20)  # several epochs


def _numbered_corpus(tmp_path, n_docs, repeats):
    """Document i is "i " repeated: any 16-byte piece of it names its document."""
    d = tmp_path / "numbered"
    d.mkdir()
    for i in range(n_docs):
        (d / f"doc_{i:03d}.txt").write_text(f"{i:03d} " * repeats)
    return str(d / "*.txt")


def _docs_of(batch):
    """Document numbers of each row's pieces (see `_numbered_corpus`)."""
    out = []
    for inp, seg in zip(batch["inputs"], batch["segment_ids"]):
        pieces = [bytes(int(x) for x in inp[seg == s] if x < 256).decode() for s in range(1, seg.max() + 1)]
        out.append({int(w) for p in pieces for w in p.split() if len(w) == 3})
    return out


def test_a_batch_mixes_many_documents(tmp_path):
    # 40 documents of ~300 chunks each. A document-order stream that shuffles only within a window
    # of chunks draws a batch of 8 rows from ~3 consecutive documents; a global chunk shuffle draws
    # from ~7.4 of them (8 draws from 40 equally likely documents).
    cfg = _cfg(source=_numbered_corpus(tmp_path, 40, 1200), seq_len=16, val_percent=0)
    it = data.make_train_iterator(cfg, global_batch_size=8)
    distinct = [len(set().union(*_docs_of(next(it)))) for _ in range(25)]
    assert np.mean(distinct) >= 6.5, distinct
    assert min(distinct) >= 4, distinct


def test_each_process_reads_only_its_rows(tmp_path):
    cfg = _cfg(source=_numbered_corpus(tmp_path, 40, 1200), seq_len=16, val_percent=0)
    parts = [
        data.make_train_iterator(cfg, global_batch_size=8, process_index=p, process_count=2, allgather=None)
        for p in range(2)
    ]
    for it in parts:  # drop the documents the index pass tokenized: count only what the rows need
        it.documents._cache.clear()
        it.documents._cached_tokens = it.documents.reads = 0
    needed = [set(), set()]
    for _ in range(3):
        for p, it in enumerate(parts):
            needed[p] |= set().union(*_docs_of(next(it)))
    for p, it in enumerate(parts):
        assert it.documents.reads == len(needed[p]) and set(it.documents._cache) == needed[p]
    assert needed[0] != needed[1]


def test_index_pass_is_shared_with_allgather(tmp_path):
    glob_, _ = _write_text_corpus(tmp_path, n=23)
    cfg = _cfg(source=glob_, seq_len=16, val_percent=0)
    tok, corpus = data.load_tokenizer(cfg), data.load_corpus(cfg, "train")
    readers = [chunks.Documents(corpus, tok) for _ in range(3)]

    def allgather(local):  # what jax's process_allgather returns, the other processes' shards computed here
        shards = [readers[p].lengths(process_index=p, process_count=3, allgather=None)[p::3] for p in (0, 1, 2)]
        m = len(local)
        return np.stack([np.pad(x, (0, m - len(x)), constant_values=-1) for x in shards])

    got = readers[1].lengths(process_index=1, process_count=3, allgather=allgather)
    want = [len(corpus[d].encode()) + 2 for d in range(len(corpus))]
    assert got.tolist() == want
    solo = chunks.Documents(corpus, tok)
    solo.lengths(process_index=1, process_count=3, allgather=lambda x: np.stack([x, x, x]))
    assert solo.reads == len(range(1, len(corpus), 3))  # only its own third was tokenized


def test_chunk_index():
    index = chunks.chunk_index(np.array([2, 5, 6, 3]), seq_len=2)
    # doc 0: [B E] -> 1 chunk; doc 1: 5 tokens -> inputs 0-1, 2-3; doc 2: 6 -> 0-1, 2-3, 4; doc 3: 0-1
    assert index.doc.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert index.start.tolist() == [0, 0, 2, 0, 2, 4, 0]
    assert index.length.tolist() == [1, 2, 2, 2, 2, 1, 2]


def test_resume_rejects_other_stream(tmp_path):
    glob_, _ = _write_text_corpus(tmp_path)
    state = data.make_train_iterator(_cfg(source=glob_, seq_len=16), global_batch_size=4).get_state()
    other = data.make_train_iterator(_cfg(source=glob_, seq_len=32), global_batch_size=4)
    with pytest.raises(ValueError, match="seq_len"):
        other.set_state(state)


def test_epochs_reshuffle_and_seed_matters(tmp_path):
    glob_, _ = _write_text_corpus(tmp_path)

    def first(seed, n=12):
        it = data.make_train_iterator(_cfg(source=glob_, seq_len=16, seed=seed), global_batch_size=4)
        return np.stack([next(it)["inputs"] for _ in range(n)])

    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_process_sharding_matches_one_process(tmp_path):
    glob_, _ = _write_text_corpus(tmp_path)
    cfg = _cfg(source=glob_, seq_len=16)
    full = data.make_train_iterator(cfg, global_batch_size=6)
    parts = [data.make_train_iterator(cfg, global_batch_size=6, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        want = next(full)
        got = [next(p) for p in parts]
        for k in want:
            assert got[0][k].shape[0] == 3
            np.testing.assert_array_equal(want[k][0::2], got[0][k])
            np.testing.assert_array_equal(want[k][1::2], got[1][k])
    ev = data.make_eval_batches(cfg, batch_size=6, num_batches=3)
    ev1 = data.make_eval_batches(cfg, batch_size=6, num_batches=3, process_index=1, process_count=2)
    for a, b in zip(ev, ev1):
        np.testing.assert_array_equal(a["targets"][1::2], b["targets"])
    with pytest.raises(ValueError, match="multiple of the process count"):
        data.make_train_iterator(cfg, global_batch_size=5, process_count=2)


def test_jsonl(tmp_path):
    texts = _texts(20)
    for f in range(4):
        with open(tmp_path / f"part{f}.jsonl", "w", encoding="utf-8") as fh:
            for t in texts[f::4]:
                fh.write(json.dumps({"body": t, "id": 1}) + "\n\n")  # blank lines are skipped
    cfg = _cfg(source=str(tmp_path / "*.jsonl"), format="jsonl", jsonl_field="body", seq_len=16, val_percent=50)
    val = data.load_corpus(cfg, "validation")
    val_texts = [val[i] for i in range(len(val))]
    assert set(val_texts) <= set(texts) and len(val_texts) == 5 * len({int(f) for f in val.docs[:, 0]})
    got = [p for b in data.make_eval_batches(cfg, batch_size=2, num_batches=1000) for p in _pieces(b)]
    assert sorted(got) == sorted(_expected_pieces(val_texts, 16))
    next(data.make_train_iterator(cfg, global_batch_size=2))


def _save_bpe(tmp_path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    path = tmp_path / "bpe.json"
    tok.save(str(path))
    return str(path)


def _save_wordlevel(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "wordlevel.json"
    tok.save(str(path))
    return str(path), len(vocab)


def test_hf_bytelevel_bpe_tokenizer(tmp_path):
    glob_, texts = _write_text_corpus(tmp_path)
    cfg = _cfg(source=glob_, seq_len=16, val_percent=50, tokenizer=_save_bpe(tmp_path, texts))
    tok = data.load_tokenizer(cfg)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2) and tok.vocab_size == 300
    ids = tok.encode(texts[0])
    assert ids.dtype == np.int32 and tok.decode(ids) == texts[0]
    assert tok.bos_id not in tok.encode("<s> in the text is just text")
    assert tok.token_bytes(ids).sum() == len(texts[0].encode())  # exact for ByteLevel vocabularies
    by_path = {os.path.abspath(str(tmp_path / "corpus" / f"doc_{i:03d}.txt")): t for i, t in enumerate(texts)}
    val_bytes = sum(len(t.encode()) for t in _split_texts(cfg, by_path, "validation"))
    batches = data.make_eval_batches(cfg, batch_size=4, num_batches=1000)
    assert sum(int(b["target_bytes"].sum()) for b in batches) == val_bytes
    batch = next(data.make_train_iterator(cfg, global_batch_size=4))
    data.check_token_ids(batch, tok.vocab_size)
    assert batch["targets"][batch["loss_mask"] == 0].tolist() == [tok.pad_id] * int((batch["loss_mask"] == 0).sum())


def test_hf_wordlevel_tokenizer_gets_appended_specials(tmp_path):
    glob_, _ = _write_text_corpus(tmp_path)
    path, n = _save_wordlevel(tmp_path)
    tok = data.load_tokenizer(types.SimpleNamespace(tokenizer=path))
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {n, n + 1, n + 2} and tok.vocab_size == n + 3
    assert tok.decode(np.concatenate([[tok.bos_id], tok.encode("alpha beta")])) == "alpha beta"
    np.testing.assert_array_equal(tok.token_bytes(tok.encode("alpha 数据")), [5, 6])
    assert tok.token_bytes([tok.bos_id, tok.eos_id, tok.pad_id]).tolist() == [0, 0, 0]
    batch = next(data.make_train_iterator(_cfg(source=glob_, seq_len=16, tokenizer=path), global_batch_size=2))
    data.check_token_ids(batch, tok.vocab_size)
    top = max(batch["inputs"].max(), batch["targets"].max())
    assert top >= n  # EOS is always among the targets
    with pytest.raises(ValueError, match=f"token id {top} at or above the vocabulary size {n}"):
        data.check_token_ids(batch, n)


def test_unigram_bits_per_byte(tmp_path):
    glob_, texts = _write_text_corpus(tmp_path)
    cfg = _cfg(source=glob_, val_percent=50)
    by_path = {os.path.abspath(str(tmp_path / "corpus" / f"doc_{i:03d}.txt")): t for i, t in enumerate(texts)}
    raw = "".join(_split_texts(cfg, by_path, "validation")).encode("utf-8")
    counts = {b: raw.count(bytes([b])) for b in set(raw)}
    expected = -sum(c / len(raw) * np.log2(c / len(raw)) for c in counts.values())
    assert data.unigram_bits_per_byte(cfg) == pytest.approx(expected, rel=1e-12)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="nothing_here"):
        data.make_train_iterator(_cfg(source=str(tmp_path / "nothing_here/*.txt")), global_batch_size=2)
    with pytest.raises(ValueError, match="missing.txt"):
        data.load_corpus(_cfg(source=str(tmp_path / "missing.txt")), "train")
    (tmp_path / "empty1.txt").write_text("")
    (tmp_path / "empty2.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\*\.txt.*contain no text"):
        data.make_train_iterator(_cfg(source=str(tmp_path / "empty*.txt")), global_batch_size=2)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        data.load_corpus(_cfg(source=str(tmp_path / "bad.jsonl"), format="jsonl"), "train")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        data.load_corpus(_cfg(source=str(tmp_path / "broken.jsonl"), format="jsonl"), "train")
    with pytest.raises(ValueError, match="no_such_tokenizer.json"):
        data.load_tokenizer(_cfg(tokenizer=str(tmp_path / "no_such_tokenizer.json")))
    (tmp_path / "garbled_tokenizer.json").write_bytes(b"\xff\xfe{not a tokenizer")
    with pytest.raises(ValueError, match="cannot read .*garbled_tokenizer.json"):
        data.load_tokenizer(_cfg(tokenizer=str(tmp_path / "garbled_tokenizer.json")))
    (tmp_path / "truncated_tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(ValueError, match="cannot read .*truncated_tokenizer.json"):
        data.load_tokenizer(_cfg(tokenizer=str(tmp_path / "truncated_tokenizer.json")))
    with pytest.raises(ValueError, match="seq_len"):
        data.make_train_iterator(_cfg(seq_len=1), global_batch_size=2)
    (tmp_path / "one.txt").write_text("a single file")
    with pytest.raises(ValueError, match="validation split is empty"):
        data.make_eval_batches(_cfg(source=str(tmp_path / "one.txt")), batch_size=2, num_batches=1)
    with pytest.raises(ValueError, match="is a directory"):
        data.load_corpus(_cfg(source=str(tmp_path)), "train")
    with pytest.raises(ValueError, match="token id 300 at or above the vocabulary size 259"):
        data.check_token_ids({"inputs": np.array([[1, 300]]), "targets": np.array([[1, 2]])}, 259)


def test_stdlib_smoke():
    cfg = data.default_data_config()
    train, val = data.load_corpus(cfg, "train"), data.load_corpus(cfg, "validation")
    assert len(train) > 500 and len(val) > 20
    assert not {train.paths[f] for f in train.docs[:, 0]} & {val.paths[f] for f in val.docs[:, 0]}
    assert not any("site-packages" in p for p in train.paths)
    batch = next(data.make_train_iterator(cfg, global_batch_size=4))
    assert batch["inputs"].shape == (4, 256) and batch["loss_mask"].mean() > 0.9
    data.check_token_ids(batch, 259)
    assert 4.0 < data.unigram_bits_per_byte(cfg) < 6.0
    assert len(data.make_eval_batches(cfg, batch_size=4, num_batches=2)) == 2


def test_remote_corpus_and_tokenizer(tmp_path, monkeypatch):
    from tests.train.fake_gcs import fake_gcs

    monkeypatch.chdir(tmp_path)
    texts = _texts(24)
    with fake_gcs() as fs:
        for i, t in enumerate(texts):
            fs.pipe_file(f"bucket/corpus/doc_{i:03d}.txt", t.encode())
        fs.pipe_file("bucket/tok/tokenizer.json", Path(_save_bpe(tmp_path, texts)).read_bytes())
        cfg = _cfg(source="gs://bucket/corpus/*.txt", seq_len=16, val_percent=50, tokenizer="gs://bucket/tok")
        val = data.load_corpus(cfg, "validation")
        assert all(p.startswith("gs://bucket/corpus/doc_") for p in val.paths)
        # the split hashes the path relative to the glob's root, as for a local corpus
        local = tmp_path / "local"
        local.mkdir()
        for i, t in enumerate(texts):
            (local / f"doc_{i:03d}.txt").write_text(t, encoding="utf-8")
        local_val = data.load_corpus(_cfg(source=str(local / "*.txt"), val_percent=50), "validation")
        assert [os.path.basename(val.paths[f]) for f in val.docs[:, 0]] == [
            os.path.basename(local_val.paths[f]) for f in local_val.docs[:, 0]
        ]
        tok = data.load_tokenizer(cfg)
        assert tok.vocab_size == 300
        batch = next(data.make_train_iterator(cfg, global_batch_size=4))
        data.check_token_ids(batch, tok.vocab_size)
        with pytest.raises(ValueError, match="local only"):
            data.load_corpus(_cfg(source="gs://bucket/**/*.txt"), "train")
        with pytest.raises(ValueError, match="matched no files"):
            data.load_corpus(_cfg(source="gs://bucket/nothing/*.txt"), "train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.json", "local"]  # nothing named "gs:"
