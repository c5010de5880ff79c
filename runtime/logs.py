"""Logging setup: a gzip-rotating log file plus stderr, with secrets redacted on every handler.

``configure_logging()`` installs two handlers on the root logger, so records from *any* logger that
propagates (the service's own, httpx, hypercorn.error, SDKs) go through them:

* a size-rotating file ``log_dir/log_file``; rotated files are gzip-compressed
  (``agent.log.1.gz`` newest … ``agent.log.N.gz`` oldest), so the disk used is at most
  ``(backup_count + 1) * max_bytes`` (a record larger than ``max_bytes`` is truncated);
* stderr (optional: ``stderr=False`` when stderr is itself captured to an unbounded file).

Lines keep the seed's format, ``2026-01-20 10:15:23 INFO <name>: message``. Modules log under their
own names (``logging.getLogger(__name__)``); the ``names`` argument maps logger-name prefixes to the
name a line shows (the service maps its packages to its product name, as the seed's lines show it),
and a logger no prefix matches shows its own name. With ``json_lines=True`` each line is a JSON
object with ``time``, ``level``, ``logger`` (that shown name), ``module`` (the logger's own name),
``message``, the actor key (when the record has one: the key of the actor whose task logged it,
or ``extra={<key_field>: key}``; ``key_field`` names it) and
``exc_info``.

Both handlers carry a :class:`RedactionFilter`: before formatting, it renders the message (args
included) and the exception traceback, then replaces every registered secret value and every
credential-looking pattern (``apikey: x``, ``"apikey": "x"``, ``api_key=x``, ``token=x``,
``Authorization: Bearer x`` …) with ``[REDACTED]``, and URL credentials (``scheme://user:pass@host``)
with ``scheme://***@host``. Secrets are registered with the ``secrets``
argument or :func:`add_secret`, and are never forgotten by a later ``configure_logging()`` call.
Secrets shorter than 4 characters are ignored (redacting them would shred every line).

Rotation happens inside the logging call that crosses the size limit, but with a
:class:`LogCompressor` running (the service starts one) that call only renames the file (microseconds)
and the gzip (about 100 ms for 10 MB) runs in a worker thread through ``trio.to_thread``, so the event
loop never waits for it. Without a compressor (a script, a test) the gzip runs in the logging call.
"""

from __future__ import annotations

import gzip
import json
import logging
import logging.handlers
import os
import re
import shutil
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import quote

import trio

from .actor import current_actor

__all__ = ["configure_logging", "add_secret", "redact", "RedactionFilter", "GzipRotatingFileHandler",
           "LogCompressor"]

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 4
LINE_FORMAT = "%(asctime)s %(levelname)s %(shown_name)s: %(message)s"   # shown_name: see ShownNames
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Chatty HTTP client loggers: quiet (WARNING) unless the service runs at DEBUG.
NOISY_LOGGERS = ("httpx", "httpcore", "httpx2")

# key = value / key: value / "key": "value" (also JSON inside a JSON string: \"key\": \"value\"), for
# credential-looking keys: apikey, x-api-key, evolution_api_key, token, access_token, secret, password.
_PAIR = re.compile(
    r"""(?ix)
    (?P<key>\b[\w.-]*?(?:api[_-]?key|token|secret|password|passwd)\b(?:\\?["'])?\s*[:=]\s*)
    (?!\\?["']?\[REDACTED\])
    (?: (?P<open>\\?(?P<q>["'])) (?P<qval>.*?) (?P<close>\\?(?P=q)|(?=\n)|\Z)
      | (?P<val>[^\s"'&,;)}\]\\]+) )
    """
)
# Authorization: <scheme> <credentials>, and any bare "Bearer <token>" (e.g. a dumped header tuple).
_AUTH = re.compile(
    r"""(?ix)
    (?P<key>\bauthorization(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?)
    (?!(?:(?:bearer|basic|token|digest)\s+)?\[REDACTED\])
    (?P<scheme>(?:bearer|basic|token|digest)\s+)?[^\s"',;)}\]\\]+
    """
)
_BEARER = re.compile(r"(?i)\b(?P<scheme>bearer\s+)[A-Za-z0-9._~+/=-]+")
# Credentials in a URL's authority: scheme://user:password@host -> scheme://***@host.
_URL_CREDENTIALS = re.compile(r"(?i)\b(?P<scheme>[a-z][a-z0-9+.-]*://)[^\s/\"'<>]+@")

