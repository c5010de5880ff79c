"""A throwaway PostgreSQL cluster for tests and benches: Debian's ``postgresql`` package, ``initdb``
and ``pg_ctl`` in a temporary directory on a free loopback port, with password authentication over
TCP (so the store's URL carries a real password, as in production).

PostgreSQL refuses to run as root: as root the server's commands run as the ``postgres`` system user
(``runuser -u postgres --``). Each test gets a database of its own (``create_database``).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.procs import free_port

USER = "agent"
PASSWORD = "test-secret-pw-4711"   # a throwaway cluster's; tests check it never shows in output


def _server_bin() -> Path | None:
    """The directory holding initdb and pg_ctl (Debian keeps them out of PATH), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def unavailable_reason() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    if _server_bin() is None:
        return "PostgreSQL server binaries not installed (apt-get install postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser"
    return None


class PostgresCluster:
    """One running throwaway cluster; ``stop()`` removes it."""

    def __init__(self) -> None:
        bindir = _server_bin()
        assert bindir is not None, unavailable_reason()
        self._bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="agent-pg-"))
        self._names = itertools.count(1)
        self._as_root = os.geteuid() == 0

    def _run(self, *args: str, input: str | None = None) -> str:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, input=input, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def start(self) -> "PostgresCluster":
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_root:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(str(self._bin / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        self.pg_ctl("start")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"test_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement as the cluster's superuser over the local socket."""
        return self._run(str(self._bin / "psql"), "-h", str(self.dir), "-p", str(self.port), "-U", USER,
                         "-d", dbname, "-v", "ON_ERROR_STOP=1", "-Atc", statement)

    def pg_ctl(self, action: str) -> None:
        """``pg_ctl stop`` / ``start`` (the database down and up again, e.g. for an outage test)."""
        data = self.dir / "data"
        if action == "stop":
            self._run(str(self._bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        else:
            options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
                       " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            self._run(str(self._bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.dir / "log"),
                      "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Stop the server if it runs, and remove the cluster."""
        if (self.dir / "data" / "postmaster.pid").exists():
            self.pg_ctl("stop")
        shutil.rmtree(self.dir, ignore_errors=True)
