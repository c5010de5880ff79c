"""A conversation's state: the sliding window, the booking flag and the lead info, and its stored
form (compact UTF-8 JSON bytes, opaque to the store)."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Iterator, overload

import attrs

USER = sys.intern("user")
ASSISTANT = sys.intern("assistant")
OPERATOR = sys.intern("operator")   # a business-side message typed by a person (human takeover)
SEED_ROLE = {USER: "HumanMessage", ASSISTANT: "AIMessage", OPERATOR: "AIMessage"}
MODEL_ROLE = {USER: USER, ASSISTANT: ASSISTANT, OPERATOR: ASSISTANT}


@attrs.frozen(slots=True)
class WindowEntry:
    """One message of the window (``role``: user | assistant | operator). Kept small: a full
    window of 50 is most of an actor's memory, so the entries of one turn share their ``at``."""

    role: str
    content: str
    at: float

    @property
    def human(self) -> bool:
        """Typed by a person at the business phone, not by the bot."""
        return self.role is OPERATOR

    @property
    def model_role(self) -> str:
        """The role the model sees (an operator's words are the business's: assistant)."""
        return MODEL_ROLE[self.role]


class Window:
    """The sliding window of one chat, in order, oldest first.

    While the chat is idle the window is *hibernated* (Erlang's ``hibernate``): its entries are
    packed into one compact UTF-8 JSON bytes object, about half the memory of the live entries
    (one str, one float and one WindowEntry each). Any read of the entries or any change thaws
    it; ``len()`` never does. Only the conversation actor calls ``hibernate()``, once its mailbox
    is empty, so a turn always works on live entries. The packed form of live entries that
    ``packed()`` computed for a commit is kept until the next change, so hibernating right after
    a commit packs nothing again.
    """

    __slots__ = ("_entries", "_packed", "_length", "_encoded")

    def __init__(self, entries: Iterable[WindowEntry] = ()) -> None:
        self._entries: list[WindowEntry] = list(entries)
        self._packed: bytes | None = None
        self._length = 0
        self._encoded: bytes | None = None   # the live entries' packed form, until they change

    def copy(self) -> "Window":
        """An independent copy, hibernating if this one is (copying never thaws: the entries and
        the packed bytes are immutable, so sharing them is safe)."""
        twin = Window(self._entries)
        twin._packed, twin._length, twin._encoded = self._packed, self._length, self._encoded
        return twin

    @property
    def hibernating(self) -> bool:
        return self._packed is not None

    def hibernate(self) -> None:
        """Pack the entries into one bytes object until the next read or change."""
        if self._packed is None and self._entries:
            self._packed = self.packed()
            self._length = len(self._entries)
            self._entries, self._encoded = [], None

    def packed(self) -> bytes:
        """The entries as compact JSON ``[role, content, at]`` rows, without thawing (a hibernating
        window hands over its packed bytes as they are)."""
        if self._packed is not None:
            return self._packed
        if self._encoded is None:
            self._encoded = _encode([[e.role, e.content, e.at] for e in self._entries])
        return self._encoded

    def _live(self) -> list[WindowEntry]:
        if self._packed is not None:
            rows = json.loads(self._packed)
            self._entries = [WindowEntry(sys.intern(role), content, at) for role, content, at in rows]
            self._packed = None
        return self._entries

    def rows(self) -> list[list[Any]]:
        """The entries as ``[role, content, at]`` rows (the stored form), without thawing."""
        if self._packed is not None:
            return json.loads(self._packed)
        return [[e.role, e.content, e.at] for e in self._entries]

    def last_content(self) -> str:
        """The newest entry's text ("" when empty), without thawing."""
        if self._packed is not None:
            return str(json.loads(self._packed)[-1][1])
        return self._entries[-1].content if self._entries else ""

    def __len__(self) -> int:
        return self._length if self._packed is not None else len(self._entries)

    def __iter__(self) -> Iterator[WindowEntry]:
        return iter(self._live())

    @overload
    def __getitem__(self, index: int) -> WindowEntry: ...

    @overload
    def __getitem__(self, index: slice) -> list[WindowEntry]: ...

    def __getitem__(self, index: int | slice) -> WindowEntry | list[WindowEntry]:
        return self._live()[index]

    def __delitem__(self, index: int | slice) -> None:
        del self._live()[index]
        self._encoded = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Window):
            return self._live() == other._live()
        return NotImplemented

    def __repr__(self) -> str:
        return f"Window({len(self)} entries{', hibernating' if self.hibernating else ''})"

    def append(self, entry: WindowEntry) -> None:
        self._live().append(entry)
        self._encoded = None

    def clear(self) -> None:
        self._entries, self._packed, self._encoded = [], None, None


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def state_dict(blob: bytes) -> dict[str, Any]:
    """A stored state as the dict ``ConversationState.to_dict`` gives (read without building a state)."""
    data = json.loads(blob)
    if not isinstance(data, dict):
        raise ValueError(f"a stored state is a JSON object, not {type(data).__name__}")
    return data


