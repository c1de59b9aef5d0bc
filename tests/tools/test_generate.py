"""tools.generate: JSONL requests in, JSONL results out, per-request settings, one-line errors."""

import json

import pytest
from flax import nnx

import tools.convert_hf
from model import generation
from model.transformer import Transformer
from tests.model.test_decode import CFG
from tools import generate


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG.replace(n_layers=2), rngs=nnx.Rngs(0))


def test_jsonl_in_jsonl_out(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tools.convert_hf, "load_model", lambda path, step=None: model)
    reqs = [
        {"prompt": "def f(x):", "max_new_tokens": 6, "id": "a"},
        {"prompt": "import os", "temperature": 0.8, "top_k": 5},
        {"prompt": "x", "max_new_tokens": 0},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    generate.main(
        [
            "--ckpt",
            "unused",
            "--input",
            str(src),
            "--output",
            str(dst),
            "--max_new_tokens",
            "4",
            "--no-stop",
            "--seed",
            "3",
        ]
    )
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", 1, 2] and [o["new_tokens"] for o in out] == [6, 4, 0]
    assert all(o["finish_reason"] == "length" for o in out)
    # one batch with per-request settings: the library call with the same settings (byte tokenizer, BOS 257)
    ids = generation.generate(
        model,
        [[257] + list(r["prompt"].encode()) for r in reqs],
        max_new_tokens=[6, 4, 0],
        temperature=[0, 0.8, 0],
        top_k=[0, 5, 0],
        seed=3,
    )
    assert [o["completion"] for o in out] == [bytes(i for i in x if i < 256).decode("utf-8", "replace") for x in ids]
    err = capsys.readouterr().err
    assert "tokens/s" in err and "time to first token" in err


def test_bad_requests_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--ckpt", "x", "--prompt", "hi", "--max_new_tokens", "-1"])
    assert "--max_new_tokens must be >= 0, got -1" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "max_new_tokens": -2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: max_new_tokens must be an int >= 0, got -2"):
        generate.read_requests(str(bad), {"max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0})
    bad.write_text('{"prompt": "a", "temp": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown key\(s\) \['temp'\]"):
        generate.read_requests(str(bad), {})
