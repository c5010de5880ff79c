"""The pieces the HTTP surface delegates to: the webhook body guard, the console's sessions, and the
frozen conversation views and actor pages that ``Service`` hands out for the admin endpoints."""

from __future__ import annotations

import json

import attrs
import pytest

from actors.admin_sessions import SESSIONS_KEPT, Sessions
from actors.conversation_view import ConversationView
from actors.lifecycle import Lifecycle, configured_or_exit
from actors.payload_guard import MAX_JSON_DEPTH, BadPayload, decode_payload, map_strings
from actors.settings import ConfigError, Settings
from actors.state import ASSISTANT, OPERATOR, USER, ConversationState, LeadInfo, WindowEntry
from tests.conftest import key_of, make_settings, running_service, wait_for
from tests.doubles import ScriptedProvider
from tests.payloads import upsert

JID = "5491131376731@s.whatsapp.net"


# -- payload guard ------------------------------------------------------------------------------

def test_decode_payload_reads_utf8_json_with_or_without_a_bom() -> None:
    body = {"event": "messages.upsert", "text": "¿Qué tal? ✓"}
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert decode_payload(raw) == body
    assert decode_payload(b"\xef\xbb\xbf" + raw) == body


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\xff\xfe{}", "body is not valid UTF-8"),
    (b"{not json", "body is not valid JSON"),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), f"JSON nested deeper than {MAX_JSON_DEPTH} levels"),
])
def test_decode_payload_refuses_with_one_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(BadPayload, match=reason):
        decode_payload(raw)


def test_decode_payload_accepts_the_deepest_allowed_nesting() -> None:
    raw = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    value = decode_payload(raw)
    for _ in range(MAX_JSON_DEPTH - 1):
        value = value[0]
    assert value == []


def test_decode_payload_replaces_unpaired_surrogates_in_keys_and_values() -> None:
    value = decode_payload(b'{"k\\ud800": ["a\\udfffb", {"x": "\\ud83d\\ude00"}]}')
    assert value == {"k\ufffd": ["a\ufffdb", {"x": "\U0001f600"}]}   # a valid pair stays one character
    json.dumps(value, ensure_ascii=False).encode("utf-8")   # encodable now


def test_map_strings_changes_every_string_and_nothing_else() -> None:
    value = {"a": ["x", 1, None, {"b": "y"}], "n": 2.5}
    assert map_strings(value, str.upper) == {"A": ["X", 1, None, {"B": "Y"}], "N": 2.5}


# -- the console's sessions ------------------------------------------------------------------------

def test_sessions_expire_after_their_ttl_and_end_on_logout() -> None:
    now = [1000.0]
    sessions = Sessions(60, clock=lambda: now[0])
    session = sessions.create()
    assert sessions.find(session.id) is session and session.expires_at == 1060.0
    assert sessions.find("") is None and sessions.find("other") is None
    now[0] = 1059.9
    assert sessions.find(session.id) is session
    now[0] = 1060.0
    assert sessions.find(session.id) is None
    again = sessions.create()
    sessions.end(again)
    assert sessions.find(again.id) is None


def test_sessions_keep_the_newest_logins_only() -> None:
    sessions = Sessions(3600)
    first = sessions.create()
    made = [sessions.create() for _ in range(SESSIONS_KEPT)]
    assert sessions.find(first.id) is None
    assert all(sessions.find(s.id) is s for s in made)


def test_a_session_checks_its_own_csrf_token() -> None:
    sessions = Sessions(60)
    one, two = sessions.create(), sessions.create()
    assert one.id != two.id and one.csrf != two.csrf
    assert one.csrf_matches(one.csrf)
    assert not one.csrf_matches(two.csrf) and not one.csrf_matches("")


# -- conversation views ----------------------------------------------------------------------------

