#!/usr/bin/env bash
# Local nats-server (JetStream) for keybus tests.
#
#   tools/nats/nats.sh install            build the pinned nats-server into .cache/nats/bin
#   tools/nats/nats.sh up                 start (idempotent) and print nats://127.0.0.1:<port>
#   tools/nats/nats.sh down               stop and delete the JetStream store (idempotent)
#   tools/nats/nats.sh stop [--hard]      stop but KEEP the store (a later `up` reuses it)
#   tools/nats/nats.sh restart-keep-data [--hard]
#                                         stop + start on the SAME store dir, wait until ready
#   tools/nats/nats.sh status             exit 0 if healthy, 1 otherwise
#   tools/nats/nats.sh logs [-f] [N]      tail the server log
#   tools/nats/nats.sh url                print the client URL
#   tools/nats/nats.sh pid                print the server's pid (exit 1 if none runs)
#   tools/nats/nats.sh binary             print the nats-server binary (installing it if needed)
#
# Environment:
#   KEYBUS_NATS_PORT            client port (default 4222)
#   KEYBUS_NATS_MONITOR_PORT    monitoring port (default client port + 4000, i.e. 8222)
#   KEYBUS_NATS_VERSION         nats-server module version (default: pinned below)
#   KEYBUS_NATS_START_TIMEOUT   seconds to wait for readiness (default 30)
#   KEYBUS_NATS_STOP_TIMEOUT    seconds to wait after SIGTERM before SIGKILL (default 10)
#   KEYBUS_NATS_EXTRA_ARGS      extra nats-server arguments (word-split)
#   GO                          go binary (default: go on PATH, else /usr/local/go/bin/go)
#
# --hard: SIGKILL instead of SIGTERM (simulates a crash; unflushed data may be lost).
set -euo pipefail

NATS_SERVER_VERSION="${KEYBUS_NATS_VERSION:-v2.15.2}"
NATS_SERVER_MODULE="github.com/nats-io/nats-server/v2"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
CACHE_DIR="$REPO_ROOT/.cache"
NATS_DIR="$CACHE_DIR/nats"
BIN_DIR="$NATS_DIR/bin"
PINNED_BIN="$BIN_DIR/nats-server"
FALLBACK_MARKER="$BIN_DIR/.fallback-binary"

PORT="${KEYBUS_NATS_PORT:-4222}"
MPORT="${KEYBUS_NATS_MONITOR_PORT:-$((PORT + 4000))}"
HOST=127.0.0.1
if [[ "$PORT" == 4222 ]]; then RUN_DIR="$NATS_DIR/run"; else RUN_DIR="$NATS_DIR/run-$PORT"; fi
PID_FILE="$RUN_DIR/server.pid"
LOG_FILE="$RUN_DIR/server.log"
STORE_REF="$RUN_DIR/store.path"      # holds the path of the current store dir
START_TIMEOUT="${KEYBUS_NATS_START_TIMEOUT:-30}"
STOP_TIMEOUT="${KEYBUS_NATS_STOP_TIMEOUT:-10}"
URL="nats://$HOST:$PORT"

log() { echo "nats.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ensure_cache() {
  mkdir -p "$BIN_DIR" "$RUN_DIR"
  # keep the whole cache out of git even without a top-level .gitignore entry
  [[ -f "$CACHE_DIR/.gitignore" ]] || printf '*\n' >"$CACHE_DIR/.gitignore"
}

# ---------------------------------------------------------------- helpers
go_bin() {
  if [[ -n "${GO:-}" ]]; then echo "$GO"
  elif command -v go >/dev/null 2>&1; then command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then echo /usr/local/go/bin/go
  else return 1; fi
}

# prints e.g. "v2.15.2" for a nats-server binary, or nothing
bin_version() {
  "$1" --version 2>/dev/null | sed -n 's/.*\(v[0-9][0-9.]*[^ ]*\).*/\1/p' | head -n1 || true
}

