#!/usr/bin/env bash
# Secured nats-servers (JetStream) for keybus's security tests, beside the plain one of
# nats.sh. One authorization form per server (nats-server takes one per port):
#
#   base+0  auth    plain TCP; a user/password user and an NKey user
#   base+1  token   plain TCP; a token
#   base+2  tls     TLS (private CA); a user/password user
#   base+3  mtls    TLS, client certificates verified (verify: true)
#   base+4  creds   TLS; decentralised auth (operator, account with JetStream, .creds)
#
# Every secret is new on each `up`: a throw-away CA and certificates (openssl), random
# passwords and tokens, NKeys and JWTs (tools/nats/natsauth, a small Go helper built once
# into .cache/nats/bin). All of it lives under .cache (git-ignored), and the endpoints and
# secrets are written to <run dir>/secured.json, which the tests read.
#
#   tools/nats/secured.sh up       start (idempotent); prints the path of secured.json
#   tools/nats/secured.sh down     stop and delete everything generated
#   tools/nats/secured.sh status   exit 0 if every server is healthy
#   tools/nats/secured.sh logs     tail every server's log
#
# Environment:
#   KEYBUS_NATS_SECURED_PORT   first client port (default 4223; monitors at port + 4000)
#   KEYBUS_NATS_START_TIMEOUT  seconds to wait for readiness (default 30)
set -euo pipefail
umask 077  # the run dir holds the throw-away secrets

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
CACHE_DIR="$REPO_ROOT/.cache"
NATS_DIR="$CACHE_DIR/nats"
BIN_DIR="$NATS_DIR/bin"
NATSAUTH_BIN="$BIN_DIR/natsauth"
BASE="${KEYBUS_NATS_SECURED_PORT:-4223}"
if [[ "$BASE" == 4223 ]]; then RUN_DIR="$NATS_DIR/run-secured"; else RUN_DIR="$NATS_DIR/run-secured-$BASE"; fi
START_TIMEOUT="${KEYBUS_NATS_START_TIMEOUT:-30}"
HOST=127.0.0.1
SERVERS=(auth token tls mtls creds)

log() { echo "secured.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

port_of() {
  local i
  for i in "${!SERVERS[@]}"; do [[ "${SERVERS[$i]}" == "$1" ]] && { echo $((BASE + i)); return; }; done
  die "unknown server $1"
}

tcp_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

healthy() {   # $1 = server name: JetStream up and its assets recovered
  local mport=$(( $(port_of "$1") + 4000 ))
  curl -sS --max-time 2 "http://$HOST:$mport/healthz" 2>/dev/null | grep -q '"status": *"ok"'
}

pid_alive() {
  [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q nats-server
}

server_pid() { [[ -f "$RUN_DIR/$1.pid" ]] && tr -dc '0-9' <"$RUN_DIR/$1.pid" || true; }

# The Go helper, built once (the module cache is the one nats.sh builds nats-server with).
natsauth() {
  local src="$SCRIPT_DIR/natsauth" stamp
  stamp="$(cat "$src/main.go" "$src/go.mod" "$src/go.sum" | sha256sum | cut -c1-16)"
  if [[ ! -x "$NATSAUTH_BIN" || "$(cat "$NATSAUTH_BIN.stamp" 2>/dev/null)" != "$stamp" ]]; then
    local go; go="$(command -v go || echo /usr/local/go/bin/go)"
    log "building natsauth ..."
    (cd "$src" && env GOPATH="$CACHE_DIR/go" GOMODCACHE="$CACHE_DIR/go/mod" GOCACHE="$CACHE_DIR/go/build" \
       GOFLAGS="-modcacherw -buildvcs=false" CGO_ENABLED=0 "$go" build -o "$NATSAUTH_BIN" .) \
      || die "building tools/nats/natsauth failed"
    echo "$stamp" >"$NATSAUTH_BIN.stamp"
  fi
  "$NATSAUTH_BIN" "$@"
}

# A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate.
make_certs() {
  local d="$RUN_DIR/certs"
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=keybus test CA" -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  local who
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=keybus-$who" \
      -keyout "$d/$who.key" -out "$d/$who.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=%s\n' \
      "$([[ $who == server ]] && echo serverAuth || echo clientAuth)" >"$d/$who.ext"
    openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
      -days 2 -extfile "$d/$who.ext" -out "$d/$who.pem" 2>/dev/null
  done
  chmod 600 "$d"/*.key
}

# Recognisable (the canary tests look for them in logs), and new on each run.
secret() { echo "kb-canary-$1-$(openssl rand -hex 12)"; }

# Writes every server's config and secured.json (once per `up` from scratch).
generate() {
  rm -rf "$RUN_DIR/certs" "$RUN_DIR/ids" "$RUN_DIR"/*.conf
  make_certs
  natsauth "$RUN_DIR/ids"
  local c="$RUN_DIR/certs" i="$RUN_DIR/ids" password token
  password="$(secret password)"; token="$(secret token)"
  local tls="tls { cert_file: \"$c/server.pem\", key_file: \"$c/server.key\", ca_file: \"$c/ca.pem\", timeout: 5"
  local users="authorization { users = [ {user: svc, password: \"$password\"}, {nkey: $(cat "$i/nkey.pub")} ] }"
  echo "$users" >"$RUN_DIR/auth.conf"
  echo "authorization { token: \"$token\" }" >"$RUN_DIR/token.conf"
  printf '%s }\n%s\n' "$tls" "authorization { users = [ {user: svc, password: \"$password\"} ] }" >"$RUN_DIR/tls.conf"
  printf '%s, verify: true }\n' "$tls" >"$RUN_DIR/mtls.conf"
  { printf '%s }\n' "$tls"; cat "$i/operator.conf"; } >"$RUN_DIR/creds.conf"
  local name port
  for name in "${SERVERS[@]}"; do
    port="$(port_of "$name")"
    printf 'listen: "%s:%s"\nhttp: "%s:%s"\nserver_name: keybus-%s-%s\njetstream { store_dir: "%s" }\n' \
      "$HOST" "$port" "$HOST" $((port + 4000)) "$name" "$port" "$RUN_DIR/store-$name" >>"$RUN_DIR/$name.conf"
  done
  python3 - "$RUN_DIR" "$BASE" "$password" "$token" <<'EOF' >"$RUN_DIR/secured.json.tmp"
import json, sys
run, base, password, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
certs, ids = f"{run}/certs", f"{run}/ids"
def read(name):
    with open(f"{ids}/{name}") as f:
        return f.read().strip()
print(json.dumps({
    "auth": {"url": f"nats://127.0.0.1:{base}", "user": "svc", "password": password,
             "nkey_seed": read("nkey.seed"), "nkey_seed_file": f"{ids}/nkey.seed",
             "stranger_seed": read("stranger.seed")},
    "token": {"url": f"nats://127.0.0.1:{base + 1}", "token": token},
    "tls": {"url": f"tls://127.0.0.1:{base + 2}", "ca_file": f"{certs}/ca.pem",
            "user": "svc", "password": password},
    "mtls": {"url": f"tls://127.0.0.1:{base + 3}", "ca_file": f"{certs}/ca.pem",
             "cert_file": f"{certs}/client.pem", "key_file": f"{certs}/client.key"},
    "creds": {"url": f"tls://127.0.0.1:{base + 4}", "ca_file": f"{certs}/ca.pem",
              "credentials": f"{ids}/user.creds", "stranger_credentials": f"{ids}/stranger.creds"},
}, indent=2))
EOF
  mv "$RUN_DIR/secured.json.tmp" "$RUN_DIR/secured.json"
}

start() {   # $1 = server name; not running
  local name="$1" bin port
  bin="$("$SCRIPT_DIR/nats.sh" binary)"
  port="$(port_of "$name")"
  tcp_open "$port" && die "port $HOST:$port is in use by something not started here"
  mkdir -p "$RUN_DIR/store-$name"
  # Detached like nats.sh's server: new session, no inherited descriptors but 0-2.
  (
    for fd in /proc/"$BASHPID"/fd/*; do
      fd="${fd##*/}"
      if [[ "$fd" =~ ^[0-9]+$ ]] && (( fd > 2 )); then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid "$bin" -c "$RUN_DIR/$name.conf" -P "$RUN_DIR/$name.pid" </dev/null >>"$RUN_DIR/$name.log" 2>&1
  ) &
  echo $! >"$RUN_DIR/$name.pid"
}

