#!/usr/bin/env bash
# Set everything up (a virtual environment in .venv with the pinned CPU torch, this package, the test-only
# reference `moshi`) and run the test suite. Extra arguments go to pytest, e.g. `scripts/test.sh -k mimi`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# System packages some tests use (a headless browser for the web client, HAProxy in front of two servers).
# Best effort: without them, those tests skip with a reason.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
        { ! command -v chromium >/dev/null || ! { command -v haproxy || [ -x /usr/sbin/haproxy ]; } >/dev/null; }; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core haproxy >/dev/null) \
        || echo "note: could not install chromium/haproxy; browser and load-balancer tests will skip"
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned, so nothing below can pull another build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test,eval,quant]"
# The reference implementation, used only by the tests as an oracle. It pins an older torch: no deps.
"${PIP[@]}" --no-deps "moshi==0.2.13"
exec .venv/bin/python -m pytest "$@"
