"""Rewards (parsing, verifiers, registry, errors) and tasks (seeded, disjoint held-out split, JSONL)."""

import json

import numpy as np
import pytest

from train.rl import rewards, tasks


def test_correct_and_format_rewards():
    ex = tasks.Example("Q: 2+3\nA: ", "5", "exact")
    assert rewards.correct("<answer>5</answer>", ex) == 1.0
    assert rewards.correct("<answer> 5 </answer> trailing", ex) == 1.0
    assert rewards.correct("<answer>6</answer>", ex) == 0.0
    assert rewards.format_reward("<answer>6</answer>", ex) == 1.0
    big = tasks.Example("", "127", "exact")
    assert rewards.digits("<answer>127</answer>", big) == 1.0
    assert rewards.digits("<answer>121</answer>", big) == pytest.approx(2 / 3)
    assert rewards.digits("<answer>27</answer>", big) == pytest.approx(2 / 3)  # right-aligned: 2, 7 match
    assert rewards.digits("<answer>1270</answer>", big) == 0.0
    assert rewards.digits("127", big) == 0.0
    assert rewards.format_reward("<answer>5</answer> trailing", ex) == 0.0
    total, per, unparsed = rewards.score(
        ["<answer>5</answer>", "5", "<answer>5</answer>x", "<answer>4"], [ex] * 4, {"correct": 1.0, "format": 0.5}, 0
    )
    np.testing.assert_allclose(per["correct"], [1, 0, 1, 0])
    np.testing.assert_allclose(per["format"], [1, 0, 0, 0])
    np.testing.assert_allclose(total, [1.5, 0, 1, 0])
    assert unparsed == 2  # "5" and the unclosed tag


def test_countdown_verifier():
    ex = tasks.Example("", "(3+5)*2", "countdown", 16, (2, 3, 5))
    assert rewards.countdown_ok("(3+5)*2", ex)
    assert rewards.countdown_ok("2*(5+3)", ex)
    assert not rewards.countdown_ok("3*5+2", ex)  # 17
    assert not rewards.countdown_ok("(3+5)*2+0", ex)  # an extra number
    assert not rewards.countdown_ok("8*2", ex)  # not the given numbers
    assert not rewards.countdown_ok("__import__('os')", ex)
    assert not rewards.countdown_ok("2/(5-5)*3", tasks.Example("", "", "countdown", 0, (2, 5, 5, 3)))
    # the generator's own reference solutions verify, and the problems are solvable
    task = tasks.Countdown(seed=1, n_numbers=3)
    for i in range(50):
        e = task.example("train", i)
        assert rewards.correct(tasks.answer_format(e.answer), e) == 1.0, e


def test_registry_weights_and_errors():
    @rewards.register("boom")
    def boom(completion, example):
        raise KeyError("oops")

    try:
        w = rewards.parse_weights("correct=1, boom=0.5")
        assert w == {"correct": 1.0, "boom": 0.5}
        ex = tasks.Example("", "1", "exact")
        with pytest.raises(rewards.RewardError, match=r"'boom' raised KeyError: 'oops' at step 7 on completion 'hi'"):
            rewards.score(["hi"], [ex], w, 7)
    finally:
        del rewards.REWARDS["boom"]
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.parse_weights("correct=1,nope=2")
    with pytest.raises(ValueError, match="not a number"):
        rewards.parse_weights("correct=x")
    with pytest.raises(ValueError, match="at least one"):
        rewards.parse_weights(" , ")


def test_arithmetic_is_seeded_and_splits_are_disjoint():
    t = tasks.Arithmetic(seed=0, heldout_percent=10, digits=2)
    train = [t.example("train", i) for i in range(400)]
    held = [t.example("heldout", i) for i in range(100)]
    assert train[:5] == [tasks.Arithmetic(seed=0).example("train", i) for i in range(5)]
    assert (
        tasks.Arithmetic(seed=1).example("train", 0) != train[0]
        or tasks.Arithmetic(seed=1).example("train", 1) != train[1]
    )
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    for e in train[:20]:
        a, b = e.prompt[3:-4].split("+")
        assert int(e.answer) == int(a) + int(b) and 10 <= int(a) < 100


def test_jsonl_task_and_empty_file(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"what is {i}?", "answer": str(i)} for i in range(40)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    t = tasks.JsonlTask(str(p), heldout_percent=20)
    seen = {t.example("train", i).prompt for i in range(40)} | {t.example("heldout", i).prompt for i in range(40)}
    assert seen == {r["prompt"] for r in rows}
    assert not {t.example("train", i).prompt for i in range(40)} & {t.example("heldout", i).prompt for i in range(40)}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        tasks.JsonlTask(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a JSON object with 'prompt' and 'answer'"):
        tasks.JsonlTask(str(bad))


def test_sft_corpus(tmp_path):
    t = tasks.Arithmetic(seed=0)
    glob = tasks.write_sft_corpus(t, str(tmp_path / "sft"), 30, shards=3)
    lines = [
        json.loads(x)["text"]
        for f in sorted((tmp_path / "sft").glob("*.jsonl"))
        for x in f.read_text().split("\n")
        if x
    ]
    assert glob.endswith("*.jsonl") and len(lines) == 30
    assert tasks.sft_text(t.example("train", 0)) in lines
    assert lines[0].startswith("Q: ") and lines[0].endswith("</answer>")


def test_reward_modules_register_user_rewards(tmp_path, monkeypatch):
    from train.rl.config import check_rl_config, default_rl_config

    (tmp_path / "my_rewards_t9.py").write_text(
        "from train.rl import rewards\n\n@rewards.register('short_t9')\ndef short(c, ex):\n    return float(len(c) < 5)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rl = default_rl_config()
    rl.rewards = "correct=1,short_t9=0.5"
    with pytest.raises(ValueError, match="unknown reward 'short_t9'"):
        check_rl_config(rl)
    rl.reward_modules = "my_rewards_t9"
    try:
        assert check_rl_config(rl) == {"correct": 1.0, "short_t9": 0.5}
        assert rewards.REWARDS["short_t9"]("abc", None) == 1.0
    finally:
        rewards.REWARDS.pop("short_t9", None)
    rl.reward_modules = "no_such_module_t9"
    with pytest.raises(ValueError, match="cannot import 'no_such_module_t9'"):
        check_rl_config(rl)