# The binary to run: the pinned one if present, else the Debian fallback recorded by install.
server_bin() {
  if [[ -x "$PINNED_BIN" && "$(bin_version "$PINNED_BIN")" == "$NATS_SERVER_VERSION" ]]; then
    echo "$PINNED_BIN"; return 0
  fi
  if [[ -f "$FALLBACK_MARKER" ]]; then
    local fb; fb="$(cat "$FALLBACK_MARKER")"
    [[ -x "$fb" ]] && { echo "$fb"; return 0; }
  fi
  return 1
}

# HTTP GET body on 127.0.0.1:$MPORT (curl if available, else bash /dev/tcp)
http_get() {
  local path="$1"
  if command -v curl >/dev/null 2>&1; then
    curl -sS --max-time 2 "http://$HOST:$MPORT$path" 2>/dev/null || true
  else
    ( exec 3<>"/dev/tcp/$HOST/$MPORT" || exit 0
      printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$HOST" >&3
      timeout 2 cat <&3 | sed '1,/^\r\{0,1\}$/d' ) 2>/dev/null || true
  fi
}

tcp_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# healthy = client port accepts connections and /healthz reports ok with JetStream
healthy() {
  tcp_open "$PORT" || return 1
  http_get '/healthz?js-enabled-only=true' | grep -q '"status": *"ok"' || return 1
  # full health check: JetStream enabled and its assets (streams/consumers) recovered
  http_get '/healthz' | grep -q '"status": *"ok"'
}

pid_alive() {
  local pid="$1"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  # guard against pid reuse: must be a nats-server
  [[ -r "/proc/$pid/cmdline" ]] && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q nats-server && return 1
  return 0
}

read_pid() { if [[ -f "$PID_FILE" ]]; then tr -dc '0-9' <"$PID_FILE" || true; fi; }

lock_run() {
  exec 9>"$RUN_DIR/.lock"
  flock -w 120 9 || die "could not get lock $RUN_DIR/.lock"
}

log_tail() {
  if [[ -f "$LOG_FILE" ]]; then
    log "---- last 40 lines of $LOG_FILE ----"
    tail -n 40 "$LOG_FILE" >&2 || true
    log "------------------------------------"
  fi
}

# ---------------------------------------------------------------- install
cmd_install() {
  ensure_cache
  exec 8>"$NATS_DIR/.install.lock"
  flock -w 900 8 || die "could not get install lock"

  if [[ -x "$PINNED_BIN" && "$(bin_version "$PINNED_BIN")" == "$NATS_SERVER_VERSION" ]]; then
    log "nats-server $NATS_SERVER_VERSION already installed: $PINNED_BIN"
    exec 8>&-; return 0
  fi

  local go
  if go="$(go_bin)"; then
    log "building $NATS_SERVER_MODULE@$NATS_SERVER_VERSION with $("$go" version 2>/dev/null || echo "$go") ..."
    local t0=$SECONDS
    if env GOPATH="$CACHE_DIR/go" GOMODCACHE="$CACHE_DIR/go/mod" GOCACHE="$CACHE_DIR/go/build" \
         GOBIN="$BIN_DIR" GOFLAGS="-modcacherw -buildvcs=false" CGO_ENABLED=0 \
         "$go" install "$NATS_SERVER_MODULE@$NATS_SERVER_VERSION" \
       && [[ "$(bin_version "$PINNED_BIN")" == "$NATS_SERVER_VERSION" ]]; then
      rm -f "$FALLBACK_MARKER"
      log "installed $PINNED_BIN ($(bin_version "$PINNED_BIN")) in $((SECONDS - t0))s"
      exec 8>&-; return 0
    fi
    log "go install of nats-server $NATS_SERVER_VERSION FAILED"
  else
    log "no Go toolchain found"
  fi

  # ---- fallback: Debian's package (older, e.g. 2.9.x on bookworm) ----
  log "FALLING BACK to Debian's nats-server package (NOT the pinned $NATS_SERVER_VERSION)"
  local sys=""
  for c in /usr/bin/nats-server /usr/sbin/nats-server; do [[ -x "$c" ]] && sys="$c" && break; done
  if [[ -z "$sys" ]]; then
    command -v apt-get >/dev/null 2>&1 || die "no apt-get; cannot install nats-server"
    local sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q nats-server \
      || { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q nats-server; } \
      || die "apt-get install nats-server failed"
    for c in /usr/bin/nats-server /usr/sbin/nats-server; do [[ -x "$c" ]] && sys="$c" && break; done
    [[ -n "$sys" ]] || die "nats-server package installed but binary not found"
  fi
  # keybus keeps a topic's partition count in stream metadata, which nats-server keeps
  # only from 2.10 on: an older server would silently turn every topic into one partition.
  local v; v="$(bin_version "$sys")"
  if [[ ! "$v" =~ ^v([0-9]+)\.([0-9]+) ]] || (( BASH_REMATCH[1] < 2 || (BASH_REMATCH[1] == 2 && BASH_REMATCH[2] < 10) )); then
    die "Debian's nats-server ${v:-(unknown version)} is older than 2.10, which keybus needs (stream metadata); install Go so $NATS_SERVER_VERSION can be built"
  fi
  echo "$sys" >"$FALLBACK_MARKER"
  log "using Debian fallback $sys ($(bin_version "$sys"))"
  exec 8>&-
}

