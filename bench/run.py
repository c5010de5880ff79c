"""End-to-end benchmark (docs/performance.md): fakes + service + load generator as separate processes.

    .venv/bin/python bench/run.py [--scenarios crowd,rate,burst,hot,memory,outage] [--quick] [--json FILE]
                                  [--store sqlite|postgresql] [--workers N]
    .venv/bin/python bench/run.py --scenarios takeover --store postgresql [--env SHARD_LEASE_SECONDS=3]

For every scenario it starts, on 127.0.0.1 and free ports, fresh processes:

* the OpenAI fake in echo mode (``python -m tests.fakes.llm --echo-chars 300``; a second one as the ``ollama`` fallback for
  ``outage``), and the Evolution fake (``python -m tests.fakes.evolution``);
* the service exactly as deployed: ``hypercorn --worker-class trio --bind 127.0.0.1:PORT app:app``
  from the repository root, configured only by environment variables, with a fresh DATA_DIR;
* the load generator (``bench/loadgen.py``: trio + httpx clients, or ``--shape evolution``'s
  h11 client of bench/evolution_shape.py) once everything is ready.

It then prints one table (and, with ``--json``, writes every measurement). CPU seconds are
utime+stime from ``/proc/<pid>/stat`` counted from "ready" to the end of the scenario; the service's
figures are those of hypercorn's worker process (hypercorn runs a parent and one worker child; the
parent's share is reported in the JSON). Peak RSS is ``VmHWM`` from ``/proc/<pid>/status``.

``--store postgresql`` starts a throwaway PostgreSQL cluster (tests/postgres.py) and gives each
scenario a fresh database (``STORE_URL``); ``--workers N`` runs ``hypercorn --workers N`` (each
worker a node sharing the conversations: the service's CPU is then the sum of its workers', and
``postgres_cpu_s`` in the JSON and the notes is the cluster's own CPU over the scenario).

``takeover`` (only when named, only with ``--store postgresql``) starts two separate service
processes on one database instead (``--workers`` does not apply: hypercorn's parent stops every
worker when one dies), loads both and SIGKILLs one: how long until the survivor owns every shard,
until the first reply to one of the dead node's chats, and the replies repeated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HYPERCORN = str(Path(PY).parent / "hypercorn")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL = ("crowd", "rate", "burst", "hot", "memory", "outage")
ONLY_NAMED = ("takeover",)   # run only when named (--scenarios): needs --store postgresql

# Scenario sizes: full, then --quick.
FULL: dict[str, dict[str, Any]] = {
    "crowd": {"users": 2000, "messages": 4, "llm": "fixed:1.0", "stagger_s": 10.0, "connections": 512,
              "max_s": 300},
    "rate": {"rate": 80, "duration_s": 30, "users": 400, "llm": "fixed:1.0", "max_s": 120},
    "burst": {"users": 500, "messages": 5, "llm": "uniform:0.2,1.0", "connections": 512, "max_s": 180},
    "hot": {"hot_messages": 1000, "others": 100, "llm": "fixed:1.0", "hot_llm_s": 0.02, "max_s": 300},
    "memory": {"mode": "seed", "stages": [50_000, 100_000], "per_user": 25, "text_chars": 150, "concurrency": 64,
               "max_s": 900},
    "outage": {"rate": 80, "users": 400, "pre_s": 10, "hang_s": 30, "post_s": 30, "llm": "fixed:1.0",
               "max_s": 240},
    "takeover": {"rate": 40, "users": 200, "pre_s": 15, "post_s": 30, "llm": "fixed:1.0", "max_s": 180,
                 "env": {"SHARD_LEASE_SECONDS": "15"}},
}
QUICK: dict[str, dict[str, Any]] = {
    "crowd": {"users": 50, "messages": 2, "llm": "fixed:0.2", "stagger_s": 0.2},
    "rate": {"rate": 40, "duration_s": 3, "users": 40, "llm": "fixed:0.2"},
    "burst": {"users": 20, "messages": 5, "llm": "uniform:0.02,0.1"},
    "hot": {"hot_messages": 150, "others": 10, "llm": "fixed:0.2", "hot_llm_s": 0.01, "think_s": [0.1, 0.3]},
    "memory": {"mode": "seed", "stages": [500, 1500], "per_user": 25, "text_chars": 150, "concurrency": 32},
    "outage": {"rate": 40, "users": 40, "pre_s": 2, "hang_s": 4, "post_s": 4, "llm": "fixed:0.2",
               "env": {"LLM_TIMEOUT": "1", "CIRCUIT_COOLDOWN_SECONDS": "3"}},
    "takeover": {"rate": 20, "users": 40, "pre_s": 3, "post_s": 8, "llm": "fixed:0.2",
                 "env": {"SHARD_LEASE_SECONDS": "3"}},
}

SERVICE_ENV = {
    "LLM_PROVIDER": "openai", "OPENAI_API_KEY": "sk-bench", "LLM_PROVIDER_FALLBACK": "",
    "EVOLUTION_API_KEY": "k", "EVOLUTION_INSTANCE": "bench", "EVOLUTION_INSTANCE_ID": "",
    "LOG_LEVEL": "WARNING", "LOG_STDERR": "false", "OUTBOUND_MIN_GAP_SECONDS": "0",
    "OUTBOUND_RATE_PER_INSTANCE": "0", "FLOOD_MAX_PER_MINUTE": "0",
    "REORDER_DELAY_SECONDS": "0", "MAILBOX_SIZE": "100", "STORE": "sqlite", "LLM_CONCURRENCY": "128",
    "ADMIN_TOKEN": "", "WEBHOOK_SECRET": "", "CRM_AUTO_REGISTER": "false", "DEBOUNCE_SECONDS": "0",
    "GOOGLE_BOOKING_URL": "", "MAX_MESSAGES": "50",
}

# hypercorn's own options, as deployed (scripts/agent-manager.sh, scripts/python-agent.service, README)
SERVER_ARGS: list[str] = ["--backlog", "4096"]


# -- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime, stime (fields 14, 15)


def system_times() -> dict[str, float]:
    """CPU seconds the whole machine spent per state (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) / CLK_TCK for v in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return {"tasks": user + nice + system, "irq": irq + softirq, "steal": steal, "idle": idle + iowait}


