"""Exact-match scoring of generated answers against a record's gold ``answer``.

A task has one of four kinds, read off its gold answers by ``answer_kind``:

* ``boolean``: gold ``true``/``false`` (BoolQ: "the correct answer is true").
* ``choice``: gold ``answerN`` (ARC-Easy: "the correct answer is answer2").
* ``number``: gold parses as a number ("4", "9.8", "15.0", "0.6666666666666666", "-12"): the math sets and the
  builtin arithmetic task.
* ``text``: anything else; the whole output, normalised, must equal the gold. math_data.json is text: 203 of its
  records are AQuA multiple choice with gold letters A-E, whose rationales end "The answer is (C).", so score its
  numeric records on their own as numbers.

``extract`` pulls the answer out of a generated output and writes it in a normal form, so that extracting it again
gives it back unchanged (predictions may be passed around as extracted answers or as raw outputs alike):

* boolean: the last ``true``/``false``, case-insensitive, as a whole word ("untrue" is not "true").
* choice: the last ``answerN`` or ``answer N``, case-insensitive, written ``answerN``.
* number: the last number. Commas are dropped only as thousands separators (``1,234.50`` is 1234.5, while
  ``1,2,3`` is three numbers). A minus is a sign unless it joins two terms: ``5-3``, ``5 - 3`` and ``x-3`` end
  in 3, while ``-3``, ``= -3`` and ``to -3`` are -3. A fraction written without spaces, ``3/4``, is one number
  (0.75); with spaces, ``40 / 2``, it is two, as in a rationale's ``40 / 2 = 20``. A full stop ending a sentence
  is not a decimal point ("The answer is 12." gives 12). Integers are written without a decimal point ("12.0"
  gives "12"), other values in their shortest round-trip form, never in exponent notation. Not read: spaces as
  thousands separators ("$118 000" ends in 0; a few math_data.json rationales write them) and exponents ("1e5"
  ends in 5), both as in LLM-Adapters.
* text: whitespace collapsed, lower-cased, punctuation stripped from both ends.

``None`` when nothing is found. Generated outputs should be cut at the end of the response first: an output that
runs on into an echoed prompt ("Answer format: true/false") would have its last match taken from the echo.

Numbers compare as numbers, equal when they differ by at most ``NUMBER_TOLERANCE`` = 0.001, the tolerance of
LLM-Adapters: its gold answers are full-precision floats ("0.6666666666666666"), so a model writing 0.667 or 2/3
scores, while 0.67 does not. Other kinds compare as normalised strings.

How this differs from LLM-Adapters (AGI-Edgerunners/LLM-Adapters, ``commonsense_evaluate.py`` and
``evaluate.py``):

* BoolQ and ARC: it takes the first match of ``true|false`` or ``answer1|...|answer5``, case-sensitive and not
  word-bounded, so "True" is no answer and "untrue" is "true". Here the last match counts, case-insensitively and
  as a whole word: a model that restates the question ("true or false?") or reasons before its verdict gives the
  verdict last. On outputs in the training format ("the correct answer is true") both read the same.
* Math: it deletes every comma, then takes the last match of ``-?\\d+\\.?\\d*`` as a float, no match being
  wrong. Deleting every comma merges lists ("1,2,3" reads 123), and its minus is always a sign ("5-3" ends in
  -3); a fraction "3/4" reads as 4. The tolerance is the same.
"""
from __future__ import annotations

import decimal
import math
import re
import string
from collections import Counter

from ..errors import PlacementError

KINDS = ("boolean", "choice", "number", "text")

# Two numbers within this absolute distance are the same answer (LLM-Adapters' ``miss = 0.001``).
NUMBER_TOLERANCE = 1e-3

_BOOLEAN = re.compile(r"\b(true|false)\b", re.IGNORECASE)
_CHOICE = re.compile(r"\banswer ?(\d+)\b", re.IGNORECASE)
_CHOICE_GOLD = re.compile(r"answer ?(\d+)", re.IGNORECASE)
# An optional minus (ASCII or U+2212), an integer part with or without thousands separators, optional decimals,
# and an optional denominator without spaces. The lookaheads keep "1,2345" from reading as 1,234 then 5
# and "1/2.5" from reading as 1/2.
_NUMBER = re.compile(
    r"(?P<minus>[-\u2212])?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)"
    r"(?P<dec>\.\d+)?"
    r"(?:/(?P<den>0*[1-9]\d*)(?!\d|\.\d))?"
)
# What a minus directly follows when it joins two terms ("5-3", "x-3", "(a+b)-3").
_JOINED = re.compile(r"[\w)\]]$")
# What a minus follows, across spaces, when it subtracts ("5 - 3", "(2 + 3) - 1").
_SUBTRACTED = re.compile(r"[\d)\]]\s+$")
_PUNCTUATION = string.punctuation + string.whitespace


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PlacementError(f"unknown answer kind {kind!r}; use one of {', '.join(KINDS)}")


