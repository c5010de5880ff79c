"""LOG_CUSTOMER_TEXT's truncated mode: what of a customer's text a log line may show."""

from __future__ import annotations

from actors.privacy import TRUNCATED_CHARS, log_text


def test_phone_numbers_show_only_their_last_four_digits() -> None:
    assert log_text("llamame al +54 9 11 3137-6731", "truncated") == "llamame al +** * ** ****-6731"


def test_a_number_crossing_the_cut_shows_none_of_its_digits() -> None:
    for offset in range(TRUNCATED_CHARS - 12, TRUNCATED_CHARS + 1):
        shown = log_text("x" * offset + "5491131376731999" + " y" * 100, "truncated")
        assert len(shown) == TRUNCATED_CHARS + 1 and not any(c.isdigit() for c in shown), shown


def test_long_texts_are_cut_and_full_and_off_modes() -> None:
    text = "hola " * 20_000
    assert log_text(text, "truncated") == text[:TRUNCATED_CHARS] + "…"
    assert log_text(text, "full") == text
    assert log_text(text, "off") == f"[{len(text)} characters withheld]"
