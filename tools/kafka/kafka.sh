#!/usr/bin/env bash
# Local single-node Apache Kafka broker (KRaft, combined broker+controller) for keybus tests.
#
#   tools/kafka/kafka.sh up       start (idempotent), print kafka://127.0.0.1:PORT
#   tools/kafka/kafka.sh down     stop what `up` started, remove its data (idempotent)
#   tools/kafka/kafka.sh status   exit 0 (and print the URL) if a broker answers
#   tools/kafka/kafka.sh logs [N] print the last N (default 100) lines of the broker log
#   tools/kafka/kafka.sh fetch    only download the jars (Maven Central -> .cache/)
#   tools/kafka/kafka.sh stop     stop the broker, keep its data (fault-injection tests)
#   tools/kafka/kafka.sh start    start again on the data `stop` kept (like `up` otherwise)
#   tools/kafka/kafka.sh pid      print the broker's pid (exit 1 if none runs): to freeze it
#
# Jars come from Maven Central through tools/kafka/pom.xml; everything downloaded or
# written lives under <repo>/.cache/ (Maven repo in .cache/m2, jars in
# .cache/kafka/<version>/libs, runtime state in .cache/kafka/run).
#
# Environment:
#   KEYBUS_KAFKA_PORT             client port (default 9092; controller = PORT+1)
#   KEYBUS_KAFKA_CONTROLLER_PORT  controller port (default PORT+1)
#   KEYBUS_KAFKA_VERSION          Kafka release from Maven Central (default pinned below)
#   KEYBUS_KAFKA_START_TIMEOUT    seconds to wait for the broker to answer (default 90)
#   KEYBUS_KAFKA_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL on `down` (default 20)
#   KEYBUS_KAFKA_JVM_OPTS         replaces the default broker JVM flags
#   KEYBUS_KAFKA_CDS=0            do not use/create the class-data-sharing archive
#   KEYBUS_KAFKA_WARMUP=0         skip creating the internal topics during `up`
#   KEYBUS_KAFKA_PROPERTIES       extra server.properties lines (newline-separated), appended
#   KEYBUS_KAFKA_SECURED=0        no secured client listeners (TLS, mutual TLS, SASL_SSL with
#                                 SCRAM-SHA-512, SASL_PLAINTEXT with PLAIN; see secured.sh)
#   KEYBUS_KAFKA_SECURED_PORT     the first secured listener's port (default PORT+2; PORT+2..5)
set -euo pipefail

KAFKA_VERSION_DEFAULT=4.3.1

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
CACHE="$ROOT/.cache"

VERSION="${KEYBUS_KAFKA_VERSION:-$KAFKA_VERSION_DEFAULT}"
HOST=127.0.0.1
PORT="${KEYBUS_KAFKA_PORT:-9092}"
CPORT="${KEYBUS_KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
START_TIMEOUT="${KEYBUS_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KEYBUS_KAFKA_STOP_TIMEOUT:-20}"
URL="kafka://$HOST:$PORT"

LIBS="$CACHE/kafka/$VERSION/libs"
if [[ "$PORT" == 9092 ]]; then RUN="$CACHE/kafka/run"; else RUN="$CACHE/kafka/run-$PORT"; fi
DATA="$RUN/data"
LOG="$RUN/server.log"
PIDFILE="$RUN/kafka.pid"
PROPS="$RUN/server.properties"
LOG4J="$RUN/log4j2.properties"

# Lean JVM for a small test broker: small heap, serial GC (2 cores, tiny heap: no
# concurrent GC threads to feed), C1 only (quicker start; a test broker moves little
# data), no hsperfdata files. On top of these, an AppCDS archive (below).
JVM_OPTS_DEFAULT="-Xms256m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData -Djava.awt.headless=true"
# Short-lived tool JVM (storage format).
TOOL_JVM_OPTS="-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData"

# AppCDS: the first broker run dumps the classes it loaded into a dynamic archive when
# it exits (on `down`); later runs map it and start ~1.5 s faster. The archive is tied
# to the JVM build and to the classpath, so its name carries a key of both; an unusable
# archive is only a warning (-Xshare:auto) and the JVM loads classes normally.
CDS_PENDING="$RUN/cds.pending"

# shellcheck source=tools/kafka/secured.sh
source "$SCRIPT_DIR/secured.sh"

die() { echo "kafka.sh: $*" >&2; exit 1; }
say() { echo "kafka.sh: $*" >&2; }

