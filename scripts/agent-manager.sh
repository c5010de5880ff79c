#!/usr/bin/env bash
# agent-manager.sh - start, stop and inspect the WhatsApp actor agent (hypercorn + trio) on this machine.
#
#   scripts/agent-manager.sh start|stop|restart|status|logs|help
#
# Works from any directory: it runs from the repository root (this script's parent's parent).
# Settings are read like the service reads them: process environment > .env > config.toml > default.
# Exit codes (LSB): 0 ok / running, 1 failure, 2 usage, 3 not running (status), 5 hypercorn not found,
# 6 misconfigured (bad PORT/HOST).
# Never starts open by accident: on a non-loopback HOST, a missing WEBHOOK_SECRET or ADMIN_TOKEN is
# generated into the env file (ENV_FILE, default .env; mode 600) and its location printed (docs/security.md).
# ENV_FILE, as the service reads it: unset is .env beside config.toml, empty is no env file at all.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 1
cd "$ROOT" || exit 1

CONFIG_FILE="$ROOT/config.toml"
DOTENV_FILE="${ENV_FILE-$ROOT/.env}"

# ---------------------------------------------------------------------------------------------- settings

# config_value SECTION KEY: the value of KEY under [SECTION] in config.toml (quotes and comments removed).
config_value() {
    local section="$1" key="$2" current="" line name value
    [[ -r "$CONFIG_FILE" ]] || return 1
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%$'\r'}"
        if [[ "$line" =~ ^[[:space:]]*\[([^]]+)\] ]]; then
            current="${BASH_REMATCH[1]}"
            continue
        fi
        [[ "$current" == "$section" ]] || continue
        if [[ "$line" =~ ^[[:space:]]*([A-Za-z0-9_]+)[[:space:]]*=[[:space:]]*(.*)$ ]]; then
            name="${BASH_REMATCH[1]}"
            value="${BASH_REMATCH[2]}"
            [[ "$name" == "$key" ]] || continue
            if [[ "$value" =~ ^\"([^\"]*)\" || "$value" =~ ^\'([^\']*)\' ]]; then
                value="${BASH_REMATCH[1]}"
            else
                value="${value%%#*}"
                value="${value%"${value##*[![:space:]]}"}"
            fi
            printf '%s\n' "$value"
            return 0
        fi
    done <"$CONFIG_FILE"
    return 1
}

# dotenv_value NAME: the value of NAME in .env (KEY=value lines, optional quotes and "export"); never sourced.
dotenv_value() {
    local want="$1" line key value
    [[ -r "$DOTENV_FILE" ]] || return 1
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%$'\r'}"
        [[ "$line" =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=(.*)$ ]] || continue
        key="${BASH_REMATCH[2]}"
        value="${BASH_REMATCH[3]}"
        [[ "$key" == "$want" ]] || continue
        value="${value#"${value%%[![:space:]]*}"}"
        if [[ "$value" =~ ^\"(.*)\"[[:space:]]*$ || "$value" =~ ^\'(.*)\'[[:space:]]*$ ]]; then
            value="${BASH_REMATCH[1]}"
        else
            value="${value%% #*}"
            value="${value%"${value##*[![:space:]]}"}"
        fi
        printf '%s\n' "$value"
        return 0
    done <"$DOTENV_FILE"
    return 1
}

# setting NAME SECTION DEFAULT: environment variable NAME (when non-empty) > .env > config.toml > DEFAULT.
setting() {
    local name="$1" section="$2" default="$3" key value
    key="$(printf '%s' "$name" | tr '[:upper:]' '[:lower:]')"
    if [[ -n "${!name:-}" ]]; then
        printf '%s\n' "${!name}"
    elif value="$(dotenv_value "$name")" && [[ -n "$value" ]]; then
        printf '%s\n' "$value"
    elif value="$(config_value "$section" "$key")" && [[ -n "$value" ]]; then
        printf '%s\n' "$value"
    else
        printf '%s\n' "$default"
    fi
}

# absolute PATH: PATH made absolute against the repository root.
absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$ROOT/$1" ;;
    esac
}

HOST="$(setting HOST server 127.0.0.1)"
PORT="$(setting PORT server 5000)"
LOG_DIR="$(absolute "$(setting LOG_DIR logging logs)")"
LOG_FILE="$(setting LOG_FILE logging agent.log)"
DATA_DIR="$(absolute "$(setting DATA_DIR storage data)")"
PID_FILE="$(absolute "${PID_FILE:-$DATA_DIR/agent.pid}")"
OUT_FILE="$LOG_DIR/hypercorn.out"
OUT_MAX_BYTES="$(setting LOG_MAX_BYTES logging 10485760)"
ADMIN_TOKEN_VALUE="$(setting ADMIN_TOKEN "" "")"
STORE_URL_VALUE="$(setting STORE_URL "" "")"
[[ -n "$STORE_URL_VALUE" ]] || STORE_URL_VALUE="$(setting DATABASE_URL "" "")"
WORKERS="${WORKERS:-1}"   # hypercorn worker processes; --workers N overrides (each one a node: PostgreSQL only)
START_TIMEOUT="${START_TIMEOUT:-20}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"

# The address to probe: loopback when bound to every interface; IPv6 literals get brackets.
probe_host() {
    case "$HOST" in
        "" | 0.0.0.0) printf '127.0.0.1\n' ;;
        "::" | "[::]") printf '[::1]\n' ;;
        \[*) printf '%s\n' "$HOST" ;;
        *:*) printf '[%s]\n' "$HOST" ;;
        *) printf '%s\n' "$HOST" ;;
    esac
}

