"""runtime.logs: gzip rotation within the disk bound, secret redaction on every handler, JSON lines, idempotence."""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import pytest

from runtime import logs
from runtime.logs import add_secret, configure_logging

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.-]+: ")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo configure_logging(): remove (and close) its handlers, restore levels."""
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    noisy = {name: logging.getLogger(name).level for name in logs.NOISY_LOGGERS}
    yield
    for handler in list(root.handlers):
        if handler not in before:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, saved in noisy.items():
        logging.getLogger(name).setLevel(saved)


def read_all(log_dir: Path) -> str:
    """Every log line on disk: the gzip backups (oldest first), then the active file."""
    backups = sorted(log_dir.glob("agent.log.*.gz"), key=lambda p: int(p.name.split(".")[2]), reverse=True)
    text = "".join(gzip.decompress(p.read_bytes()).decode("utf-8") for p in backups)
    active = log_dir / "agent.log"
    return text + (active.read_text(encoding="utf-8") if active.exists() else "")


def test_rotation_compresses_backups_and_bounds_disk(tmp_path: Path) -> None:
    max_bytes, backups = 2048, 3
    configure_logging(log_dir=tmp_path / "logs", max_bytes=max_bytes, backup_count=backups, stderr=False)
    log = logging.getLogger("python-agent")
    for n in range(2000):  # ~150 KB, far beyond the 8 KB bound
        log.info("message number %05d with some padding to make the line longer", n)

    log_dir = tmp_path / "logs"
    names = sorted(p.name for p in log_dir.iterdir())
    assert names == ["agent.log", "agent.log.1.gz", "agent.log.2.gz", "agent.log.3.gz"]
    sizes = [p.stat().st_size for p in log_dir.iterdir()]
    assert all(size <= max_bytes for size in sizes)
    assert sum(sizes) <= (backups + 1) * max_bytes

    lines = read_all(log_dir).splitlines()
    assert lines and all(LINE.match(line) for line in lines)
    numbers = [int(re.search(r"number (\d+)", line).group(1)) for line in lines]
    # The newest records survive, in order and without gaps across the gzip/active boundary.
    assert numbers == list(range(numbers[0], 2000))
    assert len(numbers) > 2 * backups  # the backups really hold lines


def test_oversized_record_is_truncated_and_zero_backups_stay_bounded(tmp_path: Path) -> None:
    configure_logging(log_dir=tmp_path, max_bytes=1024, backup_count=0, stderr=False)
    log = logging.getLogger("python-agent")
    log.info("x" * 5000)
    for n in range(200):
        log.info("filler line %d", n)
    active = tmp_path / "agent.log"
    assert active.stat().st_size <= 1024
    assert list(tmp_path.glob("agent.log.*")) == []
    assert "filler line 199" in active.read_text(encoding="utf-8")


def test_line_format_matches_the_seed(tmp_path: Path) -> None:
    configure_logging(log_dir=tmp_path, stderr=False)
    logging.getLogger("python-agent").info("hello %s", "world")
    (line,) = (tmp_path / "agent.log").read_text(encoding="utf-8").splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO python-agent: hello world", line)


def test_secrets_and_credential_patterns_never_reach_the_file_or_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(log_dir=tmp_path, secrets=["sk-test-SECRET-123", ""])
    add_secret("evo-key-XYZ789")
    log = logging.getLogger("python-agent")
    log.info("calling with key %s", "sk-test-SECRET-123")
    log.info("headers %s", {"apikey": "pattern-secret-1"})
    log.info('raw body {"apikey": "pattern-secret-2", "n": 1}')
    log.info("apikey: pattern-secret-3")
    log.info("GET /send?api_key=pattern-secret-4&x=1 token=pattern-secret-5")
    log.info("Authorization: Bearer pattern-secret-6")
    logging.getLogger("httpx").warning("POST https://evo.example/x?apikey=%s failed", "evo-key-XYZ789")
    try:
        raise RuntimeError("upstream rejected sk-test-SECRET-123")
    except RuntimeError:
        log.exception("request failed for %s", "evo-key-XYZ789")

    text = (tmp_path / "agent.log").read_text(encoding="utf-8")
    stderr = capsys.readouterr().err
    for output in (text, stderr):
        assert "sk-test-SECRET-123" not in output
        assert "evo-key-XYZ789" not in output
        assert "pattern-secret" not in output
        assert "Traceback (most recent call last)" in output and "RuntimeError: upstream rejected [REDACTED]" in output
        assert "WARNING httpx: POST https://evo.example/x?apikey=[REDACTED] failed" in output
        assert "Authorization: Bearer [REDACTED]" in output
    assert text.count("[REDACTED]") >= 10