ensure_cache() {
  mkdir -p "$CACHE"
  # .cache/ ignores itself, so nothing here is ever committed.
  [[ -f "$CACHE/.gitignore" ]] || printf '*\n' >"$CACHE/.gitignore"
}

# Serialize up/down for one port (parallel test runners may call `up` together).
# The lock fd must not leak into the broker: it is closed on the java command line.
take_lock() {
  ensure_cache
  mkdir -p "$CACHE/kafka"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/kafka/.lock-$PORT"
    flock -w "$((START_TIMEOUT + STOP_TIMEOUT + 600))" 9 || die "timed out waiting for lock $CACHE/kafka/.lock-$PORT"
  fi
}

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then command -v java
  else die "java not found (need Java 17+: apt-get install openjdk-17-jre-headless)"; fi
}

# --- download ---------------------------------------------------------------------------
fetch() {
  ensure_cache
  [[ -f "$LIBS/.complete" ]] && return 0
  command -v mvn >/dev/null 2>&1 || die "mvn not found (apt-get install maven)"
  say "fetching Kafka $VERSION jars from Maven Central into ${LIBS#"$ROOT"/} ..."
  local t0=$SECONDS tmp="$LIBS.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$CACHE/m2"
  if ! mvn -q -B -Dstyle.color=never -f "$SCRIPT_DIR/pom.xml" \
        -Dmaven.repo.local="$CACHE/m2" \
        -Dkafka.version="$VERSION" -Dkafka.libs="$tmp" \
        dependency:copy-dependencies >"$CACHE/kafka/mvn-$VERSION.log" 2>&1; then
    tail -n 40 "$CACHE/kafka/mvn-$VERSION.log" >&2
    rm -rf "$tmp"
    die "maven could not resolve Kafka $VERSION (log: $CACHE/kafka/mvn-$VERSION.log)"
  fi
  ls "$tmp"/kafka_2.13-"$VERSION".jar >/dev/null 2>&1 || die "kafka_2.13-$VERSION.jar missing after maven run"
  touch "$tmp/.complete"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  say "fetched $(find "$LIBS" -name "*.jar" | wc -l) jars in $((SECONDS - t0)) s"
}

# --- probing ----------------------------------------------------------------------------
tcp_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Kafka-protocol check: ApiVersions, then Metadata must list at least one broker.
# Exit 0: a Kafka broker answers; 2: TCP open but not (yet) a serving Kafka broker;
# 1: nothing listens.
# probe warm: also ask for the group and the transaction coordinators until both are
# there, and for a producer id, so the broker creates __consumer_offsets and
# __transaction_state and fetches its first producer-id block now, rather than in a
# test's first group join / transaction / idempotent produce (where clients back off
# for 0.5-3 s on COORDINATOR_LOAD_IN_PROGRESS).
probe() {
  local mode="${1:-check}" py
  if ! py="$(python_bin)"; then
    [[ "$mode" == warm ]] && return 0
    tcp_open "$PORT" || return 1
    # No python: fall back to our own log saying the server started.
    grep -q "Kafka Server started" "$LOG" 2>/dev/null && return 0 || return 2
  fi
  "$py" -I -S - "$HOST" "$PORT" "$mode" <<'PY'
import socket, struct, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    s = socket.create_connection((host, port), timeout=2)
except OSError:
    sys.exit(1)
corr = 0
def call(api_key, version, body=b""):
    global corr
    corr += 1
    cid = b"keybus-probe"
    req = struct.pack(">hhih", api_key, version, corr, len(cid)) + cid + body
    s.sendall(struct.pack(">i", len(req)) + req)
    def read(n):
        buf = b""
        while len(buf) < n:
            c = s.recv(n - len(buf))
            if not c: raise OSError("connection closed")
            buf += c
        return buf
    data = read(struct.unpack(">i", read(4))[0])
    if struct.unpack(">i", data[:4])[0] != corr: raise OSError("bad correlation id")
    return data[4:]
try:
    s.settimeout(3)
    r = call(18, 0)                                  # ApiVersions v0
    if struct.unpack(">h", r[:2])[0] != 0: sys.exit(2)
    r = call(3, 1, struct.pack(">i", -1))            # Metadata v1, all topics
    if struct.unpack(">i", r[:4])[0] < 1: sys.exit(2)  # no broker registered yet
    if mode == "warm":
        key = b"keybus-warmup"
        for key_type in (0, 1):                      # 0: group, 1: transaction
            deadline = time.monotonic() + 30
            while True:                              # FindCoordinator v1
                r = call(10, 1, struct.pack(">h", len(key)) + key + struct.pack(">b", key_type))
                if struct.unpack(">h", r[4:6])[0] == 0: break
                if time.monotonic() > deadline: sys.exit(2)
                time.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:    # InitProducerId v0, no transactional id: the idempotent-producer id block
            r = call(22, 0, struct.pack(">hi", -1, 60000))
            if struct.unpack(">h", r[4:6])[0] == 0: break
            if time.monotonic() > deadline: sys.exit(2)
            time.sleep(0.1)
    sys.exit(0)
except (OSError, struct.error):
    sys.exit(2)
finally:
    s.close()
PY
}

