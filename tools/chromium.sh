#!/usr/bin/env bash
# Makes sure Debian's chromium is installed (the report test renders keybus bench's
# report.html in it, headless) and prints its path. Installs it with apt-get when it is
# missing and we may (root, or sudo without a password); apt's output goes to stderr.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "tools/chromium.sh: chromium is missing and installing it needs root" >&2
        exit 1
    fi
    echo "tools/chromium.sh: installing chromium (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium >&2
fi
command -v chromium
