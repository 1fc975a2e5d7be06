"""GSM8K-style final-answer extraction and exact match on tricky strings."""

from __future__ import annotations

import pytest

from fedlora.tasks.answers import exact_match, extract_number, normalize_number

CASES = [
    ("The answer is 42.", "42"),  # a closing period is no decimal point
    ("She pays $1,234.", "1234"),  # dollar sign and thousands separator
    ("Total: $ 12.00.", "12"),  # a decimal that equals an integer
    ("It costs 2.50 dollars", "2.5"),
    ("The temperature drops to -5 degrees", "-5"),
    ("It drops by \u22123", "-3"),  # a Unicode minus
    ("so 10-5=5", "5"),
    ("the difference is 10-5", "5"),  # a subtraction, not the number -5
    ("(-7)", "-7"),
    ("-0.0", "0"),
    ("1,000,000 people came", "1000000"),
    ("we count 3, 4, 5.", "5"),  # a list is not a thousands group
    ("half is .5 of it", "0.5"),
    ("version 1.2.3", "1.2"),
    ("It is 50%.", "50"),
    ("First 3 + 4 = 7\nThen 7 * 2 = 14\n#### 14", "14"),  # GSM8K's reference format
    ("#### 1,234 and then 5 more words", "1234"),  # the number right after the last marker
    ("#### 3\nlater: #### 8", "8"),
    ("So we get \\boxed{42} and 7 other things", "42"),  # MATH style: the boxed value wins
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{\\dfrac{6}{3}}", "2"),
    ("\\boxed{x = 12}", "12"),
    ("no number here", None),
    ("", None),
]


@pytest.mark.parametrize("text,want", CASES)
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_normalize_number():
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number("007") == "7"
    assert normalize_number("1e3") == "1000"
    assert normalize_number("abc") is None
    assert normalize_number("inf") is None


def test_exact_match_numbers_and_text():
    assert exact_match("... so she has $18.00 left.", "18")
    assert exact_match("The answer is 18", "Janet sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars #### 18")
    assert not exact_match("The answer is 19", "18")
    assert not exact_match("I don't know", "18")
    assert exact_match("  Paris. ", "paris")  # text answers: case, spaces and a closing period ignored
    assert not exact_match("Paris, France", "Paris")
    assert exact_match("3", "3.0", numeric=True) and not exact_match("3", "3.0", numeric=False)