python_bin() {
  # The system python first: a pyenv shim costs ~100 ms per call.
  local p
  for p in /usr/bin/python3 /usr/local/bin/python3 "$(command -v python3 2>/dev/null || true)"; do
    [[ -n "$p" && -x "$p" ]] && { echo "$p"; return 0; }
  done
  return 1
}

cds_archive() {
  local java="$1" real key
  real="$(readlink -f "$java")"
  key="$(printf '%s %s %s' "$real" "$(stat -c '%s %Y' "$real")" "$LIBS" | cksum | cut -d' ' -f1)"
  echo "$CACHE/kafka/$VERSION/cds/kafka-$key.jsa"
}

pid_alive() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Only a process that is really our broker (guards against pid reuse).
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $PROPS" || return 1
  echo "$pid"
}

# --- config -----------------------------------------------------------------------------
write_config() {
  cat >"$PROPS" <<EOF
# Written by tools/kafka/kafka.sh: single-node KRaft broker+controller for tests.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CPORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CPORT$(secured_listeners)
advertised.listeners=PLAINTEXT://$HOST:$PORT$(secured_listeners)
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT$(secured_protocols)
log.dirs=$DATA

# Single node: every internal topic with one replica and one partition (fast creation).
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1

# Fast groups for tests: no initial rebalance delay, short session timeouts allowed.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=1000
group.consumer.min.heartbeat.interval.ms=500

# Small footprint: 2 cores, 512 MiB heap, throwaway data.
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=8388608
log.segment.bytes=1048576
log.index.size.max.bytes=1048576
log.retention.hours=24
log.flush.interval.messages=9223372036854775807
$(secured_config)
EOF
  if [[ -n "${KEYBUS_KAFKA_PROPERTIES:-}" ]]; then
    printf '\n# From KEYBUS_KAFKA_PROPERTIES\n%s\n' "$KEYBUS_KAFKA_PROPERTIES" >>"$PROPS"
  fi

  cat >"$LOG4J" <<EOF
# Written by tools/kafka/kafka.sh: everything to one file.
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $LOG
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
}

random_cluster_id() {
  # A Kafka Uuid: 16 random bytes, URL-safe base64 without padding (22 chars). It may
  # start with "-": pass it as --cluster-id=<id>, or the tool takes it for an option.
  head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'
}

# --- commands ---------------------------------------------------------------------------
stop_broker() {
  local pid clean=0
  if pid="$(pid_alive)"; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      say "broker pid $pid ignored SIGTERM for ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    else
      clean=1
    fi
  fi
  rm -f "$PIDFILE"
  # A broker that exited by itself has written its class-data archive: keep it.
  if [[ -f "$CDS_PENDING" ]]; then
    local target
    target="$(cat "$CDS_PENDING")"
    if ((clean)) && [[ -s "$RUN/kafka.jsa.tmp" ]]; then
      mkdir -p "$(dirname "$target")"
      mv -f "$RUN/kafka.jsa.tmp" "$target"
    fi
    rm -f "$CDS_PENDING" "$RUN/kafka.jsa.tmp"
  fi
}