# ---------------------------------------------------------------- start/stop
start_server() {   # caller holds the run lock; server not running
  local store bin
  if [[ -f "$STORE_REF" && -d "$(cat "$STORE_REF")" ]]; then
    store="$(cat "$STORE_REF")"
    log "reusing JetStream store $store"
  else
    store="$(mktemp -d "$RUN_DIR/store.XXXXXX")"
    echo "$store" >"$STORE_REF"
  fi

  if tcp_open "$PORT"; then
    die "port $HOST:$PORT is in use by something that is not a healthy nats-server started here"
  fi

  bin="$(server_bin)" || { cmd_install; bin="$(server_bin)" || die "no nats-server binary after install"; }

  local -a extra=()
  # shellcheck disable=SC2206
  [[ -n "${KEYBUS_NATS_EXTRA_ARGS:-}" ]] && extra=(${KEYBUS_NATS_EXTRA_ARGS})

  echo "==== $(date -u +%FT%TZ) starting $bin ($(bin_version "$bin")) port=$PORT monitor=$MPORT store=$store" >>"$LOG_FILE"
  local t0; t0=$(date +%s.%N)
  # New session; stdin/stdout/stderr detached from the caller and every other inherited fd
  # (our lock fds, a caller's pipes) closed, so the server never holds them: a caller that
  # reads our output through a pipe (subprocess.run(capture_output=True)) does not hang.
  (
    for fd in /proc/"$BASHPID"/fd/*; do
      fd="${fd##*/}"
      if [[ "$fd" =~ ^[0-9]+$ ]] && (( fd > 2 )); then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid "$bin" -js -a "$HOST" -p "$PORT" -m "$MPORT" -sd "$store" -n "keybus-local-$PORT" \
      -P "$PID_FILE" "${extra[@]}" </dev/null >>"$LOG_FILE" 2>&1
  ) &
  local pid=$!
  echo "$pid" >"$PID_FILE"

  local deadline=$((SECONDS + START_TIMEOUT))
  until healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log_tail; die "nats-server exited during startup (see $LOG_FILE)"
    fi
    if (( SECONDS >= deadline )); then
      log_tail; kill -KILL "$pid" 2>/dev/null || true
      die "nats-server not ready after ${START_TIMEOUT}s (see $LOG_FILE)"
    fi
    sleep 0.1
  done
  # nats-server rewrote $PID_FILE itself (-P); prefer that value
  local spid; spid="$(read_pid)"
  if [[ -n "$spid" ]] && pid_alive "$spid"; then pid="$spid"; else echo "$pid" >"$PID_FILE"; fi
  log "nats-server pid $pid ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')s (store $store)"
}