def system_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores)."""
    t = system_times()
    return t["tasks"] + t["irq"] + t["steal"]


def wait_quiet(limit: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Wait (at most ``limit`` s) until the machine is nearly idle: busy < ``threshold`` of one core
    over ``window`` seconds (other people's tests share the box). Returns the busy share seen last."""
    deadline = time.monotonic() + limit
    while True:
        before = system_busy()
        time.sleep(window)
        share = (system_busy() - before) / window
        if share < threshold or time.monotonic() >= deadline:
            return share


def status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return found


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, what: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if http_get(url)[0] == 200:
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready at {url} after {timeout:.0f}s")


class Proc:
    """A child process; ``mark()`` remembers its CPU so that ``cpu()`` is the work done since."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                 stdout: Any = subprocess.DEVNULL, log: Path | None = None) -> None:
        self.name = name
        self.log = log
        err = open(log, "wb") if log is not None else subprocess.DEVNULL
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stderr=err,
                                      start_new_session=True)
        self.pid = self.popen.pid
        self._base: dict[int, float] = {}

    def pids(self) -> list[int]:
        return [self.pid, *children(self.pid)]

    def mark(self) -> None:
        self._base = {pid: cpu_seconds(pid) for pid in self.pids()}

    def cpu(self, pid: int | None = None) -> float:
        pids = [pid] if pid is not None else self.pids()
        return sum(cpu_seconds(p) - self._base.get(p, 0.0) for p in pids)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait()
        except ProcessLookupError:
            pass


def read_listening_url(proc: Proc, timeout: float = 30.0) -> str:
    """The fake LLM prints ``listening on http://127.0.0.1:PORT`` once it accepts connections."""
    assert proc.popen.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline:
        line = proc.popen.stdout.readline()
        if line.startswith(b"listening on "):
            return line.decode().split()[-1]
        if not line and proc.popen.poll() is not None:
            break
    raise RuntimeError(f"{proc.name} did not start: {line!r}")


def start_llm(name: str, latency: str, logs: Path) -> tuple[Proc, str]:
    proc = Proc(name, [PY, "-m", "tests.fakes.llm", "--port", "0", "--latency", latency, "--seed", "7",
                       "--echo-chars", "300"],
                stdout=subprocess.PIPE, log=logs / f"{name}.log")
    return proc, read_listening_url(proc)


