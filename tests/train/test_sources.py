"""Tests for train/sources/: Parquet, saved `datasets` directories, ArrayRecord and pre-tokenized token
directories (tools/pretokenize.py), each from tiny files the test writes. The Parquet and `datasets`
tests need pyarrow (the `data` extra; CI installs it with `test`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.train.test_data import _cfg, _expected_pieces, _pieces, _texts, _write_text_corpus, assert_resumes_bitwise
from train import data
from train.sources import files, tokens

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check_source(cfg, texts):
    """The source's documents are exactly the non-empty `texts`, split into disjoint non-empty
    train/validation halves, and its eval pass is exactly the chunked validation documents."""
    train, val = data.load_corpus(cfg, "train"), data.load_corpus(cfg, "validation")
    train_texts, val_texts = [train[i] for i in range(len(train))], [val[i] for i in range(len(val))]
    assert sorted(train_texts + val_texts) == sorted(t for t in texts if t)
    assert train_texts and val_texts
    got = [p for b in data.make_eval_batches(cfg, batch_size=4, num_batches=10_000) for p in _pieces(b)]
    assert sorted(got) == sorted(_expected_pieces(val_texts, cfg.seq_len))
    batch = next(data.make_train_iterator(cfg, global_batch_size=4))
    assert batch["inputs"].shape == (4, cfg.seq_len) and batch["loss_mask"].sum() > 0
    return val_texts


def test_record_split_is_stable_per_record():
    # the documented rule: record r of a file with key k is validation iff splitmix64(k + r) % 100 < p
    keys = files.record_keys(12345, np.arange(10_000))
    assert len(set(keys.tolist())) == 10_000
    share = files.validation_mask(keys, 10).mean()
    assert 0.09 < share < 0.11
    np.testing.assert_array_equal(files.record_keys(12345, np.array([7, 3])), keys[[7, 3]])
    # SplitMix64 reference value (Vigna's splitmix64.c with state 0: first output)
    assert int(files.record_keys(0, np.array([0]))[0]) == 0xE220A8397B1DCDAF


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = _texts(30) + ["", None]
    (tmp_path / "pq").mkdir()
    for f in range(2):  # several row groups per file; a null and an empty text are skipped
        part = texts[f::2]
        table = pa.table({"id": list(range(len(part))), "body": part})
        pq.write_table(table, tmp_path / "pq" / f"part{f}.parquet", row_group_size=4)
    cfg = _cfg(source=str(tmp_path / "pq" / "*.parquet"), format="parquet", text_column="body", seq_len=16)
    cfg.val_percent = 30
    _check_source(cfg, texts)
    with pytest.raises(ValueError, match=r"part0\.parquet: no column 'text' \(data\.text_column\); columns: id, body"):
        data.load_corpus(_cfg(source=cfg.source, format="parquet"), "train")
    with pytest.raises(ValueError, match=r"part0\.parquet: column 'id' is int64, not a string"):
        data.load_corpus(_cfg(source=cfg.source, format="parquet", text_column="id"), "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"x\.parquet: not a readable Parquet file"):
        data.load_corpus(_cfg(source=str(tmp_path / "bad" / "*.parquet"), format="parquet"), "train")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "bad" / "x.parquet")
    with pytest.raises(ValueError, match="contain no text"):
        data.load_corpus(_cfg(source=str(tmp_path / "bad" / "*.parquet"), format="parquet"), "train")


def _save_to_disk(root, columns: dict, shards: int):
    """The layout `datasets.Dataset.save_to_disk` writes (checked against datasets 5.2): Arrow
    stream files data-0000i-of-0000n.arrow, dataset_info.json, and state.json listing the files."""
    import pyarrow as pa

    os.makedirs(root)
    table = pa.table(columns)
    n = len(table)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(names):
        part = table.slice(i * n // shards, (i + 1) * n // shards - i * n // shards)
        with pa.OSFile(os.path.join(root, name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(part, max_chunksize=3)
    state = {"_data_files": [{"filename": x} for x in names], "_fingerprint": "0", "_split": None}
    with open(os.path.join(root, "state.json"), "w") as fh:
        json.dump(state, fh)
    with open(os.path.join(root, "dataset_info.json"), "w") as fh:
        json.dump({"features": {k: {"dtype": "string", "_type": "Value"} for k in columns}}, fh)


def test_hf_disk(tmp_path):
    pytest.importorskip("pyarrow")
    texts = _texts(30) + [""]
    _save_to_disk(str(tmp_path / "ds"), {"text": texts, "n": list(range(len(texts)))}, shards=3)
    cfg = _cfg(source=str(tmp_path / "ds"), format="hf_disk", seq_len=16, val_percent=30)
    _check_source(cfg, texts)
    os.makedirs(tmp_path / "dd")
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(ValueError, match=r"is a DatasetDict \(splits train, test\); give one split's directory"):
        data.load_corpus(_cfg(source=str(tmp_path / "dd"), format="hf_disk"), "train")
    with pytest.raises(ValueError, match="no state.json there"):
        data.load_corpus(_cfg(source=str(tmp_path / "nothing"), format="hf_disk"), "train")
    with pytest.raises(ValueError, match=r"no column 'body'.*columns: text, n"):
        data.load_corpus(_cfg(source=str(tmp_path / "ds"), format="hf_disk", text_column="body"), "train")


def _write_array_record(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r.encode("utf-8"))
    w.close()


def test_arrayrecord(tmp_path):
    texts = _texts(30) + [""]
    (tmp_path / "ar").mkdir()
    for f in range(3):
        _write_array_record(tmp_path / "ar" / f"shard{f}.array_record", texts[f::3])
    cfg = _cfg(source=str(tmp_path / "ar" / "*.array_record"), format="arrayrecord", seq_len=16, val_percent=30)
    _check_source(cfg, texts)
    (tmp_path / "bad.array_record").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"bad\.array_record: not a readable ArrayRecord file"):
        data.load_corpus(_cfg(source=str(tmp_path / "bad.array_record"), format="arrayrecord"), "train")


def test_unknown_format_and_misfit_source(tmp_path):
    with pytest.raises(ValueError, match=r"data\.format must be one of text, jsonl, parquet, .*; got 'csv'"):
        data.make_train_iterator(_cfg(format="csv"), global_batch_size=2)
    with pytest.raises(ValueError, match="no header.json there"):
        data.load_corpus(_cfg(source=str(tmp_path), format="tokens"), "train")


# ----------------------------------------------------------------------------------------------
# Pre-tokenized token directories.


@pytest.fixture
def token_dir(tmp_path):
    """(text corpus glob, token directory of it written by the byte tokenizer, texts)."""
    glob_, texts = _write_text_corpus(tmp_path, n=40)
    cfg = _cfg(source=glob_)
    corpus = data.load_corpus(cfg, None)
    tok = data.load_tokenizer(cfg)
    tokens.write(tmp_path / "tok", (corpus[i] for i in range(len(corpus))), tok, spec="byte", source={})
    return str(tmp_path / "tok"), texts


def test_pretokenized_documents_and_eval(token_dir):
    out, texts = token_dir
    cfg = _cfg(source=out, format="tokens", seq_len=16, val_percent=30)
    corpus = data.load_corpus(cfg, "train")
    assert isinstance(corpus.reader._tokens, np.memmap) and corpus.reader._tokens.dtype == np.dtype("<u2")
    np.testing.assert_array_equal(corpus.stored_tokens(0), np.frombuffer(corpus[0].encode(), np.uint8))
    _check_source(cfg, texts)


@pytest.mark.parametrize("n_before", [0, 5, 23])
def test_pretokenized_resumes_exactly(token_dir, n_before):
    out, _ = token_dir
    cfg = _cfg(source=out, format="tokens", seq_len=16, val_percent=20)
    assert_resumes_bitwise(cfg, 4, n_before, 15)  # several epochs of this split


def test_pretokenized_processes_read_only_their_rows(token_dir):
    out, _ = token_dir
    cfg = _cfg(source=out, format="tokens", seq_len=16, val_percent=0)
    full = data.make_train_iterator(cfg, global_batch_size=8)
    parts = [data.make_train_iterator(cfg, global_batch_size=8, process_index=p, process_count=2) for p in range(2)]
    assert [p.documents.reads for p in parts] == [0, 0]  # the index pass reads docs.bin alone
    for _ in range(3):
        want = next(full)
        got = [next(p) for p in parts]
        for k in want:
            np.testing.assert_array_equal(want[k][0::2], got[0][k])
            np.testing.assert_array_equal(want[k][1::2], got[1][k])
    for p in parts:  # each process read the documents of its own rows, once each
        assert 0 < p.documents.reads == len(p.documents._cache) < len(p.documents.corpus)


def test_pretokenized_checks_its_tokenizer(token_dir, tmp_path):
    from tests.train.test_data import _save_bpe

    out, texts = token_dir
    bpe = _save_bpe(tmp_path, texts)
    with pytest.raises(ValueError, match=r"was tokenized with 'byte' \(fingerprint byte\), but data.tokenizer is"):
        data.make_train_iterator(_cfg(source=out, format="tokens", tokenizer=bpe), global_batch_size=2)
    with pytest.raises(ValueError, match="already holds a token directory"):
        tokens.write(out, iter(["x"]), data.load_tokenizer(_cfg()), spec="byte", source={})
    os.remove(os.path.join(out, "header.json"))  # an unfinished write
    with pytest.raises(ValueError, match="not a directory written by tools.pretokenize"):
        data.load_corpus(_cfg(source=out, format="tokens"), "train")
    tokens.write(tmp_path / "empty", iter(["", ""]), data.load_tokenizer(_cfg()), spec="byte", source={})
    with pytest.raises(ValueError, match="contain no text"):
        data.load_corpus(_cfg(source=str(tmp_path / "empty"), format="tokens"), "train")


def test_pretokenized_uint32_for_large_vocabularies(tmp_path):
    class Big:  # a 70,000-id vocabulary: ids above 65,535 need uint32
        vocab_size, fingerprint, bos_id, eos_id, pad_id = 70_000, "big", 69_997, 69_998, 69_999

        def encode(self, text):
            return np.asarray([65_536 + len(text), 3], np.int32)

    header = tokens.write(tmp_path / "big", iter(["ab", "abc"]), Big(), spec="big", source={})
    assert header["dtype"] == "uint32" and header["num_tokens"] == 4
    reader = tokens.TokenReader(*tokens.read_header(str(tmp_path / "big")))
    assert reader.tokens(0, 1, -1).tolist() == [65_539, 3]


def test_pretokenize_cli_and_remote_token_dir(tmp_path, monkeypatch):
    from tests.train.fake_gcs import fake_gcs

    glob_, texts = _write_text_corpus(tmp_path, n=20)
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "tools.pretokenize", "--config=configs/moe_tiny.py", f"--out={out}"]
    cmd += [f"--config.data.source={glob_}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["docs"] == 20 and line["tokens"] == sum(len(t.encode()) for t in texts) and line["dtype"] == "uint16"
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "already holds a token directory" in res.stderr
    # the same directory on a gs:// bucket streams the same batches (read by seek + read, no memmap)
    cfg = _cfg(source=str(out), format="tokens", seq_len=16, val_percent=20)
    local = data.make_train_iterator(cfg, global_batch_size=4)
    monkeypatch.chdir(tmp_path)
    with fake_gcs() as fs:
        for name in ("tokens.bin", "docs.bin", "header.json"):
            fs.pipe_file(f"bucket/tok/{name}", (out / name).read_bytes())
        remote = data.make_train_iterator(
            _cfg(source="gs://bucket/tok", format="tokens", seq_len=16, val_percent=20), global_batch_size=4
        )
        assert remote.documents.corpus.reader._tokens is None
        for _ in range(3):
            want, got = next(local), next(remote)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
    assert not (tmp_path / "gs:").exists()


def test_remote_parquet_and_hf_disk(tmp_path, monkeypatch):
    """The same files on a gs:// bucket (through etils.epath) give the same documents and batches."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from tests.train.fake_gcs import fake_gcs

    texts = _texts(24)
    (tmp_path / "pq").mkdir()
    for f in range(2):
        pq.write_table(pa.table({"text": texts[f::2]}), tmp_path / "pq" / f"part{f}.parquet", row_group_size=5)
    _save_to_disk(str(tmp_path / "ds"), {"text": texts}, shards=2)
    local = {
        "parquet": _cfg(source=str(tmp_path / "pq" / "*.parquet"), format="parquet", seq_len=16, val_percent=30),
        "hf_disk": _cfg(source=str(tmp_path / "ds"), format="hf_disk", seq_len=16, val_percent=30),
    }
    want = {k: next(data.make_train_iterator(c, global_batch_size=4)) for k, c in local.items()}
    monkeypatch.chdir(tmp_path)
    with fake_gcs() as fs:
        for sub in ("pq", "ds"):
            for p in (tmp_path / sub).iterdir():
                fs.pipe_file(f"bucket/{sub}/{p.name}", p.read_bytes())
        remote = {
            "parquet": _cfg(source="gs://bucket/pq/*.parquet", format="parquet", seq_len=16, val_percent=30),
            "hf_disk": _cfg(source="gs://bucket/ds", format="hf_disk", seq_len=16, val_percent=30),
        }
        for k, cfg in remote.items():
            corpus = data.load_corpus(cfg, "validation")
            assert all(p.startswith("gs://bucket/") for p in corpus.paths)
            got = next(data.make_train_iterator(cfg, global_batch_size=4))
            for key in want[k]:
                np.testing.assert_array_equal(got[key], want[k][key])
    assert not (tmp_path / "gs:").exists()