stop_server() {    # caller holds the run lock; $1 = TERM|KILL
  local sig="${1:-TERM}" pid
  pid="$(read_pid)"
  if [[ -z "$pid" ]] || ! pid_alive "$pid"; then
    rm -f "$PID_FILE"
    if healthy; then
      log "WARNING: a nats-server answers on $HOST:$PORT but was not started by this script; leaving it alone"
    fi
    return 0
  fi
  log "stopping nats-server pid $pid (SIG$sig)"
  kill -"$sig" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_alive "$pid"; do
    if (( SECONDS >= deadline )); then
      log "still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.1
  done
  # wait for the port to be released
  deadline=$((SECONDS + 5))
  while tcp_open "$PORT" && (( SECONDS < deadline )); do sleep 0.1; done
  rm -f "$PID_FILE"
}

# ---------------------------------------------------------------- commands
cmd_up() {
  ensure_cache
  lock_run
  local pid; pid="$(read_pid)"
  if healthy; then
    echo "$URL"; return 0
  fi
  if [[ -n "$pid" ]] && pid_alive "$pid"; then
    # ours, running but not (yet) healthy: give it the start timeout
    local deadline=$((SECONDS + START_TIMEOUT))
    until healthy; do
      (( SECONDS >= deadline )) && { log_tail; die "nats-server pid $pid running but not healthy"; }
      sleep 0.1
    done
    echo "$URL"; return 0
  fi
  rm -f "$PID_FILE"
  start_server
  echo "$URL"
}

cmd_down() {
  ensure_cache
  lock_run
  stop_server TERM
  if [[ -f "$STORE_REF" ]]; then
    local store; store="$(cat "$STORE_REF")"
    case "$store" in
      "$RUN_DIR"/store.*) rm -rf -- "$store" ;;
      *) log "not removing unexpected store path '$store'" ;;
    esac
    rm -f "$STORE_REF"
  fi
  log "down"
}

parse_hard() { if [[ "${1:-}" == "--hard" ]]; then echo KILL; else echo TERM; fi; }

cmd_stop() {
  ensure_cache
  lock_run
  stop_server "$(parse_hard "${1:-}")"
  [[ -f "$STORE_REF" ]] && log "stopped; store kept at $(cat "$STORE_REF")"
}

cmd_restart_keep_data() {
  ensure_cache
  lock_run
  local sig; sig="$(parse_hard "${1:-}")"
  [[ -f "$STORE_REF" && -d "$(cat "$STORE_REF")" ]] || log "no existing store; starting fresh"
  stop_server "$sig"
  start_server
  echo "$URL"
}

cmd_status() {
  ensure_cache
  local pid; pid="$(read_pid)"
  local store="-"; [[ -f "$STORE_REF" ]] && store="$(cat "$STORE_REF")"
  local bin="-"; bin="$(server_bin || echo 'not installed')"
  echo "url:      $URL"
  echo "monitor:  http://$HOST:$MPORT"
  echo "binary:   $bin${bin:+ ($(bin_version "$bin" 2>/dev/null || true))}"
  echo "pinned:   $NATS_SERVER_VERSION"
  if [[ -n "$pid" ]] && pid_alive "$pid"; then echo "pid:      $pid (running)"; else echo "pid:      - (not started by this script)"; fi
  echo "store:    $store"
  echo "log:      $LOG_FILE"
  if healthy; then echo "health:   ok"; return 0; else echo "health:   DOWN"; return 1; fi
}

cmd_logs() {
  [[ -f "$LOG_FILE" ]] || die "no log at $LOG_FILE"
  if [[ "${1:-}" == "-f" ]]; then exec tail -n "${2:-100}" -F "$LOG_FILE"; fi
  tail -n "${1:-100}" "$LOG_FILE"
}

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

main() {
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    install) cmd_install ;;
    up|start) cmd_up ;;
    down) cmd_down ;;
    stop) cmd_stop "$@" ;;
    restart-keep-data|restart) cmd_restart_keep_data "$@" ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    url) echo "$URL" ;;
    pid) p="$(read_pid)"; pid_alive "$p" && echo "$p" || exit 1 ;;
    binary) ensure_cache; server_bin || { cmd_install; server_bin; } ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
