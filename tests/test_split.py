"""actors.outbound.split: long replies become WhatsApp-sized parts at natural boundaries."""

from __future__ import annotations

import random

import pytest

from actors.outbound.split import split_text


def _words(text: str) -> list[str]:
    return text.split()


def test_short_text_is_returned_unchanged() -> None:
    text = "  Hola!\n\n¿En qué te ayudo?  "
    assert split_text(text, 4000) == [text]
    exact = "x" * 4000
    assert split_text(exact, 4000) == [exact]


def test_nine_thousand_characters_split_at_paragraphs() -> None:
    paragraphs = [(f"Párrafo {i:02d}: " + "palabra " * 70)[:497] + "." for i in range(18)]
    paragraphs[-1] += "!!"
    text = "\n\n".join(paragraphs)
    assert len(text) == 9000
    parts = split_text(text, 4000)
    assert len(parts) == 3
    assert all(0 < len(p) <= 4000 for p in parts)
    # every cut is at a paragraph boundary: each part is a run of whole paragraphs, in order
    rebuilt = [para for part in parts for para in part.split("\n\n")]
    assert rebuilt == paragraphs
    assert _words(" ".join(parts)) == _words(text)


def test_falls_back_to_lines_then_sentences_then_spaces() -> None:
    lines = "\n".join(f"línea {i} " + "x" * 40 for i in range(10))
    parts = split_text(lines, 120)
    assert all(len(p) <= 120 for p in parts)
    assert all(not p.startswith("\n") and not p.endswith("\n") for p in parts)
    assert [line for p in parts for line in p.split("\n")] == lines.split("\n")

    sentences = " ".join(f"Frase número {i} termina aquí." for i in range(20))
    parts = split_text(sentences, 100)
    assert all(len(p) <= 100 for p in parts)
    assert all(p.endswith(".") for p in parts)
    assert _words(" ".join(parts)) == _words(sentences)

    spaces = " ".join(["palabra"] * 100)
    parts = split_text(spaces, 50)
    assert all(len(p) <= 50 for p in parts)
    assert all(set(p.split()) == {"palabra"} for p in parts)
    assert _words(" ".join(parts)) == _words(spaces)


def test_hard_cut_when_there_is_no_boundary() -> None:
    text = "a" * 250
    parts = split_text(text, 100)
    assert [len(p) for p in parts] == [100, 100, 50]
    assert "".join(parts) == text


def test_hard_cut_does_not_split_a_combining_mark_or_zwj_sequence() -> None:
    text = "e\u0301" * 80  # "é" written as e + combining acute accent
    parts = split_text(text, 101)
    assert "".join(parts) == text
    assert all(not p[0] == "\u0301" for p in parts)
    family = "👨\u200d👩\u200d👧" * 40
    parts = split_text(family, 50)
    assert "".join(parts) == family
    assert all(not p.startswith("\u200d") and not p.endswith("\u200d") for p in parts)


def test_random_texts_keep_every_word_and_respect_the_limit() -> None:
    rng = random.Random(7)
    vocabulary = ["hola", "¿cómo", "estás?", "bien.", "cita", "mañana!", "\n", "\n\n", "precio", "x" * 30]
    for _ in range(200):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 400)))
        limit = rng.randint(40, 300)
        parts = split_text(text, limit)
        assert all(0 < len(p) <= limit for p in parts) or parts == [text]
        assert _words(" ".join(parts)) == _words(text)


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        split_text("abc", 0)