def _window(value: Iterable[WindowEntry]) -> Window:
    return value if isinstance(value, Window) else Window(value)


@attrs.define(slots=True)
class LeadInfo:
    """What the CRM needs about the customer (the seed's ``user_lead_info``)."""

    nombre: str = ""
    telefono: str = ""
    empresa: str = ""
    rubro: str = ""
    volumen_mensajes: int = 0
    email: str = ""
    alt_jid: str = ""
    lead_id: int | None = None


@attrs.define(slots=True)
class ConversationState:
    """Everything one chat's actor owns. Saved whole at the end of each turn."""

    window: Window = attrs.field(factory=Window, converter=_window)
    booking_sent: bool = False
    lead: LeadInfo = attrs.Factory(LeadInfo)
    last_activity: float = 0.0
    messages_in: int = 0
    replies_out: int = 0
    ignored: int = 0
    crashes: int = 0
    paused_until: float = 0.0          # human takeover: the bot is silent until then (unix seconds)
    llm_calls: list[float] = attrs.Factory(list)  # unix times of recent LLM calls (flood control)
    flood_noticed_at: float = 0.0
    sent_ids: list[str] = attrs.Factory(list)     # ids of our own recent sends (takeover detection)
    pause_reason: str = ""             # why paused_until is set: "operator" (admin pause) | "takeover" (a person wrote)
    instance: str = ""                 # the Evolution instance name of the last customer message
    instances: list[str] = attrs.Factory(list)    # its send candidates (instance id, name): for operator replies
    summary: str = ""                  # MEMORY_SUMMARY: the running summary of the messages folded out of the window

    def copy(self) -> "ConversationState":
        """A copy that later mutations of this state do not touch (window entries are immutable)."""
        return attrs.evolve(self, window=self.window.copy(), lead=attrs.evolve(self.lead),
                            llm_calls=list(self.llm_calls), sent_ids=list(self.sent_ids),
                            instances=list(self.instances))

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window.rows(), **self._fields()}

    def to_bytes(self) -> bytes:
        """The stored form: ``to_dict()`` as compact UTF-8 JSON, its window spliced in from
        ``Window.packed`` (so a hibernating window is neither parsed nor encoded again)."""
        return b'{"window":' + self.window.packed() + b"," + _encode(self._fields())[1:]

    def _fields(self) -> dict[str, Any]:
        """Everything but the window, in the stored order."""
        return {
            "booking_sent": self.booking_sent,
            "lead": attrs.asdict(self.lead),
            "last_activity": self.last_activity,
            "messages_in": self.messages_in,
            "replies_out": self.replies_out,
            "ignored": self.ignored,
            "crashes": self.crashes,
            "paused_until": self.paused_until,
            "llm_calls": self.llm_calls,
            "flood_noticed_at": self.flood_noticed_at,
            "sent_ids": self.sent_ids,
            "pause_reason": self.pause_reason,
            "instance": self.instance,
            "instances": self.instances,
            "summary": self.summary,
        }

    @classmethod
    def from_bytes(cls, blob: bytes) -> "ConversationState":
        return cls.from_dict(state_dict(blob))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConversationState":
        lead_fields = {f.name for f in attrs.fields(LeadInfo)}
        return cls(
            window=Window(WindowEntry(sys.intern(row[0]), row[1], float(row[2])) for row in data.get("window", [])),
            booking_sent=bool(data.get("booking_sent", False)),
            lead=LeadInfo(**{k: v for k, v in data.get("lead", {}).items() if k in lead_fields}),
            last_activity=float(data.get("last_activity", 0.0)),
            messages_in=int(data.get("messages_in", 0)),
            replies_out=int(data.get("replies_out", 0)),
            ignored=int(data.get("ignored", 0)),
            crashes=int(data.get("crashes", 0)),
            paused_until=float(data.get("paused_until", 0.0)),
            llm_calls=[float(t) for t in data.get("llm_calls", [])],
            flood_noticed_at=float(data.get("flood_noticed_at", 0.0)),
            sent_ids=[str(i) for i in data.get("sent_ids", [])],
            pause_reason=str(data.get("pause_reason", "")),
            instance=str(data.get("instance", "")),
            instances=[str(i) for i in data.get("instances", [])],
            summary=str(data.get("summary", "")),   # states stored before summarised memory have none
        )


def seed_messages(window: Iterable[WindowEntry] | list[list[Any]]) -> list[dict[str, str]]:
    """The window in the seed's ``/memory/{jid}`` shape."""
    out = []
    for entry in window:
        role, content = (entry.role, entry.content) if isinstance(entry, WindowEntry) else (entry[0], entry[1])
        out.append({"role": SEED_ROLE.get(role, role), "content": content})
    return out
