#!/usr/bin/env bash
# Install everything the server and its test suite need on a fresh Debian/Ubuntu machine:
# the Python package (editable, in a mode twistd's plugin scan can see) with test extras, and the
# third-party peers the interop tests drive (mosquitto, mbpoll, ssh, openssl).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
    need=""
    for pkg in mosquitto mosquitto-clients mbpoll openssh-client openssl; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
    done
    if [ -n "$need" ]; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
    fi
    # mosquitto's Debian package starts a broker on 1883; tests start their own on free ports.
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

# node-opcua: a second OPC UA stack for the interop tests (skipped where npm is missing).
if command -v npm >/dev/null 2>&1 && [ ! -d .interop/nodeopcua/node_modules/node-opcua-client ]; then
    mkdir -p .interop/nodeopcua
    (cd .interop/nodeopcua && npm install --no-audit --no-fund --loglevel=error \
        node-opcua-client@2 >/dev/null) || echo "bootstrap: node-opcua not installed (interop test will skip)"
fi

PY=${PYTHON:-python3}
# editable_mode=compat: the default editable install uses an import hook that Twisted's plugin
# scan cannot see, and `twistd --help` would not list iotserver (facts.md).
$PY -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
# Regenerate twisted's dropin.cache so the first twistd run does not have to.
$PY -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
echo "bootstrap: done"