def test_a_view_is_a_copy_the_state_cannot_change() -> None:
    state = ConversationState(
        window=[WindowEntry(USER, "hola", 10.0), WindowEntry(ASSISTANT, "buenas", 11.0),
                WindowEntry(OPERATOR, "soy Ana", 12.0)],
        booking_sent=True, lead=LeadInfo(nombre="Juan", lead_id=7), paused_until=99.0,
        pause_reason="takeover", sent_ids=["s1"], instances=["i1", "inst"],
    )
    view = ConversationView.of(JID, state, live=False)
    state.window.append(WindowEntry(USER, "más", 13.0))
    state.lead.nombre = "Otro"
    state.sent_ids.append("s2")
    assert view.window_size == 3 and view.lead.nombre == "Juan" and view.sent_ids == ("s1",)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        view.booking_sent = False  # type: ignore[misc]
    assert view.seed_messages() == [{"role": "HumanMessage", "content": "hola"},
                                    {"role": "AIMessage", "content": "buenas"},
                                    {"role": "AIMessage", "content": "soy Ana"}]
    assert [(m["at"], m["human"]) for m in view.timed_messages()] == [(10.0, False), (11.0, False), (12.0, True)]


def test_state_fields_are_the_stored_form_without_the_window() -> None:
    state = ConversationState(window=[WindowEntry(USER, "hola", 10.0)], booking_sent=True,
                              lead=LeadInfo(nombre="Juan"), llm_calls=[5.0], instances=["i1"])
    stored = state.to_dict()
    view = ConversationView.of(JID, ConversationState.from_dict(json.loads(json.dumps(stored))), live=False)
    assert view.state_fields() == {k: v for k, v in stored.items() if k != "window"}
    assert list(view.state_fields()) == [k for k in stored if k != "window"]


async def test_service_views_a_live_chat_then_its_stored_state(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, STORE="sqlite")
    async with running_service(settings, ScriptedProvider()) as service:
        assert await service.conversation(JID) is None
        await service.intake(upsert("hola"))
        assert service.outbound is not None
        await wait_for(lambda: len(service.outbound.outbox_entries(jid=JID)) == 1)
        live = await service.conversation(JID)
        assert live is not None and live.live and live.actor is not None
        assert live.actor.key == key_of(JID) and live.actor.state.window_size == live.window_size == 2
        assert [e.content for e in live.window] == ["hola", "re: hola"]
    async with running_service(settings, ScriptedProvider()) as service:   # a restart: nothing is live
        stored = await service.conversation(JID)
        assert stored is not None and not stored.live and stored.actor is None
        assert stored.window == live.window
        # the same state, but for the ids of our own sends: those are saved with the next commit
        assert {**stored.state_fields(), "sent_ids": live.sent_ids} == {**live.state_fields(), "sent_ids": live.sent_ids}


async def test_live_actors_come_a_page_at_a_time_in_key_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path)
    jids = [f"54911000000{i:02d}@s.whatsapp.net" for i in range(5)]
    async with running_service(settings, ScriptedProvider()) as service:
        assert service.live_actors(None, 2) == ([], None)
        for jid in reversed(jids):
            await service.intake(upsert("hola", jid=jid, message_id=jid))
        seen, cursor, pages = [], None, 0
        while True:
            page, cursor = service.live_actors(cursor, 2)
            seen += [stats.key for stats in page]
            pages += 1
            if cursor is None:
                break
        assert seen == sorted(key_of(jid) for jid in jids) and pages == 3
        page, cursor = service.live_actors(None, 5)
        assert len(page) == 5 and cursor is None


# -- lifecycle -------------------------------------------------------------------------------------

def test_a_configuration_error_is_one_line_on_stderr_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def build(settings: Settings) -> None:
        raise ConfigError("PORT: invalid value 'abc' (expected int)")

    with pytest.raises(SystemExit) as info:
        configured_or_exit(build)
    assert info.value.code == 2
    assert capsys.readouterr().err == "Configuration error: PORT: invalid value 'abc' (expected int)\n"


def test_lifecycle_refuses_settings_unsafe_on_the_bind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, HOST="0.0.0.0", WEBHOOK_SECRET="", ALLOW_OPEN_WEBHOOK="false")
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET"):
        Lifecycle(settings)
    safe = make_settings(tmp_path)
    assert Lifecycle(safe).service.settings is safe
