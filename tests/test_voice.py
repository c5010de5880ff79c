"""Voice notes (TRANSCRIBE_PROVIDER): fetched like an image, transcribed through the provider's SDK
against the fakes, answered as the text ``[audio] <transcript>``."""

from __future__ import annotations

import json

from actors.llm.transcribe import audio_file_name
from tests.conftest import make_settings, running_service, wait_for
from tests.fakes.evolution import FakeEvolution, StoredMedia
from tests.fakes.llm import GeminiFake, OpenAIFake, Reply, upload_name
from tests.fakes.server import running_server
from tests.payloads import audio_upsert
from tests.test_media import INSTANCE, JID, sent_texts, window

OGG = b"OggS\x00\x02" + b"\x00" * 200   # the start of an Ogg/Opus voice note
VOICE = "audio/ogg; codecs=opus"


def test_the_upload_is_named_after_the_mimetype() -> None:
    assert audio_file_name("audio/ogg; codecs=opus") == "audio.ogg"
    assert audio_file_name("audio/mpeg") == "audio.mp3"
    assert audio_file_name("audio/mp4") == "audio.m4a"


async def test_a_voice_note_is_transcribed_by_openai_and_answered(tmp_path) -> None:
    llm, evo = OpenAIFake(), FakeEvolution(api_key="k")
    llm.transcript = "Hola, ¿cuánto cuesta la limpieza?"
    async with running_server(llm) as llm_url, running_server(evo) as evo_url:
        settings = make_settings(tmp_path, LLM_PROVIDER="openai", OPENAI_API_KEY="sk-voice", OPENAI_BASE_URL=llm_url,
                                 TRANSCRIBE_PROVIDER="openai", EVOLUTION_API_URL=evo_url, EVOLUTION_API_KEY="k")
        async with running_service(settings) as service:
            llm.default = Reply("La limpieza cuesta 30 €.")   # the transcription answers its transcript
            payload = audio_upsert(mimetype=VOICE, instance=INSTANCE)
            evo.media[payload["data"]["key"]["id"]] = StoredMedia(VOICE, OGG, media_type="audioMessage")
            await service.intake(payload)
            await wait_for(lambda: sent_texts(evo) == ["La limpieza cuesta 30 €."])
            stored = await window(service)
    transcription, chat = llm.requests
    assert transcription.path == "/audio/transcriptions"
    assert upload_name(transcription) == "audio.ogg"
    assert b'name="model"\r\n\r\ngpt-4o-mini-transcribe' in transcription.body and OGG in transcription.body
    assert chat.json["messages"][-1] == {"role": "user", "content": "[audio] Hola, ¿cuánto cuesta la limpieza?"}
    assert stored[0][:2] == ["user", "[audio] Hola, ¿cuánto cuesta la limpieza?"]


async def test_a_voice_note_is_transcribed_by_gemini_from_the_webhooks_base64(tmp_path) -> None:
    llm = GeminiFake()
    async with running_server(llm) as llm_url:
        settings = make_settings(tmp_path, LLM_PROVIDER="gemini", GEMINI_API_KEY="g-voice", GEMINI_BASE_URL=llm_url,
                                 TRANSCRIBE_PROVIDER="gemini")
        async with running_service(settings) as service:
            llm.script(Reply("Quiero una cita el lunes"), Reply("Claro, te paso el enlace."))
            await service.intake(audio_upsert(mimetype=VOICE, inline=OGG))
            assert service.outbound is not None
            await wait_for(lambda: len(service.outbound.outbox_entries(jid=JID)) == 1)
    transcription, chat = llm.requests
    parts = transcription.json["contents"][0]["parts"]
    assert parts[0]["text"].startswith("Transcribe literalmente")
    inline = parts[1]["inlineData"]
    assert inline.get("mimeType", inline.get("mime_type")) == "audio/ogg"
    assert "[audio] Quiero una cita el lunes" in json.dumps(chat.json["contents"][-1], ensure_ascii=False)


async def test_off_keeps_todays_reply(tmp_path) -> None:
    settings = make_settings(tmp_path)
    async with running_service(settings) as service:
        await service.intake(audio_upsert(mimetype=VOICE, inline=OGG))
        assert service.outbound is not None
        await wait_for(lambda: len(service.outbound.outbox_entries(jid=JID)) == 1)
        assert service.outbound.outbox_entries(jid=JID)[0].text == service.texts.unknown_message
