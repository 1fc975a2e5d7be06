"""Final-answer extraction and exact-match scoring for generated text, as GSM8K scoring does it.

GSM8K's reference solutions end in ``#### <answer>``; models answer in free text, sometimes with
``\\boxed{...}`` (MATH style), dollar signs, thousands separators and a closing period. The answer
of a text is:

1. the first number after the last ``####`` marker, if there is one;
2. else the last number inside the last ``\\boxed{...}`` (the value of a ``\\frac{a}{b}`` there),
   if there is one;
3. else the last number anywhere in the text.

Numbers are normalised so that equal values compare equal: commas between digit groups and ``$``
are dropped, a Unicode minus becomes ``-``, a decimal that equals an integer becomes that integer
(``12.0`` → ``12``, ``2.50`` → ``2.5``, ``-0`` → ``0``). A ``-`` only makes a number negative when it
is not a subtraction sign (``10-5`` is the number 5 after 10, not -5).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# a number: optional sign (not right after a word character or a dot, so "10-5" is no negative),
# optional "$", then (not glued to a preceding digit or dot: "1.2.3" holds no ".3") grouped thousands ("1,234,567.5"), plain digits ("1234.5") or a bare decimal (".5")
_NUMBER = re.compile(r"(?:(?<![\w.])-\s?)?\$?\s?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_MARKER = "####"
_FRAC = re.compile(r"\\d?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")


def normalize_number(text: str) -> str | None:
    """The canonical form of one number string (``"$1,234.50"`` → ``"1234.5"``); None if not a number."""
    cleaned = text.replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _boxed_contents(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (nested braces respected), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return text[i:]  # unclosed: take the rest


def _numbers(text: str) -> list[str]:
    found = []
    for m in _NUMBER.finditer(text.replace("\u2212", "-")):
        n = normalize_number(m.group(0))
        if n is not None:
            found.append(n)
    return found


def extract_number(text: str) -> str | None:
    """The final numeric answer of ``text`` in canonical form (see the module docstring), or None."""
    if _MARKER in text:
        after = _numbers(text.rsplit(_MARKER, 1)[1])
        if after:
            return after[0]
    boxed = _boxed_contents(text)
    if boxed is not None:
        frac = _FRAC.fullmatch(boxed.strip())
        if frac:  # \boxed{\frac{3}{4}}: the value, not the denominator
            num, den = (normalize_number(g) for g in frac.groups())
            if num is not None and den is not None and Decimal(den) != 0:
                return normalize_number(str(Decimal(num) / Decimal(den)))
        inside = _numbers(boxed)
        if inside:
            return inside[-1]
    found = _numbers(text)
    return found[-1] if found else None


def normalize_text(text: str) -> str:
    """Text answers compare case- and whitespace-insensitively, without a closing period."""
    return " ".join(text.strip().lower().split()).rstrip(".")


def exact_match(prediction: str, reference: str, numeric: bool | None = None) -> bool:
    """Whether a generated ``prediction`` gives the ``reference`` answer.

    ``numeric`` (default: whether the reference holds a number) compares the extracted numbers;
    otherwise the normalised texts are compared.
    """
    if numeric is None:
        numeric = extract_number(reference) is not None
    if numeric:
        want = extract_number(reference)
        return want is not None and extract_number(prediction) == want
    return normalize_text(prediction) == normalize_text(reference)
