"""The generic-message rule (docs/behaviour.md §3.6): what gets no reply after the booking link."""

import pytest

from actors.generic import is_generic_message, normalise

GENERIC = [
    "hola", "Hola", "HOLA", "Hola!!", "hola 👋", "holaaa", "hello", "Hi", "hi!", "buenas", "Buenos días",
    "buenos dias", "Buenas tardes", "buenas noches!", "gracias", "Gracias 🙏", "muchas gracias",
    "¡Muchas gracias!", "thanks", "Thank you", "thank you!!", "ok", "OK.", "okay", "ok gracias",
    "Ok, gracias!", "dale", "Dale 👍", "perfecto", "Perfecto!", "excelente", "genial", "listo",
    "entendido", "chau", "adiós", "Adios", "bye", "hasta luego", "gracias, chau", "👍 ok",
]
NOT_GENERIC = [
    "¿puedo cambiar la fecha?", "puedo cambiar la fecha", "hola?", "ok?", "gracias, ¿cuánto cuesta?",
    "¿Cuánto cuesta?", "quiero reservar otra cita", "hola, necesito ayuda", "Hola quisiera información",
    "thanks, what are your hours", "ok pero tengo otra pregunta", "cuál es la dirección", "precio",
    "necesito factura", "hello can you help me", "gracias por todo, una consulta más", "", "   ", "🙏",
    "no", "si quiero", "hola hola hola hola hola hola", "graciosa", "okapi",
]


@pytest.mark.parametrize("text", GENERIC)
def test_generic(text: str) -> None:
    assert is_generic_message(text), text


@pytest.mark.parametrize("text", NOT_GENERIC)
def test_not_generic(text: str) -> None:
    assert not is_generic_message(text), text


def test_table_is_large_enough() -> None:
    assert len(GENERIC) + len(NOT_GENERIC) >= 40


def test_normalise_strips_accents_emoji_and_punctuation() -> None:
    assert normalise("¡Adiós, Muchas GRACIAS! 🙏🙏") == "adios muchas gracias"


def test_long_texts_are_never_generic_and_not_normalised() -> None:
    """A 65,536-character message is answered (never generic) without being normalised at all."""
    from actors import generic

    assert not is_generic_message("gracias " * 8000)
    assert not is_generic_message("ok" + " " * (generic.MAX_SCANNED_CHARS - 1))
    assert is_generic_message("ok" + " " * (generic.MAX_SCANNED_CHARS - 3))
