#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on the CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Headless Chromium renders the HTML report in tests/test_report.py (Debian's package).
bash scripts/install_chromium.sh >/dev/null 2>&1 || echo "warning: could not install chromium; the report rendering test will be skipped" >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here (the suite must never be empty)" >&2
  exit 1
fi
exit "$rc"
