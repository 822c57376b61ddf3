#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the report test (tests/test_report.py renders
# report.html in it). Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or sudo)
# and apt; on other systems install Chromium yourself and the test finds /usr/bin/chromium.
# The Python side (websocket-client, for the DevTools protocol) is in the [dev] extra.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: apt-get not found; install Chromium so that /usr/bin/chromium exists" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_chromium: run as root (or install sudo): apt-get install -y chromium" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