_lock = threading.Lock()
_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None
_OWNED = "_runtime_logs_handler"  # attribute marking the handlers configure_logging() installed


def add_secret(value: str) -> None:
    """Register a secret value to redact from every log line from now on (blank/short values are ignored)."""
    global _secret_re
    value = (value or "").strip()
    if len(value) < MIN_SECRET_LENGTH:
        return
    with _lock:
        # Also the URL-encoded form, as the secret may appear inside a logged URL.
        _secrets.update({value, quote(value, safe="")})
        alternatives = sorted(_secrets, key=len, reverse=True)  # longest first: no partial leftovers
        _secret_re = re.compile("|".join(re.escape(s) for s in alternatives))


def _pair_sub(match: re.Match[str]) -> str:
    if match.group("q"):
        return f"{match.group('key')}{match.group('open')}{REDACTED}{match.group('close')}"
    return f"{match.group('key')}{REDACTED}"


def redact(text: str) -> str:
    """``text`` with registered secrets and credential-looking patterns replaced by ``[REDACTED]``,
    and the credentials of every ``scheme://user:password@host`` URL by ``***``."""
    pattern = _secret_re
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)
    text = _AUTH.sub(lambda m: f"{m.group('key')}{m.group('scheme') or ''}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m.group('scheme')}{REDACTED}", text)
    return _PAIR.sub(_pair_sub, text)


class RedactionFilter(logging.Filter):
    """Handler filter that redacts a record in place (message with args, traceback, stack); never drops one.

    The record is rewritten (``msg`` fully rendered, ``args`` cleared, ``exc_info`` replaced by a redacted
    ``exc_text``) so that no handler or formatter that sees it afterwards can render the raw values again.
    """

    _plain = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # bad format args: keep what we can instead of a raw "--- Logging error ---"
            message = f"unformattable log message {record.msg!r} with args {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._plain.formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._redacted = True
        return True


class ActorContextFilter(logging.Filter):
    """Stamps the record's ``field`` with the key of the actor whose task logged it (unless set)."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self._field = field

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, self._field, None) is None:
            setattr(record, self._field, current_actor.get())
        return True


class ShownNames:
    """A logger's name as a line shows it: the name given for its longest matching prefix
    (``"shop"`` matches ``shop`` and ``shop.orders``, not ``shopping``), else its own."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self._prefixes = sorted(names.items(), key=lambda item: len(item[0]), reverse=True)
        self._shown: dict[str, str] = {}   # one entry per logger name seen

    def __call__(self, name: str) -> str:
        shown = self._shown.get(name)
        if shown is None:
            shown = next((s for prefix, s in self._prefixes if name == prefix or name.startswith(prefix + ".")), name)
            self._shown[name] = shown
        return shown


class LineFormatter(logging.Formatter):
    """The seed's line format; a record about an actor ends with ``[key]`` unless its text names it."""

    def __init__(self, names: ShownNames, key_field: str) -> None:
        super().__init__(LINE_FORMAT, DATE_FORMAT)
        self._names = names
        self._key_field = key_field

    def format(self, record: logging.LogRecord) -> str:
        record.shown_name = self._names(record.name)
        text = super().format(record)
        key = getattr(record, self._key_field, None)
        if key and key not in record.getMessage():
            first, newline, rest = text.partition("\n")
            text = f"{first} [{key}]{newline}{rest}"
        return text


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, local offset), level, logger (the shown name),
    module (the logger's own name), message[, the actor key under ``key_field``][, exc_info]."""

    def __init__(self, names: ShownNames, key_field: str) -> None:
        super().__init__()
        self._names = names
        self._key_field = key_field

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": self._names(record.name),
            "module": record.name,
            "message": record.getMessage(),
        }
        key = getattr(record, self._key_field, None)
        if key:
            entry[self._key_field] = str(key)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False)


class GzipRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose backups are gzip files, with sizes counted in bytes.

    ``agent.log.1.gz`` is the newest backup. A formatted record longer than ``maxBytes`` is truncated so
    no file ever exceeds ``maxBytes``. With a compressor attached (:class:`LogCompressor`), a rollover
    renames the full file to ``agent.log.rotated-N`` and hands it over; otherwise it compresses in place.
    """

    TRUNCATED = " … [truncated]"
    RAW_SUFFIX = ".rotated-"

    def __init__(self, filename: Path, *, max_bytes: int, backup_count: int) -> None:
        super().__init__(filename, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        self.namer = lambda name: name + ".gz"
        self.rotator = _gzip_rotate
        self._handover: Callable[[], None] | None = None   # wakes the compressor (thread-safe)
        self._raw_seq = 0

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        limit = self.maxBytes - len(self.terminator.encode())
        if self.maxBytes > 0 and len(text.encode("utf-8", "replace")) > limit:
            keep = limit - len(self.TRUNCATED.encode())
            text = text.encode("utf-8", "replace")[:keep].decode("utf-8", "ignore") + self.TRUNCATED
        return text

    def shouldRollover(self, record: logging.LogRecord) -> bool:  # noqa: N802 (stdlib name)
        if self.maxBytes <= 0 or (os.path.exists(self.baseFilename) and not os.path.isfile(self.baseFilename)):
            return False
        if self.stream is None:
            self.stream = self._open()
        size = len((self.format(record) + self.terminator).encode("utf-8", "replace"))
        self.stream.seek(0, 2)
        return self.stream.tell() + size > self.maxBytes

    def doRollover(self) -> None:  # noqa: N802 (stdlib name)
        if self.backupCount > 0 and self._handover is not None:
            if self.stream:
                self.stream.close()
                self.stream = None  # type: ignore[assignment]
            self._raw_seq += 1
            if os.path.exists(self.baseFilename):
                os.replace(self.baseFilename, f"{self.baseFilename}{self.RAW_SUFFIX}{self._raw_seq:09d}")
            for stale in self.raw_files()[:-self.backupCount]:   # the compressor fell behind: keep the bound
                os.remove(stale)
            self.stream = self._open()
            try:
                self._handover()
            except trio.RunFinishedError:   # the event loop is gone: compress here after all
                self._handover = None
                self.compress_pending()
            return
        if self.backupCount > 0:
            super().doRollover()
            return
        # No backups wanted: start the file over (the stdlib would keep appending forever).
        if self.stream:
            self.stream.close()
        self.stream = open(self.baseFilename, "w", encoding=self.encoding)

    def raw_files(self) -> list[str]:
        """Rotated files not compressed yet, oldest first."""
        folder, name = os.path.split(self.baseFilename)
        prefix = name + self.RAW_SUFFIX
        return [os.path.join(folder, n) for n in sorted(os.listdir(folder or "."))
                if n.startswith(prefix) and n[len(prefix):].isdigit()]

    def compress_pending(self) -> None:
        """Compress every rotated file into the newest backup slot, oldest first (any thread)."""
        for raw in self.raw_files():
            partial = raw + ".gz.tmp"
            try:
                with open(raw, "rb") as source, gzip.open(partial, "wb", compresslevel=6) as packed:
                    shutil.copyfileobj(source, packed)
            except FileNotFoundError:   # dropped meanwhile by a rollover keeping the disk bound
                continue
            with self.lock:   # held for a few renames only
                if not os.path.exists(raw):   # dropped by a rollover meanwhile (newer backups exist)
                    os.remove(partial)
                    continue
                for index in range(self.backupCount - 1, 0, -1):
                    older = self.rotation_filename(f"{self.baseFilename}.{index}")
                    if os.path.exists(older):
                        os.replace(older, self.rotation_filename(f"{self.baseFilename}.{index + 1}"))
                os.replace(partial, self.rotation_filename(f"{self.baseFilename}.1"))
                os.remove(raw)


def _gzip_rotate(source: str, dest: str) -> None:
    """Compress ``source`` into ``dest`` (written under a temporary name, then renamed) and remove ``source``."""
    if not os.path.exists(source):
        return
    partial = dest + ".tmp"
    with open(source, "rb") as raw, gzip.open(partial, "wb", compresslevel=6) as packed:
        shutil.copyfileobj(raw, packed)
    os.replace(partial, dest)
    os.remove(source)


class LogCompressor:
    """Compresses rotated log files in a worker thread, so a rollover never blocks the event loop.

    ``run()`` attaches it to the rotating handlers ``configure_logging()`` installed and works until
    cancelled; then the handlers compress synchronously again (what is pending is finished first).
    """

    def __init__(self) -> None:
        self.compressed = 0
        self._handlers: list[GzipRotatingFileHandler] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[None](1)
        token = trio.lowlevel.current_trio_token()

        def wake() -> None:
            try:
                send.send_nowait(None)
            except trio.WouldBlock:   # a wake-up is already pending: it covers this file too
                pass

        self._handlers = [h for h in logging.getLogger().handlers if isinstance(h, GzipRotatingFileHandler)]
        for handler in self._handlers:
            handler._handover = lambda: token.run_sync_soon(wake)
        try:
            task_status.started()
            async for _ in receive:
                await trio.to_thread.run_sync(self._compress_all)
        finally:
            for handler in self._handlers:
                handler._handover = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._compress_all)

    def _compress_all(self) -> None:
        for handler in self._handlers:
            pending = len(handler.raw_files())
            handler.compress_pending()
            self.compressed += pending


def configure_logging(
    *,
    log_dir: Path,
    log_file: str = "agent.log",
    level: str = "INFO",
    max_bytes: int = 10 * 1024 * 1024,
    backup_count: int = 5,
    json_lines: bool = False,
    secrets: Iterable[str] = (),
    stderr: bool = True,
    names: Mapping[str, str] | None = None,
    key_field: str = "actor",
) -> None:
    """Install the rotating file (+ stderr) handlers on the root logger; see the module docstring.

    Idempotent: a second call closes and replaces the handlers of the first (other handlers are left
    alone). ``log_dir`` is created if missing. ``secrets`` are added to the redaction set. ``names``
    maps logger-name prefixes to the name lines show (see ShownNames); ``key_field`` is the record
    attribute (and JSON field) that carries the actor key.
    """
    if max_bytes <= 0 or backup_count < 0:
        raise ValueError("max_bytes must be positive and backup_count 0 or more")
    numeric_level = logging.getLevelName(level.strip().upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    for value in secrets:
        add_secret(value)

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    shown = ShownNames(names or {})
    formatter = JsonLinesFormatter(shown, key_field) if json_lines else LineFormatter(shown, key_field)
    redaction = RedactionFilter()
    context = ActorContextFilter(key_field)
    handlers: list[logging.Handler] = [
        GzipRotatingFileHandler(log_dir / log_file, max_bytes=max_bytes, backup_count=backup_count)
    ]
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OWNED, False)]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        setattr(handler, _OWNED, True)
        handler.setFormatter(formatter)
        handler.addFilter(context)
        handler.addFilter(redaction)
        root.addHandler(handler)
    root.setLevel(numeric_level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric_level <= logging.DEBUG else logging.WARNING)

    # Best effort for libraries that already installed their own handlers (hypercorn.error writes to
    # stderr itself, besides propagating here): redact there too.
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for handler in getattr(logger, "handlers", ()):
            if not any(isinstance(f, RedactionFilter) for f in handler.filters):
                handler.addFilter(redaction)