def test_unformattable_record_is_redacted_not_raised() -> None:
    add_secret("fmt-secret-31337")
    record = logging.LogRecord("python-agent", logging.INFO, __file__, 1, "bad args %s %s", ("fmt-secret-31337",), None)
    assert logs.RedactionFilter().filter(record) is True
    message = record.getMessage()
    assert "bad args %s %s" in message and "fmt-secret-31337" not in message and "[REDACTED]" in message


def test_redaction_reaches_handlers_of_non_propagating_loggers(tmp_path: Path) -> None:
    """A library logger with its own handler (like hypercorn.access) is redacted too."""
    stream = io.StringIO()
    own = logging.StreamHandler(stream)
    library = logging.getLogger("tests.library-with-own-handler")
    library.addHandler(own)
    library.propagate = False
    try:
        configure_logging(log_dir=tmp_path, secrets=["lib-secret-0042"], stderr=False)
        library.warning("connecting with lib-secret-0042")
    finally:
        library.removeHandler(own)
        library.propagate = True
    assert stream.getvalue() == "connecting with [REDACTED]\n"


def test_http_client_loggers_are_quiet_unless_debug(tmp_path: Path) -> None:
    configure_logging(log_dir=tmp_path, level="INFO", stderr=False)
    logging.getLogger("httpx").info("HTTP Request: GET https://a.example 200")
    assert "HTTP Request" not in (tmp_path / "agent.log").read_text(encoding="utf-8")

    configure_logging(log_dir=tmp_path, level="DEBUG", stderr=False)
    logging.getLogger("httpx").info("HTTP Request: GET https://b.example 200")
    assert "INFO httpx: HTTP Request: GET https://b.example 200" in (tmp_path / "agent.log").read_text(encoding="utf-8")


def test_json_lines_are_parseable_and_carry_jid(tmp_path: Path) -> None:
    configure_logging(log_dir=tmp_path, json_lines=True, secrets=["json-secret-777"], stderr=False, key_field="jid")
    log = logging.getLogger("python-agent")
    log.info('quote " and json-secret-777', extra={"jid": "5491131376731@s.whatsapp.net"})
    try:
        raise ValueError("boom json-secret-777")
    except ValueError:
        log.exception("failed")

    raw = (tmp_path / "agent.log").read_text(encoding="utf-8")
    assert "json-secret-777" not in raw
    first, second = (json.loads(line) for line in raw.splitlines())
    assert first["level"] == "INFO" and first["logger"] == "python-agent"
    assert first["message"] == 'quote " and [REDACTED]'
    assert first["jid"] == "5491131376731@s.whatsapp.net"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first["time"])
    assert "jid" not in second and "ValueError: boom [REDACTED]" in second["exc_info"]


def test_configure_twice_does_not_duplicate_lines(tmp_path: Path) -> None:
    configure_logging(log_dir=tmp_path / "first", stderr=False)
    configure_logging(log_dir=tmp_path / "second", stderr=False)
    logging.getLogger("python-agent").warning("only once")

    owned = [h for h in logging.getLogger().handlers if getattr(h, logs._OWNED, False)]
    assert len(owned) == 1
    assert (tmp_path / "second" / "agent.log").read_text(encoding="utf-8").count("only once") == 1
    assert not (tmp_path / "first" / "agent.log").exists() or "only once" not in (
        tmp_path / "first" / "agent.log"
    ).read_text(encoding="utf-8")


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        configure_logging(log_dir=tmp_path, level="LOUD")
    with pytest.raises(ValueError):
        configure_logging(log_dir=tmp_path, max_bytes=0)


