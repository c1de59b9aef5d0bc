"""Rule-based rewards (DeepSeek-R1 Sec. 2.2.2: accuracy and format rewards, no reward model).

A reward function maps (completion text, ``tasks.Example``) to a float. Add one in a few lines::

    from train.rl import rewards

    @rewards.register("short")
    def short(completion: str, example) -> float:
        return 1.0 if len(completion) < 20 else 0.0

and name it in the config: ``--config.rl.rewards="correct=1.0,format=0.1,short=0.05"``. The total
reward is the weighted sum. Built in:

* ``correct``  1 if the text inside the first ``<answer>...</answer>`` is right, else 0. "Right" is the
               example's verifier (``VERIFIERS``): "exact" (string equality after stripping
               whitespace) or "countdown" (an expression of + - * / and parentheses using each given
               number exactly once that evaluates to the target). No tag = an unparsable answer:
               reward 0, counted in the ``unparsed`` metric.
* ``digits``   partial credit: the fraction of the answer's characters equal to the reference's,
               right-aligned (a dense signal when exact answers are rare; 0 for non-"exact" tasks).
* ``format``   1 if the whole completion is one ``<answer>...</answer>`` (surrounding whitespace allowed).

A reward function that raises stops the run with ``RewardError`` naming the function, the step and the
completion, before anything of that step is applied or saved (the checkpoints stay as they were).
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction
from typing import Callable, Optional

import numpy as np

RewardFn = Callable[[str, object], float]
REWARDS: dict[str, RewardFn] = {}
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_WHOLE = re.compile(r"\s*<answer>[^<]*</answer>\s*", re.DOTALL)


class RewardError(RuntimeError):
    pass


def register(name: str):
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def parse_answer(completion: str) -> Optional[str]:
    """The stripped text of the first ``<answer>...</answer>``, or None."""
    m = _TAG.search(completion)
    return None if m is None else m.group(1).strip()


def _eval(node) -> tuple[Fraction, list[int]]:
    """Exact value and the integer literals of an expression of + - * / and parentheses."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value), [node.value]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        (a, na), (b, nb) = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise ZeroDivisionError
            return a / b, na + nb
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)], na + nb
    raise ValueError("not + - * / of integers")


def countdown_ok(answer: str, example) -> bool:
    if len(answer) > 100:  # never parse something huge
        return False
    try:
        value, used = _eval(ast.parse(answer, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return False
    return sorted(used) == sorted(example.numbers) and value == example.target


VERIFIERS: dict[str, Callable[[str, object], bool]] = {
    "exact": lambda answer, ex: answer == ex.answer.strip(),
    "countdown": countdown_ok,
}


@register("correct")
def correct(completion: str, example) -> float:
    answer = parse_answer(completion)
    return 0.0 if answer is None else float(VERIFIERS[example.kind](answer, example))


@register("digits")
def digits(completion: str, example) -> float:
    """Partial credit for "exact" answers: the fraction of characters that match the reference,
    right-aligned (units with units), over the longer of the two; 0 without an answer tag."""
    answer, ref = parse_answer(completion), example.answer.strip()
    if answer is None or example.kind != "exact":
        return 0.0
    n = max(len(answer), len(ref), 1)
    return sum(a == b for a, b in zip(answer[::-1], ref[::-1])) / n


@register("format")
def format_reward(completion: str, example) -> float:
    return 1.0 if _WHOLE.fullmatch(completion) else 0.0


def parse_weights(spec: str) -> dict[str, float]:
    """``"correct=1.0,format=0.1"`` -> {"correct": 1.0, "format": 0.1}; unknown names are refused."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, w = part.partition("=")
        name = name.strip()
        try:
            out[name] = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"rl.rewards: weight of {name!r} is not a number: {w!r}") from None
        if name not in REWARDS:
            raise ValueError(f"rl.rewards: unknown reward {name!r}; registered: {sorted(REWARDS)}")
    if not out:
        raise ValueError(f"rl.rewards={spec!r}: name at least one reward, e.g. 'correct=1.0,format=0.1'")
    return out


def score(completions: list[str], examples: list, weights: dict[str, float], step: int):
    """-> (total [n] f32 weighted sum, {name: [n] f32}, number of completions without an answer tag)."""
    per = {}
    for name in weights:
        fn, vals = REWARDS[name], []
        for c, ex in zip(completions, examples):
            try:
                vals.append(float(fn(c, ex)))
            except Exception as e:  # noqa: BLE001 -- any failure of user code stops the run, named
                raise RewardError(
                    f"reward function {name!r} raised {type(e).__name__}: {e} at step {step} on completion {c!r}"
                ) from e
            if not np.isfinite(vals[-1]):
                raise RewardError(f"reward function {name!r} returned {vals[-1]} at step {step} on completion {c!r}")
        per[name] = np.asarray(vals, np.float32)
    total = sum(w * per[n] for n, w in weights.items())
    unparsed = sum(parse_answer(c) is None for c in completions)
    return np.asarray(total, np.float32), per, unparsed
