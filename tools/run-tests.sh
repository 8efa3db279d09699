#!/usr/bin/env bash
# Runs the pytest suite against the backends in KEYBUS_BACKENDS, starting the brokers it
# needs (and stopping again those it started). On failure, prints the brokers' log tails.
set -euo pipefail
cd "$(dirname "$0")/.."

backends=${KEYBUS_BACKENDS:-memory,kafka,nats}
started=()

cleanup() {
    for b in "${started[@]}"; do
        "tools/$b/$b.sh" down >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT

for b in kafka nats; do
    if [[ ",$backends," == *",$b,"* ]]; then
        if ! "tools/$b/$b.sh" status >/dev/null 2>&1; then
            started+=("$b")
        fi
        echo "starting $b: $("tools/$b/$b.sh" up)"
    fi
done

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
fi
exit $status