cmd_up() {
  take_lock
  local rc=0
  probe || rc=$?
  if ((rc == 0)); then echo "$URL"; return 0; fi

  local stale
  if stale="$(pid_alive)"; then
    say "broker pid $stale is running but not answering: restarting it"
    stop_broker
  elif ((rc == 2)); then
    die "something on $HOST:$PORT is not a Kafka broker we can use (set KEYBUS_KAFKA_PORT)"
  fi
  tcp_open "$CPORT" && die "controller port $HOST:$CPORT is already in use (set KEYBUS_KAFKA_CONTROLLER_PORT)"
  if secured_on; then
    local sp
    for sp in "$SPORT" "$((SPORT + 1))" "$((SPORT + 2))" "$((SPORT + 3))"; do
      tcp_open "$sp" && die "secured listener port $HOST:$sp is already in use (set KEYBUS_KAFKA_SECURED_PORT or KEYBUS_KAFKA_SECURED=0)"
    done
  fi

  fetch
  local java t0=$SECONDS keep=0
  java="$(java_bin)"
  # `start`: bring a stopped broker back on its existing data (fault-injection tests).
  [[ "${KEEP_DATA:-0}" == 1 && -f "$DATA/meta.properties" ]] && keep=1
  ((keep)) || rm -rf "$DATA"
  mkdir -p "$RUN" "$DATA"
  [[ -f "$LOG" ]] && ((!keep)) && mv -f "$LOG" "$LOG.1"
  # Fresh certificates and passwords with fresh data; a resumed broker keeps both (its
  # metadata holds the SCRAM credential).
  secured_check
  if secured_on && { ((!keep)) || [[ ! -f "$SDIR/scram.password" ]]; }; then secured_make; fi
  secured_on || rm -rf "$SDIR" "$SJSON"  # no stale description of listeners that are not there
  write_config

  local cds_use="" cds_dump="" jsa
  rm -f "$CDS_PENDING" "$RUN/kafka.jsa.tmp"
  if [[ "${KEYBUS_KAFKA_CDS:-1}" != 0 ]]; then
    jsa="$(cds_archive "$java")"
    if [[ -s "$jsa" ]]; then
      cds_use="-Xshare:auto -XX:SharedArchiveFile=$jsa"
    else
      cds_dump="-Xshare:auto -XX:ArchiveClassesAtExit=$RUN/kafka.jsa.tmp -Xlog:cds=error,cds+dynamic=error"
      echo "$jsa" >"$CDS_PENDING"
    fi
  fi

  local cid scram=()
  cid="$(random_cluster_id)"
  mapfile -t scram < <(secured_format_args)
  # shellcheck disable=SC2086
  if ((!keep)) && ! "$java" $TOOL_JVM_OPTS $cds_use -Dlog4j2.configurationFile="$LOG4J" -cp "$LIBS/*" \
        kafka.tools.StorageTool format --cluster-id="$cid" --config "$PROPS" "${scram[@]}" \
        >>"$LOG" 2>&1 </dev/null 9>&-; then
    tail -n 40 "$LOG" >&2
    die "formatting the storage in $DATA failed"
  fi

  secured_ready
  local opts="${KEYBUS_KAFKA_JVM_OPTS:-$JVM_OPTS_DEFAULT}"
  # setsid: the broker outlives this script and the caller's process group.
  # shellcheck disable=SC2086
  setsid "$java" $opts $cds_use $cds_dump -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$RUN" \
    -cp "$LIBS/*" kafka.Kafka "$PROPS" >>"$LOG" 2>&1 </dev/null 9>&- &
  local pid=$!
  echo "$pid" >"$PIDFILE"

  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      echo "---- last lines of $LOG ----" >&2
      tail -n 60 "$LOG" >&2
      die "the broker exited during startup"
    fi
    rc=0
    probe || rc=$?
    if ((rc == 0)); then break; fi
    if ((SECONDS >= deadline)); then
      echo "---- last lines of $LOG ----" >&2
      tail -n 60 "$LOG" >&2
      rm -f "$CDS_PENDING"   # a half-started broker's class list is not worth keeping
      stop_broker
      die "the broker did not answer on $HOST:$PORT within ${START_TIMEOUT}s"
    fi
    sleep 0.2
  done
  [[ "${KEYBUS_KAFKA_WARMUP:-1}" == 0 ]] || probe warm || say "warning: the group/transaction coordinators did not come up (first group join may be slow)"
  secured_wait
  secured_describe
  say "Kafka $VERSION up in $((SECONDS - t0)) s (pid $pid, log ${LOG#"$ROOT"/})"
  echo "$URL"
}

cmd_down() {
  take_lock
  stop_broker
  rm -rf "$DATA" "$SDIR" "$SJSON"
}

# `stop`: stop the broker but keep its data, so `start` resumes it (unlike `down`).
cmd_stop() {
  take_lock
  stop_broker
}

cmd_status() {
  if probe; then echo "$URL"; return 0; fi
  return 1
}

cmd_logs() {
  local n="${1:-100}"
  [[ -f "$LOG" ]] || die "no log at $LOG (never started?)"
  tail -n "$n" "$LOG"
}

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  stop) cmd_stop ;;
  start) KEEP_DATA=1 cmd_up ;;
  status) cmd_status ;;
  pid) pid_alive || exit 1 ;;
  logs) shift; cmd_logs "$@" ;;
  fetch) fetch ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
