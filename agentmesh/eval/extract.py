"""Answer extraction from generated text, and grading against an item's gold answer.

Letters follow the published evaluation: an "answer is X" pattern first, then a lone letter. Numbers: an
"answer is N" pattern first, then the last number in the text. Short answers: the normalized gold
span must occur, as whole words, in the normalized text.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from agentmesh.tasks.datasets import LETTERS, Item

# Markers a model wraps an answer in: markdown bold/italics, parentheses, brackets, quotes.
_OPEN = r"[\*_\(\[\{\"'`]*"
_CLOSE = r"[\*_\)\]\}\"'`]*"
_ANSWER_LETTER = re.compile(
    r"\banswer\s*(?:is|:|=)?\s*[:\-=]?\s*(?:option|choice)?\s*"
    rf"(?P<open>{_OPEN})\s*(?P<letter>[A-Za-z])(?P<close>{_CLOSE})(?=$|[\s.,;:!?\-])",
    re.IGNORECASE)
_LONE_LETTER = re.compile(
    rf"(?<![A-Za-z0-9])(?P<open>{_OPEN})(?P<letter>[A-Za-z])(?P<close>{_CLOSE})(?![A-Za-z0-9])")
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_ANSWER_NUMBER = re.compile(
    rf"\banswer\s*(?:is|:|=)?\s*(?:[:=]|-(?!\d))?\s*[\*_\$\\(\[\s]*(?P<num>{_NUMBER})", re.IGNORECASE)
_ANY_NUMBER = re.compile(rf"(?<![\d.])(?:{_NUMBER})")
_ARTICLES = {"a", "an", "the"}


def _follows_word(text: str, end: int) -> bool:
    """Whether a word starts right after `end` (past spaces): "a cat", not "a." or "A\\n"."""
    rest = text[end:]
    stripped = rest.lstrip(" \t")
    return len(stripped) < len(rest) and bool(stripped) and stripped[0].isalpha()


# "A/B/C/D", "B/D": the format of the prompt echoed back, or a hedge; neither is an answer.
_SLASH_NEXT = re.compile(r"/[A-Za-z](?![A-Za-z0-9])")
_SLASH_PREV = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]/$")


def _letter_ok(m: re.Match[str], text: str, letters: str) -> str | None:
    letter = m.group("letter")
    if letter.upper() not in letters:
        return None
    start, end = m.start("letter"), m.end("letter")
    if _SLASH_NEXT.match(text, end) or _SLASH_PREV.search(text[:start]):
        return None
    wrapped = bool(m.group("open").strip()) and bool(m.group("close"))
    # "a"/"A" followed by a word is an article ("a cat", "A cat is ..."), not an answer.
    if not wrapped and letter in "aA" and _follows_word(text, m.end("close")):
        return None
    return letter.upper()


def extract_letter(text: str, num_choices: int = 4) -> str | None:
    """The answer letter in `text` (among the first `num_choices` letters), or None."""
    letters = LETTERS[:max(1, min(num_choices, len(LETTERS)))]
    for m in _ANSWER_LETTER.finditer(text):
        found = _letter_ok(m, text, letters)
        if found:
            return found
    for m in _LONE_LETTER.finditer(text):
        letter = m.group("letter")
        wrapped = bool(m.group("open").strip()) and bool(m.group("close"))
        # A lone lowercase letter is a word ("a", "i") unless it is wrapped, e.g. "(d)" or "**c**".
        if letter.islower() and not wrapped and text.strip(" \t\n.*()[]`'\"") != letter:
            continue
        found = _letter_ok(m, text, letters)
        if found:
            return found
    return None


def normalize_number(text: str) -> str | None:
    """A number string without thousands separators or trailing zeros ("1,200.50" -> "1200.5")."""
    try:
        value = Decimal(text.replace(",", "").replace("\u2212", "-").strip())
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str) -> str | None:
    """The final numeric answer in `text`: after "answer is", else the last number; normalized."""
    text = text.replace("\u2212", "-")
    m = _ANSWER_NUMBER.search(text)
    if m:
        return normalize_number(m.group("num"))
    found = _ANY_NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def normalize_text(text: str) -> str:
    """Lowercase words without accents, punctuation or articles, single-spaced."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    words = re.sub(r"[^0-9a-z]+", " ", text).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def contains_answer(text: str, answer: str) -> bool:
    """Whether the normalized `answer` occurs as whole words in the normalized `text`."""
    gold = normalize_text(answer)
    return bool(gold) and f" {gold} " in f" {normalize_text(text)} "


def first_line(text: str, limit: int = 100) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


@dataclass(frozen=True)
class Grade:
    prediction: str | None  # the extracted answer (None: nothing could be extracted)
    correct: bool


def grade(item: Item, text: str) -> Grade:
    """Extract the answer from `text` the way `item`'s kind needs, and compare with the gold one."""
    if item.kind == "mc":
        letter = extract_letter(text, len(item.choices or ()))
        return Grade(letter, letter == item.answer)
    if item.kind == "numeric":
        number = extract_number(text)
        return Grade(number, number is not None and number == normalize_number(item.answer))
    line = first_line(text)
    return Grade(line or None, contains_answer(text, item.answer))
