#!/bin/sh
# Install headless Chromium for the browser tests (tests/test_plots_offline.py,
# tests/test_report_layout.py) unless one is already there.
# Idempotent; needs root (or sudo) and a Debian/Ubuntu apt source the first time only.
set -eu
for b in chromium chromium-browser; do
    if command -v "$b" >/dev/null 2>&1; then
        exit 0
    fi
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"  # never prompt: make test must not hang
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
command -v chromium