stop() {   # $1 = server name
  local pid; pid="$(server_pid "$1")"
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while pid_alive "$pid" && (( SECONDS < deadline )); do sleep 0.1; done
    pid_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$RUN_DIR/$1.pid"
}

all_healthy() { local n; for n in "${SERVERS[@]}"; do healthy "$n" || return 1; done; }

cmd_up() {
  mkdir -p "$RUN_DIR"
  exec 9>"$RUN_DIR/.lock"; flock -w 120 9 || die "could not get lock"
  if [[ -f "$RUN_DIR/secured.json" ]] && all_healthy; then echo "$RUN_DIR/secured.json"; return 0; fi
  local n; for n in "${SERVERS[@]}"; do stop "$n"; rm -rf "$RUN_DIR/store-$n"; done
  local t0=$SECONDS
  generate
  for n in "${SERVERS[@]}"; do start "$n"; done
  local deadline=$((SECONDS + START_TIMEOUT))
  until all_healthy; do
    for n in "${SERVERS[@]}"; do
      pid_alive "$(server_pid "$n")" || { tail -n 20 "$RUN_DIR/$n.log" >&2; die "nats-server $n exited during startup"; }
    done
    (( SECONDS < deadline )) || die "secured nats-servers not ready after ${START_TIMEOUT}s (logs in $RUN_DIR)"
    sleep 0.1
  done
  log "secured nats-servers on $HOST:$BASE-$((BASE + ${#SERVERS[@]} - 1)) ready in $((SECONDS - t0))s"
  echo "$RUN_DIR/secured.json"
}

cmd_down() {
  [[ -d "$RUN_DIR" ]] || return 0
  exec 9>"$RUN_DIR/.lock"; flock -w 120 9 || die "could not get lock"
  local n; for n in "${SERVERS[@]}"; do stop "$n"; done
  rm -rf "$RUN_DIR/certs" "$RUN_DIR/ids" "$RUN_DIR"/store-* "$RUN_DIR"/*.conf "$RUN_DIR/secured.json"
  log "down"
}

cmd_status() {
  local n ok=0
  for n in "${SERVERS[@]}"; do
    if healthy "$n"; then echo "$n: ok ($HOST:$(port_of "$n"))"; else echo "$n: DOWN"; ok=1; fi
  done
  return $ok
}

cmd_logs() { local n; for n in "${SERVERS[@]}"; do echo "---- $n ----"; tail -n "${1:-20}" "$RUN_DIR/$n.log" 2>/dev/null || true; done; }

case "${1:-}" in
  up|start) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  logs) shift; cmd_logs "$@" ;;
  *) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