def start_evolution(logs: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("evolution", [PY, "-m", "tests.fakes.evolution", "--port", str(port), "--api-key", "k"],
                log=logs / "evolution.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_recorded", "fake evolution", proc.popen)
    return proc, url


def start_service(env_extra: dict[str, str], work: Path, data: Path, workers: int = 1,
                  server_args: list[str] | None = None) -> tuple[Proc, str, list[int]]:
    port = free_port()
    env = dict(os.environ)
    env.update(SERVICE_ENV)
    env.update({"DATA_DIR": str(data), "LOG_DIR": str(data / "logs"), "PYTHONUNBUFFERED": "1"})
    env.update(env_extra)
    if env.get("BENCH_EXPERIMENTS"):
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench" / "experiments"), str(ROOT)])
    argv = [HYPERCORN, "--worker-class", "trio", "--workers", str(workers), *SERVER_ARGS, *(server_args or []),
            "--bind", f"127.0.0.1:{port}", "app:app"]
    proc = Proc("service", argv,
                env=env, log=work / "service.stderr.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready", "service", proc.popen, timeout=60)
    deadline = time.monotonic() + 60
    while True:   # every worker ready: each answers /ready only once it owns its shards
        found = [p for p in children(proc.pid) if b"resource_tracker" not in _cmdline(p)]
        if len(found) >= workers and (workers == 1 or _nodes_ready(url, workers)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if workers == 1:
        found = [max(found, key=lambda p: status_kb(p, "VmRSS"))] if found else [proc.pid]
    return proc, url, found


def _nodes_ready(url: str, workers: int) -> bool:
    """Whether ``workers`` nodes share the shards evenly (GET /shards on any of them)."""
    status, body = http_get(url + "/shards")
    if status != 200:
        return False
    owners = json.loads(body).get("owners", {})
    return len(owners) == workers and max(owners.values()) - min(owners.values()) <= 1


def postgres_pids(cluster: Any) -> list[int]:
    """The cluster's postmaster and its children (backends, walwriter, …)."""
    try:
        postmaster = int((cluster.dir / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [postmaster, *children(postmaster)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def run_loadgen(cfg: dict[str, Any], timeout: float,
                tick: Callable[[], None] | None = None) -> tuple[dict[str, Any], float]:
    """Run bench/loadgen.py; its JSON result and its CPU seconds. ``tick`` is called while it runs."""
    popen = subprocess.Popen([PY, "bench/loadgen.py", json.dumps(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=None)
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    out = b""
    # read stdout without blocking forever: the loadgen prints one line at the end
    os.set_blocking(popen.stdout.fileno(), False)
    while True:
        try:
            chunk = popen.stdout.read()
        except BlockingIOError:
            chunk = None
        if chunk:
            out += chunk
        finished, status, usage = os.wait4(popen.pid, os.WNOHANG)
        if finished:
            try:
                out += popen.stdout.read() or b""
            except BlockingIOError:
                pass
            popen.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            popen.kill()
            popen.wait()
            raise RuntimeError(f"load generator still running after {timeout:.0f}s: killed")
        if tick is not None:
            tick()
        time.sleep(0.05)
    if popen.returncode != 0:
        raise RuntimeError(f"load generator failed ({popen.returncode})")
    lines = [line for line in out.decode().splitlines() if line.strip()]
    return json.loads(lines[-1]), usage.ru_utime + usage.ru_stime


# -- what the service and the kernel saw ------------------------------------------------------------

def listen_counters() -> dict[str, int]:
    """The kernel's TcpExt ListenOverflows / ListenDrops (machine-wide): SYNs or handshakes dropped
    because a listener's accept queue (hypercorn's --backlog) was full; the client retransmits them
    after 1 s, 3 s, 7 s, ... and the service never sees the wait."""
    try:
        with open("/proc/net/netstat") as f:
            lines = [line.split() for line in f if line.startswith("TcpExt:")]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    values = dict(zip(lines[0][1:], lines[1][1:]))
    return {key: int(values.get(key, 0)) for key in ("ListenOverflows", "ListenDrops")}


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (the bench reads a handful of series)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def ack_histogram(metrics: dict[str, float], outcome: str = "accepted") -> dict[str, Any]:
    """The service's own agent_webhook_ack_seconds for ``outcome``: count and the bucket bounds (ms) that
    hold its p50 / p99 (route start to answer: what the accept queue and the parsing add is not in it)."""
    prefix = 'agent_webhook_ack_seconds_bucket{le="'
    buckets = sorted((float(k[len(prefix):].split('"')[0]), v) for k, v in metrics.items()
                     if k.startswith(prefix) and f'outcome="{outcome}"' in k)
    count = metrics.get(f'agent_webhook_ack_seconds_count{{outcome="{outcome}"}}', 0.0)
    out: dict[str, Any] = {"n": int(count)}
    for q in (0.5, 0.99):
        bound = next((le for le, v in buckets if count and v >= q * count), None)
        out[f"p{int(q * 100)}_le_ms"] = None if bound is None else (bound * 1000 if bound != float("inf") else "inf")
    return out


class MetricsSampler:
    """Scrapes the service's /metrics every ``every`` s while the runner waits for the load generator
    (``run_loadgen`` calls ``tick``): the pacing backlog, its oldest wait, replies sent and the
    worker's CPU over time."""

    SERIES = {"backlog": "agent_outbound_backlog", "oldest_s": "agent_outbound_backlog_oldest_seconds",
              "pacing_waiting": "agent_outbound_pacing_waiting", "sent": 'agent_outbound_messages_total{outcome="sent"}',
              "refused_backlog": 'agent_intake_refused_total{reason="backlog"}',
              "refused_busy": 'agent_intake_refused_total{reason="busy"}'}

    def __init__(self, url: str, worker: int, every: float = 5.0) -> None:
        self.url, self.worker, self.every = url, worker, every
        self.samples: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self._start = self._next = time.monotonic()

    def tick(self) -> None:
        """Sample if ``every`` seconds have passed since the last sample."""
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + self.every
            self.sample()

    def sample(self) -> None:
        try:
            metrics = parse_metrics(http_get(self.url + "/metrics", timeout=5.0)[1].decode())
        except (OSError, urllib.error.URLError):
            return
        self.last = metrics
        row = {"t": round(time.monotonic() - self._start, 1), "cpu_s": round(cpu_seconds(self.worker), 2)}
        row.update({k: metrics.get(v, 0.0) for k, v in self.SERIES.items()})
        self.samples.append(row)

    def summary(self) -> dict[str, Any]:
        """Peaks, and the worker's CPU per reply sent while the backlog was held (from the first to the
        last sample with at least half the peak backlog, and at least 100, waiting)."""
        s = self.samples
        if not s:
            return {}
        peak = max(r["backlog"] for r in s)
        out: dict[str, Any] = {"backlog_max": peak,
                               "oldest_max_s": round(max(r["oldest_s"] for r in s), 1),
                               "pacing_waiting_max": max(r["pacing_waiting"] for r in s),
                               "refused_backlog": s[-1]["refused_backlog"], "refused_busy": s[-1]["refused_busy"],
                               "service_ack": ack_histogram(self.last)}
        held = [r for r in s if r["backlog"] >= max(100.0, peak / 2)]
        if len(held) >= 2:
            a, b = held[0], held[-1]
            sent = b["sent"] - a["sent"]
            out["backlogged"] = {"from_s": a["t"], "to_s": b["t"], "sent": sent,
                                 "sent_per_s": round(sent / (b["t"] - a["t"]), 1) if b["t"] > a["t"] else None,
                                 "cpu_ms_per_sent": round(1000 * (b["cpu_s"] - a["cpu_s"]) / sent, 2) if sent else None}
        return out


# -- scenarios ------------------------------------------------------------------------------------

def start_profiler(directory: Path, name: str, pid: int) -> subprocess.Popen:
    """py-spy (pip install py-spy into .venv) sampling the worker: collapsed stacks in DIR/NAME.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy", path=str(Path(PY).parent)) or "py-spy"
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking", "--threads",
                             "--format", "raw", "-o", str(directory / f"{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_takeover(params: dict[str, Any], work: Path, timeout: float, quick: bool, postgres: Any) -> dict[str, Any]:
    """Two nodes (separate ``hypercorn --worker-class trio`` processes, as the issue's black-box
    contract starts them: a ``--workers 2`` parent would stop every worker when one is killed) on
    one fresh database, load on both, then a SIGKILL of the second (bench/loadgen.py ``takeover``)."""
    logs = work / "takeover"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    started = time.monotonic()
    try:
        llm, llm_url = start_llm("llm", params["llm"], logs)
        evolution, evo_url = start_evolution(logs)
        procs += [llm, evolution]
        env = {**params.get("env", {}), "OPENAI_BASE_URL": llm_url + "/v1", "EVOLUTION_API_URL": evo_url,
               "STORE_URL": postgres.create_database()}
        nodes: list[tuple[Proc, str]] = []
        for node in ("node-a", "node-b"):
            (logs / node).mkdir(exist_ok=True)
            proc, url, _ = start_service(env, logs / node, Path(tempfile.mkdtemp(prefix="data-", dir=logs / node)))
            procs.append(proc)
            nodes.append((proc, url))
        (_, survivor), (victim, victim_url) = nodes
        deadline = time.monotonic() + 60
        while not _nodes_ready(survivor, 2):   # the second node has taken its half
            if time.monotonic() > deadline:
                raise RuntimeError("the two nodes did not share the shards within 60 s")
            time.sleep(0.2)
        views = [json.loads(http_get(url + "/shards")[1]) for _, url in nodes]
        database = env["STORE_URL"].rsplit("/", 1)[1]
        held = postgres.sql(f"SELECT shard FROM agent_shards WHERE owner = '{views[1]['node']}'", database)
        victim_shards = {int(line) for line in held.split()}
        sys.path.insert(0, str(ROOT))
        from actors.conversation_key import ConversationKey
        from loadgen import jid_of
        from runtime.shards import shard_of

        users, shards = int(params["users"]), int(views[0]["shards"])
        instance = SERVICE_ENV["EVOLUTION_INSTANCE"]
        cfg: dict[str, Any] = {k: v for k, v in params.items() if k not in ("env", "llm")}
        cfg.update({
            "scenario": "takeover", "service_url": survivor, "service_urls": [survivor, victim_url],
            "evolution_url": evo_url, "llm_latency_s": _mean_latency(params["llm"]),
            "warmup": 50 if not quick else 5, "victim_pgid": victim.pid, "survivor_id": views[0]["node"],
            "shards": shards, "victim_users": [u for u in range(users)
                                               if shard_of(ConversationKey(instance, jid_of(u)).key, shards)
                                               in victim_shards],
        })
        result, loadgen_cpu = run_loadgen(cfg, min(timeout, float(cfg.get("max_s", 600)) + 180))
        return {"scenario": "takeover", "params": params, **result, "loadgen_cpu_s": round(loadgen_cpu, 2),
                "lease_s": float(env.get("SHARD_LEASE_SECONDS", 15)), "victim_shards": len(victim_shards)}
    finally:
        for proc in reversed(procs):
            proc.stop()
        print(f"[takeover] finished in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)


def run_scenario(name: str, params: dict[str, Any], work: Path, timeout: float,
                 profile: Path | None = None, quick: bool = False, workers: int = 1,
                 postgres: Any = None) -> dict[str, Any]:
    if name == "takeover":
        return run_takeover(params, work, timeout, quick, postgres)
    logs = work / name
    logs.mkdir(parents=True, exist_ok=True)
    fakes: list[Proc] = []
    service: Proc | None = None
    started = time.monotonic()
    try:
        env: dict[str, str] = dict(params.get("env", {}))
        cfg: dict[str, Any] = {k: v for k, v in params.items() if k not in ("env", "llm", "server_args")}
        cfg["scenario"] = name
        if name == "memory":
            env.update({"LLM_PROVIDER": "offline", "EVOLUTION_API_URL": "", "OPENAI_API_KEY": ""})
        else:
            llm, llm_url = start_llm("llm", params["llm"], logs)
            fakes.append(llm)
            evolution, evo_url = start_evolution(logs)
            fakes.append(evolution)
            env.update({"OPENAI_BASE_URL": llm_url + "/v1", "EVOLUTION_API_URL": evo_url})
            cfg["evolution_url"] = evo_url
            cfg.setdefault("warmup", 50 if not quick else 5)
            cfg["llm_latency_s"] = _mean_latency(params["llm"])
            if name == "outage":
                fallback, fallback_url = start_llm("llm-fallback", params["llm"], logs)
                fakes.append(fallback)
                env.update({"LLM_PROVIDER_FALLBACK": "ollama", "OLLAMA_BASE_URL": fallback_url + "/v1"})
                cfg["primary_pid"] = llm.pid
        data = Path(tempfile.mkdtemp(prefix="data-", dir=logs))
        if name == "memory" and cfg.get("mode", "seed") == "seed":
            seeded = subprocess.run([PY, "bench/seed_store.py", str(data), "--actors", str(max(cfg["stages"])),
                                     "--window", str(cfg.get("window", 50)), "--chars", str(cfg["text_chars"])],
                                    cwd=ROOT, capture_output=True, text=True, check=True)
            print(f"[{name}] {seeded.stdout.strip()}", file=sys.stderr, flush=True)
        if postgres is not None:
            env["STORE_URL"] = postgres.create_database()
        service, url, nodes = start_service(env, logs, data, workers, params.get("server_args"))
        worker = nodes[0]
        cfg["service_url"] = url
        cfg["pids"] = nodes
        idle_rss = status_kb(worker, "VmRSS")
        for proc in (*fakes, service):
            proc.mark()
        pg_base = {pid: cpu_seconds(pid) for pid in postgres_pids(postgres)} if postgres is not None else {}
        times0, wall0, listen0 = system_times(), time.monotonic(), listen_counters()
        profiler = start_profiler(profile, name, worker) if profile else None
        sampler = MetricsSampler(url, worker)
        try:
            result, loadgen_cpu = run_loadgen(cfg, min(timeout, float(cfg.get("max_s", 600)) + 180), sampler.tick)
            sampler.sample()   # the final counts, the ack histogram included
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(30)
        listen1 = listen_counters()
        svc_cpu = sum(service.cpu(pid) for pid in nodes)
        pg_cpu = (sum(cpu_seconds(pid) - pg_base.get(pid, 0.0) for pid in postgres_pids(postgres))
                  if postgres is not None else None)
        times1, wall = system_times(), time.monotonic() - wall0
        delta = {k: times1[k] - times0[k] for k in times0}
        ours = service.cpu() + sum(p.cpu() for p in fakes) + loadgen_cpu + (pg_cpu or 0.0)
        row: dict[str, Any] = {
            "scenario": name, "params": params, **result,
            "server_argv": [*SERVER_ARGS, *(params.get("server_args") or [])],
            "service": {"cpu_s": round(svc_cpu, 2), "cpu_s_parent": round(service.cpu() - svc_cpu, 2),
                        "idle_rss_mb": round(idle_rss / 1024, 1),
                        "peak_rss_mb": round(status_kb(worker, "VmHWM") / 1024, 1),
                        "peak_rss_mb_total": round(sum(status_kb(p, "VmHWM") for p in service.pids()) / 1024, 1)},
            "fakes_cpu_s": {p.name: round(p.cpu(), 2) for p in fakes},
            "loadgen_cpu_s": round(loadgen_cpu, 2),
            "workers": workers,
            "postgres_cpu_s": round(pg_cpu, 2) if pg_cpu is not None else None,
            "wall_s": round(wall, 1),
            "machine_cpu_s": {k: round(v, 1) for k, v in delta.items()},
            # other processes on the box (other people's tests: noise), the runner and py-spy
            "foreign_cpu_s": round(max(0.0, delta["tasks"] - ours), 1),
            "listen": {k: listen1[k] - listen0.get(k, 0) for k in listen1},
            "service_metrics": sampler.summary(),
            "service_metrics_samples": sampler.samples,
        }
        answered = result.get("answered") or sum(s["messages"] for s in result.get("stages", [])[-1:])
        measured = result.get("service_cpu_measured_s") or svc_cpu   # after the warm-up, if any
        row["service"]["cpu_s_measured"] = measured
        row["service"]["cpu_ms_per_msg"] = round(1000 * measured / answered, 2) if answered else None
        if name == "memory":
            row["memory"] = memory_figures(result, idle_rss)
        return row
    finally:
        if service is not None:
            service.stop()
        for proc in fakes:
            proc.stop()
        print(f"[{name}] finished in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)


def _mean_latency(spec: str) -> float:
    kind, _, args = spec.partition(":")
    values = [float(v) for v in args.split(",")]
    if kind == "fixed":
        return values[0]
    if kind == "uniform":
        return (values[0] + values[1]) / 2
    return values[0]  # lognormal: the median


def memory_figures(result: dict[str, Any], idle_kb: int) -> dict[str, Any]:
    stages = result["stages"]
    out: dict[str, Any] = {"idle_rss_mb": round(idle_kb / 1024, 1), "stages": []}
    for stage in stages:
        rss = stage["rss_kb"][0]
        out["stages"].append({"actors": stage["actors"], "rss_mb": round(rss / 1024, 1),
                              "kb_per_actor_over_idle": round((rss - idle_kb) / stage["actors"], 2),
                              "fill_s": stage["fill_s"]})
    if len(stages) >= 2:
        a, b = stages[-2], stages[-1]
        slope = (b["rss_kb"][0] - a["rss_kb"][0]) / (b["actors"] - a["actors"])
        out["kb_per_actor_slope"] = round(slope, 2)
        out["projected_100k_mb"] = round((a["rss_kb"][0] + slope * (100_000 - a["actors"])) / 1024, 1)
    return out


# -- table ----------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def pair(d: dict[str, Any] | None) -> str:
    d = d or {}
    return f"{fmt(d.get('p50'))}/{fmt(d.get('p99'))}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "msgs", "lost", "dup", "order", "misrt", "msg/s", "ack p50/p99 ms", "reply p50/p99 ms",
            "ovh p50/p99 ms", "acks>30s", "svc CPU s", "CPU ms/msg", "svc RSS MB", "fakes CPU s", "lg CPU s", "other CPU s",
            "notes"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r.get("name", r["scenario"]), *["-"] * 16, "ERROR: " + r["error"][:80]])
            continue
        if r["scenario"] == "takeover":
            t = r["takeover"]
            notes = (f"SHARD_LEASE_SECONDS={r['lease_s']:g}: the survivor owned every shard {fmt(t['owned_all_s'])}s "
                     f"after the SIGKILL, first reply to one of the dead node's {t['victim_chats']} chats "
                     f"{fmt(t['first_reply_s'])}s after it; {r['duplicates']} replies repeated "
                     f"(<= {t['unanswered_at_kill']} acked and unanswered at the kill)")
            lines.append([r.get("name", r["scenario"]), r["messages"], r["lost"], r["duplicates"], r["out_of_order"],
                          r["misrouted"], fmt(r["answered_per_s"]), pair(r["ack_ms"]), pair(r["reply_ms"]),
                          pair(r["overhead_ms"]), fmt(r.get("acks_over_30s")), "-", "-", "-", "-",
                          fmt(r["loadgen_cpu_s"]), "-", notes])
            continue
        svc = r["service"]
        notes = ""
        if r["scenario"] == "memory":
            m = r["memory"]
            notes = "; ".join(f"{s['actors']} actors {s['rss_mb']} MB ({s['kb_per_actor_over_idle']} KB/actor)"
                              for s in m["stages"])
            notes += f"; idle {m['idle_rss_mb']} MB"
            if "kb_per_actor_slope" in m:
                notes += f"; slope {m['kb_per_actor_slope']} KB/actor -> 100k: {m['projected_100k_mb']} MB"
            msgs = r["stages"][-1]["messages"]
            lines.append([r.get("name", r["scenario"]), msgs, "-", "-", "-", "-", "-", pair(r.get("ack_ms")), "-", "-",
                          fmt(r.get("acks_over_30s")), fmt(svc["cpu_s_measured"]), fmt(svc["cpu_ms_per_msg"]), fmt(svc["peak_rss_mb"]),
                          "-", fmt(r["loadgen_cpu_s"]), fmt(r["foreign_cpu_s"]), notes])
            continue
        if r["scenario"] == "hot":
            hot = r["hot"]
            notes = (f"hot: {hot['answered']}/{hot['messages']} answered, {hot['retries_503']} x 503 retried, "
                     f"done in {hot['answer_span_s']}s (LLM {hot['llm_s']}s); others: {r['others']['messages']} msgs")
        if r["scenario"] == "outage":
            o = r["outage"]
            notes = (f"circuit open after {o['circuit_opened_after_s']}s; caught-by-hang n={o['caught_by_hang']['n']} "
                     f"reply {pair(o['caught_by_hang']['reply_ms'])}; while open n={o['while_open']['n']} "
                     f"added {pair(o['while_open']['added_ms'])}; fallbacks {o['fallbacks_used']}, "
                     f"polite {o['polite_answers']}")
        if r.get("polite") and r["scenario"] != "outage":
            notes += f" polite={r['polite']}"
        for key in ("unexpected", "http_errors", "ignored", "unsent", "resends", "resend_duplicates", "gave_up"):
            if r.get(key):
                notes += f" {key}={r[key]}"
        if r.get("error_kinds"):
            notes += " (" + ", ".join(f"{kind} x {n}" for kind, n in r["error_kinds"].items()) + ", retried)"
        if r.get("retries_503") and r["scenario"] != "hot":
            notes += f" 503s={r['retries_503']}"
        if r.get("postgres_cpu_s") is not None:
            notes += f" workers={r['workers']} postgres CPU s={r['postgres_cpu_s']}"
        if r.get("connections"):
            c = r["connections"]
            notes += f" connections opened={c['opened']} reused={c['reused']} max open={c['open_max']}"
        if r.get("listen", {}).get("ListenOverflows"):
            notes += f" listen overflows={r['listen']['ListenOverflows']} drops={r['listen'].get('ListenDrops')}"
        sm = r.get("service_metrics") or {}
        if sm.get("service_ack"):
            a = sm["service_ack"]
            notes += f" svc ack p50/p99<={fmt(a.get('p50_le_ms'))}/{fmt(a.get('p99_le_ms'))}ms"
        if sm.get("backlog_max"):
            notes += f" backlog max={sm['backlog_max']:.0f} oldest={sm['oldest_max_s']}s"
            if sm.get("backlogged"):
                g = sm["backlogged"]
                notes += f" (while held: {g['sent_per_s']} sent/s, {fmt(g['cpu_ms_per_sent'])} CPU ms/sent)"
        for key in ("refused_backlog", "refused_busy"):
            if sm.get(key):
                notes += f" {key}={sm[key]:.0f}"
        fakes = sum(r["fakes_cpu_s"].values())
        lines.append([r.get("name", r["scenario"]), r["messages"], r["lost"], r["duplicates"], r["out_of_order"],
                      r["misrouted"],
                      fmt(r["answered_per_s"]), pair(r["ack_ms"]), pair(r["reply_ms"]), pair(r["overhead_ms"]),
                      fmt(r.get("acks_over_30s")),
                      fmt(svc["cpu_s_measured"]), fmt(svc["cpu_ms_per_msg"]), fmt(svc["peak_rss_mb"]), fmt(fakes),
                      fmt(r["loadgen_cpu_s"]), fmt(r["foreign_cpu_s"]), notes.strip()])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    widths[-1] = 0
    out = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for line in lines:
        out.append("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |")
    return "\n".join(out)


def machine() -> str:
    import importlib.metadata as md
    versions = []
    for pkg in ("trio", "hypercorn", "quart", "quart-trio", "httpx", "openai", "h11"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
            + ", ".join(versions))


# -- main -----------------------------------------------------------------------------------------

def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that every finally: block stops its processes


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(description="End-to-end benchmark of the service against the fakes")
    parser.add_argument("--scenarios", default=",".join(ALL),
                        help=f"comma-separated, from {','.join(ALL + ONLY_NAMED)} "
                             f"(default: all but {','.join(ONLY_NAMED)})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds per scenario")
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument("--users", type=int, help="override the scenario's users")
    parser.add_argument("--messages", type=int, help="override the scenario's messages per user")
    parser.add_argument("--llm-latency", help="override the LLM fake latency (fixed:S | uniform:LO,HI | ...)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra service environment (e.g. REORDER_DELAY_SECONDS=0.3); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a scenario parameter (e.g. stages=[10000,20000]); repeatable")
    parser.add_argument("--experiment", default="", metavar="NAME[,NAME]",
                        help="start the service with bench/experiments patches (timing, switch_interval, raw_llm)")
    parser.add_argument("--shape", choices=("pooled", "evolution", "evolution-fresh"), default="pooled",
                        help="webhook traffic: through the scenario's pool of connections, or Evolution's "
                             "(one connection per POST in flight, no cap, 30 s timeout, re-sent; bench/evolution_shape.py); "
                             "evolution-fresh: the same with a new connection for every POST (no keep-alive)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra hypercorn argument after the deployed ones (e.g. --server-arg=--backlog=100); repeatable")
    parser.add_argument("--label", default="", help="suffix for the scenario names in the table")
    parser.add_argument("--timeout", type=float, default=900, help="per scenario, seconds")
    parser.add_argument("--quiet-wait", type=float, default=None, metavar="S",
                        help="before each scenario wait up to S seconds for the machine to be idle "
                             "(default 180, 0 with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="postgresql: a throwaway cluster (tests/postgres.py), a fresh database per scenario")
    parser.add_argument("--workers", type=int, default=1,
                        help="hypercorn workers (more than 1 needs --store postgresql: each worker is a node)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the service worker with py-spy (collapsed stacks in DIR/<scenario>.txt)")
    args = parser.parse_args(argv)

    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 180.0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL + ONLY_NAMED]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    if "takeover" in names and args.store != "postgresql":
        parser.error("the takeover scenario needs --store postgresql (two nodes on one database)")
    if args.workers > 1 and args.store != "postgresql":
        parser.error("--workers above 1 needs --store postgresql (one SQLite file serves one process)")
    postgres: Any = None
    if args.store == "postgresql":
        sys.path.insert(0, str(ROOT))
        from tests.postgres import PostgresCluster

        postgres = PostgresCluster().start()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    rows: list[dict[str, Any]] = []
    print(f"machine: {machine()}", flush=True)
    try:
        for name in names:
            params = json.loads(json.dumps((QUICK if args.quick else FULL)[name]))
            if args.users is not None:
                for key in ("users", "others"):
                    if key in params:
                        params[key] = args.users
            if args.messages is not None:
                for key in ("messages", "hot_messages"):
                    if key in params:
                        params[key] = args.messages
            if args.llm_latency and "llm" in params:
                params["llm"] = args.llm_latency
            for item in args.set:
                key, _, value = item.partition("=")
                params[key] = json.loads(value)
            if args.shape != "pooled":
                params["shape"] = args.shape
            if args.env:
                params.setdefault("env", {}).update(dict(item.split("=", 1) for item in args.env))
            if args.server_arg:
                params["server_args"] = list(args.server_arg)
            if args.experiment:
                params.setdefault("env", {})["BENCH_EXPERIMENTS"] = args.experiment
            print(f"[{name}] {json.dumps(params)}", file=sys.stderr, flush=True)
            if args.quiet_wait > 0:
                busy = wait_quiet(args.quiet_wait)
                print(f"[{name}] machine busy {100 * busy:.0f}% of a core before start", file=sys.stderr, flush=True)
            try:
                row = run_scenario(name, params, work, args.timeout, args.profile, args.quick, args.workers, postgres)
            except Exception as exc:  # one broken scenario must not hide the others
                row = {"scenario": name, "params": params, "error": f"{type(exc).__name__}: {exc}"}
            row["name"] = name + args.label
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        if postgres is not None:
            postgres.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", file=sys.stderr)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "argv": sys.argv, "rows": rows}, indent=1))
    failed = [r for r in rows if "error" in r or r.get("lost") or r.get("out_of_order") or r.get("misrouted")
              or r.get("duplicates", 0) > r.get("takeover", {}).get("unanswered_at_kill", 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