bind_address() {
    case "$HOST" in
        \[*) printf '%s:%s\n' "$HOST" "$PORT" ;;
        *:*) printf '[%s]:%s\n' "$HOST" "$PORT" ;;
        *) printf '%s:%s\n' "$HOST" "$PORT" ;;
    esac
}

BASE_URL="http://$(probe_host):$PORT"

# is_loopback_host: HOST is 127.0.0.0/8, ::1 or localhost (what the service itself accepts without secrets).
is_loopback_host() {
    case "$HOST" in
        127.* | localhost | ::1 | "[::1]") return 0 ;;
        *) return 1 ;;
    esac
}

is_true() {
    case "$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')" in
        1 | true | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

# random_secret: 64 hex characters from the system's CSPRNG.
random_secret() {
    if command -v openssl >/dev/null 2>&1; then
        openssl rand -hex 32
    else
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
        printf '\n'
    fi
}

# ensure_secret NAME OVERRIDE: on a non-loopback bind, generate NAME into the env file when it is unset
# and its explicit override (ALLOW_OPEN_WEBHOOK / ADMIN_LOOPBACK_ONLY) is not true; export it either way.
ensure_secret() {
    local name="$1" override="$2" value
    value="$(setting "$name" "" "")"
    if [[ -z "$value" ]] && ! is_loopback_host && ! is_true "$(setting "$override" security false)"; then
        [[ -n "$DOTENV_FILE" ]] || { echo "$name: needed on HOST $HOST, and ENV_FILE is empty (no env file to generate it into)" >&2; return 1; }
        value="$(random_secret)" || return 1
        # (a newline first when the file's last line has none)
        { [[ ! -s "$DOTENV_FILE" || -z "$(tail -c 1 -- "$DOTENV_FILE")" ]] || printf '\n' >>"$DOTENV_FILE"; } \
            && (umask 077 && printf '%s=%s\n' "$name" "$value" >>"$DOTENV_FILE") && chmod 600 -- "$DOTENV_FILE" \
            || { echo "cannot write $DOTENV_FILE" >&2; return 1; }
        echo "generated $name into $DOTENV_FILE (mode 600): HOST $HOST is not loopback"
    fi
    [[ -n "$value" ]] && export "$name=$value"
    return 0
}

check_settings() {
    if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((10#$PORT < 1 || 10#$PORT > 65535)); then
        echo "PORT: invalid value '$PORT' (expected a port number 1-65535)" >&2
        exit 6
    fi
    if ! [[ "$WORKERS" =~ ^[0-9]+$ ]] || ((10#$WORKERS < 1)); then
        echo "--workers: invalid value '$WORKERS' (expected a whole number of at least 1)" >&2
        exit 6
    fi
    if ((10#$WORKERS > 1)) && [[ -z "$STORE_URL_VALUE" ]]; then
        echo "--workers $WORKERS: several workers need STORE_URL=postgresql://… (one SQLite file serves one process)" >&2
        exit 6
    fi
    if ! [[ "$START_TIMEOUT" =~ ^[0-9]+$ && "$STOP_TIMEOUT" =~ ^[0-9]+$ ]]; then
        echo "START_TIMEOUT/STOP_TIMEOUT: expected whole seconds (got '$START_TIMEOUT'/'$STOP_TIMEOUT')" >&2
        exit 6
    fi
}

# The active virtual environment's hypercorn, else the first on PATH, else the project's .venv.
find_hypercorn() {
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/hypercorn" ]]; then
        printf '%s\n' "$VIRTUAL_ENV/bin/hypercorn"
    elif command -v hypercorn >/dev/null 2>&1; then
        command -v hypercorn
    elif [[ -x "$ROOT/.venv/bin/hypercorn" ]]; then
        printf '%s\n' "$ROOT/.venv/bin/hypercorn"
    else
        return 1
    fi
}

find_python() {
    if command -v python3 >/dev/null 2>&1; then
        command -v python3
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then
        printf '%s\n' "$ROOT/.venv/bin/python"
    else
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------- processes

# is_alive PID: the process exists and is not a zombie.
is_alive() {
    local pid="$1" stat
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
        stat="${stat##*) }"
        [[ "${stat%% *}" != "Z" ]] || return 1
    fi
    return 0
}

# running_pid: print the service's pid when the pid file names a live hypercorn; drop a stale pid file.
running_pid() {
    local pid=""
    [[ -r "$PID_FILE" ]] && read -r pid <"$PID_FILE" 2>/dev/null
    if [[ "$pid" =~ ^[0-9]+$ ]] && is_alive "$pid"; then
        # Guard against pid reuse: the process must be a hypercorn.
        if [[ ! -r "/proc/$pid/cmdline" ]] || tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q hypercorn; then
            printf '%s\n' "$pid"
            return 0
        fi
    fi
    rm -f -- "$PID_FILE"
    return 1
}

# now_ms: a clock in milliseconds (bash 5's EPOCHREALTIME; whole seconds on older shells).
now_ms() {
    if [[ -n "${EPOCHREALTIME:-}" ]]; then
        local us="${EPOCHREALTIME//[!0-9]/}"
        printf '%s\n' "${us%???}"
    else
        printf '%s\n' "$((SECONDS * 1000))"
    fi
}

# wait_gone PID SECONDS: poll until PID has exited; fails on timeout.
wait_gone() {
    local pid="$1" deadline=$(($(now_ms) + $2 * 1000))
    while is_alive "$pid"; do
        (($(now_ms) < deadline)) || return 1
        sleep 0.2
    done
    return 0
}

# children PID: the direct children of PID (hypercorn's worker processes).
children() {
    local parent="$1" stat rest
    for stat in /proc/[0-9]*/stat; do
        rest="$(cat "$stat" 2>/dev/null)" || continue
        rest="${rest##*) }"          # "S PPID ..." after the command name
        rest="${rest#* }"
        if [[ "${rest%% *}" == "$parent" ]]; then
            stat="${stat#/proc/}"
            printf '%s\n' "${stat%/stat}"
        fi
    done
}

rss_kb() {
    local pid="$1" line
    if [[ -r "/proc/$pid/status" ]]; then
        while read -r line; do
            [[ "$line" == VmRSS:* ]] && { line="${line#VmRSS:}"; printf '%s\n' "${line//[!0-9]/}"; return 0; }
        done <"/proc/$pid/status"
        printf '0\n'
    else
        ps -o rss= -p "$pid" 2>/dev/null | tr -d ' ' || printf '0\n'
    fi
}

uptime_seconds() {
    local pid="$1" stat ticks boot hz fields
    if [[ -r "/proc/$pid/stat" && -r /proc/uptime ]]; then
        stat="$(cat "/proc/$pid/stat")"
        stat="${stat##*) }"
        read -r -a fields <<<"$stat"
        ticks="${fields[19]}"            # field 22 (starttime), counted from "state" (field 3)
        read -r boot _ </proc/uptime
        hz="$(getconf CLK_TCK 2>/dev/null || echo 100)"
        printf '%s\n' $((${boot%.*} - ticks / hz))
    else
        ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' '
    fi
}

human_duration() {
    local s="${1:-0}"
    printf '%dd %02dh %02dm %02ds\n' $((s / 86400)) $((s % 86400 / 3600)) $((s % 3600 / 60)) $((s % 60))
}

# ---------------------------------------------------------------------------------------------- http

# http_get URL [AUTH_HEADER]: sets HTTP_STATUS (000 when unreachable) and HTTP_BODY.
http_get() {
    local url="$1" auth="${2:-}" out python
    HTTP_STATUS="000"
    HTTP_BODY=""
    if command -v curl >/dev/null 2>&1; then
        local args=(-sS --max-time 3 -w '\n%{http_code}')
        [[ -n "$auth" ]] && args+=(-H "$auth")
        out="$(curl "${args[@]}" "$url" 2>/dev/null)" || { HTTP_STATUS="000"; return 1; }
    elif python="$(find_python)"; then
        out="$("$python" - "$url" "$auth" 2>/dev/null <<'PY'
import sys, urllib.request, urllib.error
url, auth = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url)
if auth:
    name, _, value = auth.partition(":")
    request.add_header(name.strip(), value.strip())
try:
    with urllib.request.urlopen(request, timeout=3) as response:
        status, body = response.status, response.read()
except urllib.error.HTTPError as error:
    status, body = error.code, error.read()
except Exception:
    sys.exit(1)
sys.stdout.write(body.decode("utf-8", "replace") + "\n" + str(status))
PY
)" || { HTTP_STATUS="000"; return 1; }
    else
        echo "neither curl nor python3 is available for HTTP checks" >&2
        return 1
    fi
    HTTP_STATUS="${out##*$'\n'}"
    HTTP_BODY="${out%$'\n'*}"
    HTTP_BODY="${HTTP_BODY%"${HTTP_BODY##*[![:space:]]}"}"
    [[ "$HTTP_STATUS" == 2?? ]]
}

health_ok() {
    http_get "$BASE_URL/health"
}

# ---------------------------------------------------------------------------------------------- commands

cmd_start() {
    local pid hypercorn offset=0 deadline launcher=()
    check_settings
    if pid="$(running_pid)"; then
        echo "already running (pid $pid); not starting another (use restart to apply changes)"
        return 0
    fi
    if ! hypercorn="$(find_hypercorn)"; then
        echo "hypercorn not found: activate the virtual environment or install the project into $ROOT/.venv" >&2
        return 5
    fi
    if health_ok; then
        echo "port $PORT is already in use by another process ($BASE_URL/health answers); not starting" >&2
        return 1
    fi
    mkdir -p -- "$LOG_DIR" "$DATA_DIR" "$(dirname -- "$PID_FILE")" || return 1
    ensure_secret WEBHOOK_SECRET ALLOW_OPEN_WEBHOOK || return 1
    ensure_secret ADMIN_TOKEN ADMIN_LOOPBACK_ONLY || return 1
    if [[ -f "$OUT_FILE" ]]; then
        offset="$(wc -c <"$OUT_FILE")"
        # hypercorn.out only grows while the service runs; bound it across restarts (one previous copy).
        if [[ "$OUT_MAX_BYTES" =~ ^[0-9]+$ ]] && ((offset > OUT_MAX_BYTES)); then
            mv -f -- "$OUT_FILE" "$OUT_FILE.1" && offset=0
        fi
    fi

    command -v setsid >/dev/null 2>&1 && launcher=(setsid)   # own session: stop can kill the whole group
    # --backlog 4096: hypercorn's accept queue (default 100) must hold a burst of new webhook connections.
    # The service inherits this environment (secrets, overrides); HOST/PORT are exported so it agrees on them.
    LOG_STDERR="${LOG_STDERR:-false}" HOST="$HOST" PORT="$PORT" ${launcher[@]+"${launcher[@]}"} nohup "$hypercorn" --worker-class trio --backlog 4096 --workers "$WORKERS" --bind "$(bind_address)" app:app \
        >>"$OUT_FILE" 2>&1 </dev/null &
    pid=$!
    printf '%s\n' "$pid" >"$PID_FILE"

    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    while :; do
        if ! is_alive "$pid"; then
            echo "failed to start: the process exited; last output from $OUT_FILE:" >&2
            tail -c +"$((offset + 1))" -- "$OUT_FILE" | tail -n 20 >&2
            rm -f -- "$PID_FILE"
            return 1
        fi
        if health_ok; then
            echo "started (pid $pid) on $(bind_address), $WORKERS worker(s)"
            return 0
        fi
        if (($(now_ms) >= deadline)); then
            echo "failed to start: $BASE_URL/health not healthy after ${START_TIMEOUT}s; stopping it. Last output from $OUT_FILE:" >&2
            tail -c +"$((offset + 1))" -- "$OUT_FILE" | tail -n 20 >&2
            terminate "$pid" >/dev/null
            rm -f -- "$PID_FILE"
            return 1
        fi
        sleep 0.2
    done
}

# terminate PID: SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL the process group with a warning.
terminate() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || { is_alive "$pid" && { echo "cannot signal pid $pid" >&2; return 1; }; }
    if wait_gone "$pid" "$STOP_TIMEOUT"; then
        return 0
    fi
    echo "warning: pid $pid did not stop within ${STOP_TIMEOUT}s; sending SIGKILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    wait_gone "$pid" 10
}

cmd_stop() {
    local pid
    if ! pid="$(running_pid)"; then
        echo "not running"
        return 0
    fi
    if terminate "$pid"; then
        rm -f -- "$PID_FILE"
        echo "stopped (pid $pid)"
        return 0
    fi
    echo "failed to stop pid $pid" >&2
    return 1
}

cmd_status() {
    local pid rss=0 count=0 child kb python summary auth=""
    if ! pid="$(running_pid)"; then
        echo "not running"
        return 3
    fi
    echo "running (pid $pid)"
    echo "bind: $(bind_address)"
    echo "uptime: $(human_duration "$(uptime_seconds "$pid")")"
    for child in "$pid" $(children "$pid"); do
        kb="$(rss_kb "$child")"
        rss=$((rss + ${kb:-0})) count=$((count + 1))
    done
    echo "memory: $((rss / 1024)) MB RSS ($count processes)"
    if health_ok; then
        echo "health: $HTTP_BODY"
    else
        echo "health: FAILED (HTTP $HTTP_STATUS) $HTTP_BODY"
    fi
    [[ -n "$ADMIN_TOKEN_VALUE" ]] && auth="Authorization: Bearer $ADMIN_TOKEN_VALUE"
    # /supervisors carries the registry's counters: cheap even with 100,000 live actors.
    if http_get "$BASE_URL/supervisors" "$auth"; then
        if python="$(find_python)" && summary="$(printf '%s' "$HTTP_BODY" | "$python" -c '
import json, sys
registry = json.load(sys.stdin)["registry"]
live, total, deepest = registry["live_actors"], registry["mailbox_depth_total"], registry["mailbox_depth_max"]
print(f"actors: {live} live")
print(f"mailbox backlog: {total} queued (max {deepest} in one chat)")
' 2>/dev/null)"; then
            echo "$summary"
        else
            echo "actors: unknown (could not parse /supervisors)"
        fi
    else
        if [[ -n "$auth" ]]; then
            echo "actors: unavailable (HTTP $HTTP_STATUS; check ADMIN_TOKEN)"
        else
            echo "actors: unavailable (HTTP $HTTP_STATUS; set ADMIN_TOKEN or probe over loopback)"
        fi
    fi
    return 0
}

cmd_logs() {
    mkdir -p -- "$LOG_DIR"
    echo "following $LOG_DIR/$LOG_FILE (Ctrl-C to quit)" >&2
    exec tail -n 50 -F -- "$LOG_DIR/$LOG_FILE"
}

cmd_help() {
    cat <<EOF
Usage: $(basename "$0") {start|stop|restart|status|logs|help} [--workers N]

  start     launch hypercorn (trio workers, 1 unless --workers N) in the background, wait for GET /health;
            several workers (each a node sharing the conversations) need STORE_URL=postgresql://…
  stop      SIGTERM, wait up to STOP_TIMEOUT seconds, then SIGKILL (with a warning)
  restart   stop, then start
  status    pid, uptime, memory, health and live actors; exit 0 running, 3 not running
  logs      follow the log file (tail -F)
  help      this text

Settings (environment > .env > config.toml > default):
  HOST, PORT        bind address ([server] host/port; default 127.0.0.1:5000); 0.0.0.0 faces the network
  ENV_FILE          env file read for settings, and where missing secrets are generated (default .env)
  LOG_DIR           log directory ([logging] log_dir; default logs); hypercorn output: LOG_DIR/hypercorn.out
  DATA_DIR          data directory ([storage] data_dir; default data); pid file: DATA_DIR/agent.pid
  PID_FILE          pid file override
  ADMIN_TOKEN       bearer token for GET /supervisors in status
  WEBHOOK_SECRET    generated with ADMIN_TOKEN on a non-loopback HOST when unset (mode 600, ENV_FILE)
  START_TIMEOUT     seconds to wait for a healthy start (default 20)
  STOP_TIMEOUT      seconds to wait for a graceful stop (default 30)
The rest of the environment is passed to the service unchanged.

Exit codes: 0 ok, 1 failure, 2 usage, 3 not running (status), 5 hypercorn not found, 6 misconfigured.
Now: root $ROOT, bind $(bind_address), log $LOG_DIR/$LOG_FILE, pid file $PID_FILE
EOF
}

command_name="${1:-}"
shift || true
while (($#)); do
    case "$1" in
        --workers) WORKERS="${2:-}"; shift 2 || { cmd_help >&2; exit 2; } ;;
        --workers=*) WORKERS="${1#--workers=}"; shift ;;
        *) cmd_help >&2; exit 2 ;;
    esac
done
case "$command_name" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop && cmd_start ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    help | -h | --help) cmd_help ;;
    *)
        cmd_help >&2
        exit 2
        ;;
esac
exit $?
