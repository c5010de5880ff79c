"""Customer-facing texts and the system prompt, Spanish by default (``LANGUAGE=en`` for English).

AGENT_INSTRUCTION can be replaced wholesale with the AGENT_INSTRUCTION setting.
"""

from __future__ import annotations

import attrs

AGENT_INSTRUCTION_ES = """Eres el asistente virtual de WhatsApp de un negocio. Responde en el idioma del cliente, \
de forma breve, amable y útil (mensajes cortos, aptos para WhatsApp).

Reservas y citas:
- Cuando el cliente quiera agendar, reservar, pedir un turno o una cita, responde ÚNICAMENTE con este JSON, \
sin ningún otro texto: {"accion": "reserva", "motivo": "<motivo opcional>"}
- NUNCA preguntes fecha, hora ni duración: el cliente las elige en la página de reservas.
- "motivo" es opcional: un resumen breve de lo que el cliente necesita, si lo dijo.

Si no sabes algo del negocio, dilo con honestidad y ofrece agendar una cita."""

AGENT_INSTRUCTION_EN = """You are a business's WhatsApp virtual assistant. Answer in the customer's language, \
briefly, kindly and helpfully (short messages suited to WhatsApp).

Bookings and appointments:
- When the customer wants to book, schedule or make an appointment, answer ONLY with this JSON and no other text: \
{"accion": "reserva", "motivo": "<optional reason>"}
- NEVER ask for a date, time or duration: the customer picks them on the booking page.
- "motivo" is optional: a short summary of what the customer needs, if they said it.

If you do not know something about the business, say so honestly and offer to book an appointment."""


@attrs.frozen
class Texts:
    """Every text the service sends to a customer, in one language."""

    agent_instruction: str
    booking_message: str          # {url}
    booking_unavailable: str
    polite_error: str
    flood_notice: str
    unknown_message: str
    reset_done: str
    media_failed: str             # an image we could not fetch, with no caption to answer instead
    image_label: str              # the window's placeholder of an image: "<label> <caption>"
    audio_label: str              # a transcribed voice note in the window: "<label> <transcript>"
    summary_heading: str          # before the running summary, in the summary's system message
    summary_instruction: str      # the system prompt of the summary call
    transcribe_instruction: str   # TRANSCRIBE_PROVIDER=gemini: what the model is asked to do with the audio


SPANISH = Texts(
    agent_instruction=AGENT_INSTRUCTION_ES,
    booking_message=(
        "📅 *Agenda tu cita aquí*\n\n"
        "Para reservar tu cita, haz clic en el siguiente enlace:\n"
        "{url}\n\n"
        "✅ Podrás ver los horarios disponibles\n"
        "✅ Elegir la fecha y hora que prefieras\n"
        "✅ Confirmar tu reserva al instante\n\n"
        "¿Necesitas ayuda con algo más?"
    ),
    booking_unavailable=(
        "Por el momento no podemos tomar reservas por este medio. "
        "Un miembro del equipo se pondrá en contacto contigo. ¿Necesitas ayuda con algo más?"
    ),
    polite_error="Gracias por contactarnos. En este momento estamos experimentando dificultades técnicas...",
    flood_notice="Estás enviando muchos mensajes seguidos. Te responderé en un momento 🙏",
    unknown_message="Por ahora solo puedo leer mensajes de texto. ¿Podrías escribirme tu consulta?",
    reset_done="Listo, empezamos de nuevo. ¿En qué puedo ayudarte?",
    media_failed="No pude abrir la imagen que enviaste. ¿Podrías contarme en un mensaje qué necesitas?",
    image_label="[imagen]",
    audio_label="[audio]",
    summary_heading="Resumen de la conversación anterior con este cliente:",
    summary_instruction=(
        "Resumes conversaciones de WhatsApp entre un negocio y un cliente para que el asistente las recuerde. "
        "Recibes el resumen anterior (puede estar vacío) y los mensajes más antiguos que salen de la memoria. "
        "Escribe un único resumen nuevo que conserve del resumen anterior y agregue de los mensajes los hechos "
        "duraderos: nombre del cliente y datos de contacto, qué pidió o compró, citas y reservas, preferencias, "
        "problemas abiertos y promesas hechas por el negocio. Omite saludos y charla trivial. Escribe en tercera "
        "persona, en frases breves, como máximo 1200 caracteres, sin ningún otro texto."
    ),
    transcribe_instruction="Transcribe literalmente esta nota de voz. Responde solo con el texto transcrito.",
)

ENGLISH = Texts(
    agent_instruction=AGENT_INSTRUCTION_EN,
    booking_message=(
        "📅 *Book your appointment here*\n\n"
        "To book your appointment, open this link:\n"
        "{url}\n\n"
        "✅ See the available times\n"
        "✅ Pick the date and time you prefer\n"
        "✅ Confirm your booking instantly\n\n"
        "Can I help you with anything else?"
    ),
    booking_unavailable=(
        "We cannot take bookings here at the moment. A member of the team will contact you. "
        "Can I help you with anything else?"
    ),
    polite_error="Thank you for contacting us. We are experiencing technical difficulties right now...",
    flood_notice="You are sending many messages in a row. I will answer you in a moment 🙏",
    unknown_message="For now I can only read text messages. Could you type your question?",
    reset_done="Done, let's start over. How can I help you?",
    media_failed="I could not open the image you sent. Could you tell me in a message what you need?",
    image_label="[image]",
    audio_label="[audio]",
    summary_heading="Summary of the earlier conversation with this customer:",
    summary_instruction=(
        "You summarise WhatsApp conversations between a business and a customer so the assistant remembers them. "
        "You get the previous summary (maybe empty) and the oldest messages leaving the memory. Write one new "
        "summary that carries forward from the previous summary, and adds from the messages, the durable facts: "
        "the customer's name and contact details, what they asked for or bought, appointments and bookings, "
        "preferences, open problems and promises the business made. Drop greetings and small talk. Write in the "
        "third person, in short sentences, at most 1200 characters, and nothing else."
    ),
    transcribe_instruction="Transcribe this voice note verbatim. Answer with the transcribed text only.",
)


def texts_for(language: str, agent_instruction: str = "") -> Texts:
    """The built-in texts for ``language`` ("es" or "en"), with an optional system prompt override."""
    texts = ENGLISH if language == "en" else SPANISH
    if agent_instruction.strip():
        texts = attrs.evolve(texts, agent_instruction=agent_instruction.strip())
    return texts
