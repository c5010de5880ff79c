"""The window's hibernation: packed while idle, identical when thawed, ``len`` without thawing."""

from __future__ import annotations

import json
import sys

from actors.state import ASSISTANT, OPERATOR, USER, ConversationState, Window, WindowEntry, state_dict


def entries(n: int) -> list[WindowEntry]:
    roles = (USER, ASSISTANT, OPERATOR)
    return [WindowEntry(roles[i % 3], f"mensaje {i}: ¿qué tal? 👋 \"comillas\" \\ fin", 1769000000.25 + i)
            for i in range(n)]


def test_hibernate_packs_and_thaws_to_the_same_entries() -> None:
    window = Window(entries(50))
    window.hibernate()
    assert window.hibernating and len(window) == 50
    assert window.rows() == [[e.role, e.content, e.at] for e in entries(50)]
    assert window.hibernating                    # rows() and len() read without thawing
    assert list(window) == entries(50)           # iterating thaws
    assert not window.hibernating
    assert all(e.role is sys.intern(e.role) for e in window)   # roles are the interned constants


def test_every_change_thaws_first() -> None:
    window = Window(entries(5))
    window.hibernate()
    window.append(WindowEntry(USER, "nuevo", 1.0))
    assert [e.content for e in window][-2:] == [entries(5)[-1].content, "nuevo"]
    window.hibernate()
    del window[:4]
    assert len(window) == 2 and window[0] == entries(5)[4] and window[-1].content == "nuevo"
    window.hibernate()
    window.clear()
    assert len(window) == 0 and not window.hibernating


def test_empty_window_stays_as_it_is() -> None:
    window = Window()
    window.hibernate()
    assert not window.hibernating and len(window) == 0 and window.rows() == []


def test_hibernating_state_round_trips_and_compares() -> None:
    state = ConversationState(window=entries(10), booking_sent=True)
    copy = state.copy()
    state.window.hibernate()
    assert state.to_dict() == copy.to_dict()
    assert state.window.hibernating              # saving reads the packed rows as they are
    assert ConversationState.from_dict(state.to_dict()) == copy
    assert state == copy                         # comparing thaws it; the contents are unchanged
    assert not state.window.hibernating


def test_copy_neither_thaws_nor_shares_changes() -> None:
    """The crash-rollback copy a turn takes must not thaw an idle chat's window (a bookkeeping
    control on a hibernated chat would pay a JSON parse and a re-pack for nothing)."""
    window = Window(entries(50))
    window.hibernate()
    twin = window.copy()
    assert window.hibernating and twin.hibernating
    twin.append(entries(51)[-1])
    assert len(twin) == 51 and len(window) == 50 and window.hibernating
    assert list(window) == entries(50)
    live = Window(entries(3))
    copy = live.copy()
    del copy[0]
    assert len(live) == 3 and len(copy) == 2


def test_the_stored_form_is_compact_json_and_never_thaws() -> None:
    """``to_bytes`` is ``to_dict`` as compact UTF-8 JSON (what the store kept as text before the
    states became opaque), whether the window is live, hibernating or empty."""
    live = ConversationState(window=entries(10), booking_sent=True, sent_ids=["3EB0A"], paused_until=5.5)
    idle = live.copy()
    idle.window.hibernate()
    blobs = {name: state.to_bytes() for name, state in (("live", live), ("idle", idle), ("empty", ConversationState()))}
    assert idle.window.hibernating                       # spliced in, not parsed and encoded again
    assert blobs["idle"] == blobs["live"] == json.dumps(live.to_dict(), separators=(",", ":"),
                                                        ensure_ascii=False).encode()
    assert ConversationState.from_bytes(blobs["live"]) == live
    assert ConversationState.from_bytes(blobs["empty"]) == ConversationState()
    assert state_dict(blobs["live"]) == live.to_dict()


def test_hibernating_after_a_commit_reuses_its_encoding_until_a_change() -> None:
    """The bytes a commit encoded become the hibernated form; any change drops them first."""
    new = WindowEntry(USER, "nuevo", 9.0)
    window = Window(entries(5))
    encoded = window.packed()
    assert window.packed() is encoded                          # encoded once while unchanged
    twin = window.copy()
    window.hibernate()
    assert window.hibernating and window.packed() is encoded    # hibernating packs nothing again
    twin.append(new)                                           # a copy's change is its own
    assert twin.packed() == Window([*entries(5), new]).packed() and window.packed() is encoded
    window.append(new)
    assert window.packed() == Window([*entries(5), new]).packed()
    del window[0]
    assert window.packed() == Window([*entries(5)[1:], new]).packed()
    window.clear()
    assert window.packed() == b"[]"
