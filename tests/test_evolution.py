"""Parsing Evolution API messages.upsert webhooks (docs/behaviour.md §2.2)."""

import pytest

from actors.evolution import Ignored, WebhookError, parse_webhook
from actors.inbound import InboundMessage
from tests.payloads import upsert


def parsed(payload, **kw) -> InboundMessage:  # type: ignore[no-untyped-def]
    result = parse_webhook(payload, **kw)
    assert isinstance(result, InboundMessage), result
    return result


def test_v2_conversation_text_and_fields() -> None:
    msg = parsed(upsert("Hola, necesito ayuda", message_id="3EB0A0C1D2E3F4", timestamp=1769000001))
    assert msg.jid == "5491131376731@s.whatsapp.net"
    assert msg.text == "Hola, necesito ayuda"
    assert msg.message_id == "3EB0A0C1D2E3F4"
    assert msg.instance == "prueba-py-agent"
    assert msg.instance_id == "b6b7c0de-0000-4000-8000-000000000001"
    assert msg.instances == ("b6b7c0de-0000-4000-8000-000000000001", "prueba-py-agent")
    assert msg.push_name == "Juan"
    assert msg.timestamp == 1769000001
    assert not msg.from_me


@pytest.mark.parametrize(
    ("message", "text"),
    [
        ({"extendedTextMessage": {"text": "v1 text"}}, "v1 text"),
        ({"imageMessage": {"caption": "mira esto"}}, "mira esto"),
        ({"videoMessage": {"caption": "video"}}, "video"),
        ({"documentMessage": {"caption": "factura"}}, "factura"),
        ({"buttonsResponseMessage": {"selectedDisplayText": "Sí, agendar"}}, "Sí, agendar"),
        ({"buttonsResponseMessage": {"selectedButtonId": "btn_1"}}, "btn_1"),
        ({"listResponseMessage": {"title": "Opción 2"}}, "Opción 2"),
        ({"listResponseMessage": {"singleSelectReply": {"selectedRowId": "row-3"}}}, "row-3"),
        ({"templateButtonReplyMessage": {"selectedDisplayText": "Ver precios"}}, "Ver precios"),
        ({"templateButtonReplyMessage": {"selectedId": "tpl-9"}}, "tpl-9"),
        ({"audioMessage": {"seconds": 3}, "speechToText": "[audio] quiero una cita"}, "[audio] quiero una cita"),
    ],
)
def test_text_sources(message, text) -> None:  # type: ignore[no-untyped-def]
    assert parsed(upsert(None, message=message)).text == text


def test_media_without_text_is_media_kind() -> None:
    assert parsed(upsert(None, message={"audioMessage": {"seconds": 3}})).kind == "media"
    assert parsed(upsert(None, message={"stickerMessage": {}})).kind == "media"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (upsert(jid="120363025246125486@g.us", participant="5491100000001@s.whatsapp.net"), "group"),
        (upsert(jid="status@broadcast"), "broadcast"),
        (upsert(jid="120363111111111111@newsletter"), "newsletter"),
        ({**upsert(), "event": "connection.update"}, "event connection.update"),
        (upsert(None, message={"reactionMessage": {"text": "👍"}}), "no text (reaction, edit or protocol message)"),
        (upsert(None, message={"protocolMessage": {"type": 0}}), "no text (reaction, edit or protocol message)"),
    ],
)
def test_ignored(payload, reason) -> None:  # type: ignore[no-untyped-def]
    result = parse_webhook(payload)
    assert isinstance(result, Ignored)
    assert result.reason == reason


def test_device_suffix_stripped_and_lid_kept() -> None:
    assert parsed(upsert(jid="5491131376731:12@s.whatsapp.net")).jid == "5491131376731@s.whatsapp.net"
    lid = parsed(upsert(jid="123456789012345@lid", remoteJidAlt="5491131376731@s.whatsapp.net", addressingMode="lid"))
    assert lid.jid == "123456789012345@lid"
    assert lid.alt_jid == "5491131376731@s.whatsapp.net"


def test_groups_when_enabled() -> None:
    msg = parsed(upsert(jid="120363025246125486@g.us", participant="5491100000001@s.whatsapp.net"), groups_enabled=True)
    assert msg.jid == "120363025246125486@g.us"


def test_event_upper_case_name_accepted() -> None:
    assert parsed({**upsert("x"), "event": "MESSAGES_UPSERT"}).text == "x"


def test_quoted_context() -> None:
    payload = upsert(None, message={"extendedTextMessage": {
        "text": "¿y esto?", "contextInfo": {"quotedMessage": {"conversation": "Precio: 100"}}}})
    msg = parsed(payload)
    assert msg.text == "¿y esto?"
    assert msg.quoted_text == "Precio: 100"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p["data"]["key"].update(remoteJid="hello"),
        lambda p: p["data"]["key"].update(remoteJid="12@s.whatsapp.net"),
        lambda p: p["data"]["key"].update(remoteJid="../../etc/passwd@s.whatsapp.net"),
        lambda p: p["data"]["key"].update(remoteJid="549 1131@s.whatsapp.net"),
        lambda p: p["data"]["key"].update(remoteJid="5" * 200 + "@s.whatsapp.net"),
        lambda p: p["data"]["key"].update(remoteJid=12345),
        lambda p: p["data"]["key"].pop("remoteJid"),
        lambda p: p["data"]["key"].pop("id"),
        lambda p: p["data"]["key"].update(fromMe="no"),
        lambda p: p["data"].pop("key"),
        lambda p: p.pop("data"),
        lambda p: p.pop("event"),
        lambda p: p.update(data=[1, 2]),
        lambda p: p["data"].update(messageTimestamp="ayer"),
        lambda p: p["data"]["key"].update(id=""),
    ],
)
def test_malformed(mutate) -> None:  # type: ignore[no-untyped-def]
    payload = upsert()
    mutate(payload)
    with pytest.raises(WebhookError):
        parse_webhook(payload)