def _numbers(text: str) -> list[tuple[int, int, float]]:
    """Every number in ``text`` as (start, end, value), in order."""
    found = []
    for match in _NUMBER.finditer(text):
        start = match.start()
        negative = False
        if match.group("minus"):
            before = text[:start]
            if _JOINED.search(before) or _SUBTRACTED.search(before):
                start += 1
            else:
                negative = True
        value = float(match.group("int").replace(",", "") + (match.group("dec") or ""))
        if match.group("den"):
            value /= int(match.group("den"))
        if not math.isfinite(value):
            continue
        found.append((start, match.end(), -value if negative else value))
    return found


def _format_number(value: float) -> str:
    if value.is_integer() and abs(value) < 2.0 ** 53:
        return str(int(value))
    text = repr(value)
    if "e" in text:
        text = format(decimal.Decimal(text), "f")
    return text


def _parse_number(text: str) -> float | None:
    """The value of ``text`` when the whole of it (surrounding spaces aside) is one number."""
    stripped = text.strip()
    found = _numbers(stripped)
    if len(found) == 1 and found[0][0] == 0 and found[0][1] == len(stripped):
        return found[0][2]
    return None


def _normalise_text(text: str) -> str | None:
    normal = " ".join(text.split()).lower().strip(_PUNCTUATION)
    return normal or None


def answer_kind(answers: list[str]) -> str:
    """The kind of a task from its gold answers: all true/false -> boolean; all answerN -> choice; all parse as
    numbers -> number; else text."""
    answers = [answer.strip() for answer in answers]
    if not answers:
        raise PlacementError("no gold answers to tell the task's kind from; give at least one record")
    if all(answer.lower() in ("true", "false") for answer in answers):
        return "boolean"
    if all(_CHOICE_GOLD.fullmatch(answer) for answer in answers):
        return "choice"
    if all(_parse_number(answer) is not None for answer in answers):
        return "number"
    return "text"


def extract(output: str, kind: str) -> str | None:
    """The answer a generated output gives, normalised as the module docstring says; None when there is none."""
    _check_kind(kind)
    if kind == "boolean":
        found = _BOOLEAN.findall(output)
        return found[-1].lower() if found else None
    if kind == "choice":
        found = _CHOICE.findall(output)
        return f"answer{int(found[-1])}" if found else None
    if kind == "number":
        found = _numbers(output)
        return _format_number(found[-1][2]) if found else None
    return _normalise_text(output)


def _gold(answer: str, kind: str) -> str:
    """A gold answer in normal form; a gold answer that is not of its kind is a data error."""
    _check_kind(kind)
    if kind == "boolean":
        normal = answer.strip().lower()
        ok = normal in ("true", "false")
    elif kind == "choice":
        match = _CHOICE_GOLD.fullmatch(answer.strip())
        normal = f"answer{int(match.group(1))}" if match else None
        ok = match is not None
    elif kind == "number":
        value = _parse_number(answer)
        normal = None if value is None else _format_number(value)
        ok = value is not None
    else:
        normal = _normalise_text(answer)
        ok = normal is not None
    if not ok:
        raise PlacementError(f"gold answer {answer!r} is not a {kind} answer; check the data set's answer field")
    return normal


def _matches(predicted: str | None, gold: str, kind: str) -> bool:
    """Whether an extracted answer equals a normalised gold answer."""
    if predicted is None:
        return False
    if kind == "number":
        return abs(float(predicted) - float(gold)) <= NUMBER_TOLERANCE
    return predicted == gold


def is_correct(output: str, answer: str, kind: str) -> bool:
    """Whether ``output`` gives the gold ``answer``: numbers within NUMBER_TOLERANCE, others as normalised strings."""
    gold = _gold(answer, kind)
    return _matches(extract(output, kind), gold, kind)


def majority_answer(answers: list[str], kind: str) -> str:
    """The most common normalised answer (say, of a training set); ties go to the smallest, numerically for
    numbers and alphabetically otherwise."""
    if not answers:
        raise PlacementError("no answers to take the majority of; give at least one record")
    counts = Counter(_gold(answer, kind) for answer in answers)
    order = float if kind == "number" else str
    return min(counts, key=lambda normal: (-counts[normal], order(normal)))


def _pairs(outputs: list, answers: list[str]) -> None:
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} outputs for {len(answers)} gold answers")
    if not answers:
        raise PlacementError("no records to score; give at least one")


def balanced_accuracy(predictions: list[str | None], golds: list[str], kind: str) -> float:
    """The mean over gold classes of the fraction of each class answered correctly; None counts as wrong.

    A predictor that always gives the same answer scores at most 1 / (number of classes), whatever their sizes.
    Predictions may be extracted answers or raw outputs: they are read with ``extract`` either way.
    """
    _pairs(predictions, golds)
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for predicted, answer in zip(predictions, golds):
        gold = _gold(answer, kind)
        totals[gold] += 1
        if predicted is not None and _matches(extract(predicted, kind), gold, kind):
            hits[gold] += 1
    return sum(hits[gold] / totals[gold] for gold in totals) / len(totals)


def exact_match(outputs: list[str], answers: list[str], kind: str) -> float:
    """The fraction of outputs that give their gold answer."""
    _pairs(outputs, answers)
    return sum(is_correct(output, answer, kind) for output, answer in zip(outputs, answers)) / len(answers)