async def test_lines_about_a_conversation_carry_the_jid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Whatever an actor's task logs (or a task it spawned) names the actor's JID, in both formats."""
    import trio

    from runtime.actor import current_actor

    configure_logging(log_dir=tmp_path, json_lines=False, stderr=False, key_field="jid")
    log = logging.getLogger("python-agent")

    async def actor_task() -> None:
        current_actor.set("5491131376731@s.whatsapp.net")
        log.info("[RESPUESTA DEL LLM]: hola")
        log.info("Processing message from 5491131376731@s.whatsapp.net: hola")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(actor_task)
    log.info("not about a conversation")
    lines = (tmp_path / "agent.log").read_text().splitlines()
    assert lines[0].endswith("python-agent: [RESPUESTA DEL LLM]: hola [5491131376731@s.whatsapp.net]")
    assert lines[1].endswith("Processing message from 5491131376731@s.whatsapp.net: hola")
    assert lines[2].endswith("python-agent: not about a conversation")


async def test_rotation_compresses_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the service's compressor running, a rollover only renames the file on the event loop;
    the gzip runs in a worker thread, and the backups end up exactly as without it."""
    import threading

    import trio

    compressed_on: list[bool] = []
    real_open = logs.gzip.open

    def recording_open(*args, **kwargs):  # type: ignore[no-untyped-def]
        compressed_on.append(threading.current_thread() is threading.main_thread())
        return real_open(*args, **kwargs)

    monkeypatch.setattr(logs.gzip, "open", recording_open)
    max_bytes, backups = 2048, 3
    configure_logging(log_dir=tmp_path / "logs", max_bytes=max_bytes, backup_count=backups, stderr=False)
    log = logging.getLogger("python-agent")
    compressor = logs.LogCompressor()
    async with trio.open_nursery() as nursery:
        await nursery.start(compressor.run)
        for n in range(2000):
            log.info("message number %05d with some padding to make the line longer", n)
            if n % 50 == 0:
                await trio.sleep(0.001)   # a real service yields between turns: let the worker keep up
        with trio.fail_after(10):
            while list((tmp_path / "logs").glob("agent.log.rotated-*")):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    assert compressed_on and not any(compressed_on), "gzip ran on the event loop's thread"
    log_dir = tmp_path / "logs"
    assert sorted(p.name for p in log_dir.iterdir()) == ["agent.log", "agent.log.1.gz", "agent.log.2.gz",
                                                         "agent.log.3.gz"]
    assert all(p.stat().st_size <= max_bytes for p in log_dir.iterdir())
    numbers = [int(m.group(1)) for m in re.finditer(r"number (\d+)", read_all(log_dir))]
    assert numbers == list(range(numbers[0], 2000))   # newest records, in order, no gap
    assert compressor.compressed > 3


def test_module_loggers_show_the_name_given_for_their_prefix(tmp_path: Path) -> None:
    """Modules log under ``__name__``; the line shows the name mapped to the longest matching
    prefix (a whole dotted part), else the logger's own name. JSON keeps both."""
    names = {"actors": "python-agent", "runtime": "python-agent", "actors.llm": "llm"}
    configure_logging(log_dir=tmp_path / "lines", stderr=False, names=names)
    for name in ("actors.conversation", "runtime", "actors.llm.chain", "actorsx", "httpx"):
        logging.getLogger(name).warning("from %s", name)
    lines = (tmp_path / "lines" / "agent.log").read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        "python-agent: from actors.conversation", "python-agent: from runtime", "llm: from actors.llm.chain",
        "actorsx: from actorsx", "httpx: from httpx"]

    configure_logging(log_dir=tmp_path / "json", stderr=False, json_lines=True, names=names)
    logging.getLogger("actors.service").warning("hola")
    logging.getLogger("hypercorn.error").warning("chau")
    first, second = (json.loads(line) for line in (tmp_path / "json" / "agent.log").read_text().splitlines())
    assert (first["logger"], first["module"]) == ("python-agent", "actors.service")
    assert (second["logger"], second["module"]) == ("hypercorn.error", "hypercorn.error")


async def test_the_service_lines_keep_the_product_prefix(tmp_path: Path) -> None:
    """The app's start-up maps the product's modules (actors, runtime, app) to ``python-agent``."""
    from app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(tmp_path))
    async with app.test_app():
        logging.getLogger("actors.conversation").warning("una línea")
        logging.getLogger("runtime.registry").warning("otra línea")
    text = (tmp_path / "logs" / "agent.log").read_text(encoding="utf-8")
    assert re.search(r"\d\d:\d\d:\d\d WARNING python-agent: una línea$", text, re.M)
    assert re.search(r"\d\d:\d\d:\d\d WARNING python-agent: otra línea$", text, re.M)
    assert " INFO python-agent: Service ready: " in text
    assert not re.search(r" (actors|runtime)\.\w+: ", text)
