#!/usr/bin/env bash
# Runs the pytest suite against the backends in KEYBUS_BACKENDS, starting the brokers it
# needs (and stopping again those it started). On failure, prints the brokers' log tails.
set -euo pipefail
cd "$(dirname "$0")/.."

backends=${KEYBUS_BACKENDS:-memory,kafka,nats}
started=()

cleanup() {
    for script in "${started[@]}"; do
        "$script" down >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

for b in kafka nats; do
    if [[ ",$backends," == *",$b,"* ]]; then
        if ! "tools/$b/$b.sh" status >/dev/null 2>&1; then
            started+=("tools/$b/$b.sh")
        fi
        echo "starting $b: $("tools/$b/$b.sh" up)"
    fi
done
# Beside the plain nats-server, the secured ones (TLS, passwords, tokens, NKeys, .creds)
# of the security tests; they find them through the file the script writes.
if [[ ",$backends," == *",nats,"* ]]; then
    if ! tools/nats/secured.sh status >/dev/null 2>&1; then
        started+=(tools/nats/secured.sh)
    fi
    if KEYBUS_NATS_SECURED="$(tools/nats/secured.sh up)"; then
        export KEYBUS_NATS_SECURED
        echo "starting secured nats-servers: $KEYBUS_NATS_SECURED"
    else
        # The rest of the suite still runs; the security tests say why they skip.
        echo "WARNING: the secured nats-servers did not start (tools/nats/secured.sh up)" >&2
    fi
fi

export KEYBUS_CHROMIUM="$(tools/chromium.sh || echo "missing (tools/chromium.sh failed)")"
status=0
KEYBUS_BACKENDS=$backends .venv/bin/pytest -q -ra "$@" || status=$?
if [[ $status -ne 0 ]]; then
    for b in kafka nats; do
        if [[ ",$backends," == *",$b,"* ]]; then
            echo "---- last lines of the $b log ----"
            "tools/$b/$b.sh" logs 2>/dev/null | tail -n 60 || true
        fi
    done
    if [[ ",$backends," == *",nats,"* ]]; then
        echo "---- last lines of the secured nats-servers' logs ----"
        tools/nats/secured.sh logs 10 2>/dev/null || true
    fi
fi
exit $status
