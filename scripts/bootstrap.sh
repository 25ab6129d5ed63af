#!/usr/bin/env bash
# Install everything the server and its test suite need on a fresh Debian/Ubuntu machine:
#   - a virtual environment in the checkout (.venv), made with the first python3 on PATH; Debian's
#     own python3 is "externally managed" (PEP 668) and refuses pip installs outside a venv;
#   - the package in it (editable, in a mode twistd's plugin scan can see) with its test extras,
#     at the versions CI tested (scripts/constraints.txt);
#   - the third-party peers the interop tests drive: mosquitto, mbpoll, ssh, openssl, systemd (apt) and
#     node-opcua (npm, exact version from scripts/nodeopcua/package-lock.json).
# Afterwards `.venv/bin/twistd -n --reactor=asyncio iotserver` runs the server and
# `.venv/bin/python -m pytest` the tests; no activation needed. Any install that fails stops
# the script with a non-zero status: a peer that is not there would only turn into a failing
# (under CI=true) or skipped test later.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "bootstrap: $*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
APT_UPDATED=""
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "cannot install $* (no apt-get): install it yourself"
    if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq || die "apt-get update failed"; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed"
}

# --- peers from apt ------------------------------------------------------------------------
need=""
for pkg in mosquitto mosquitto-clients mbpoll openssh-client openssl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
# node and npm: any installation will do (Debian's nodejs/npm, or NodeSource's bundled npm).
command -v node >/dev/null 2>&1 || need="$need nodejs"
command -v npm >/dev/null 2>&1 || need="$need npm"
# systemd-analyze checks scripts/iotserver.service (containers may lack systemd).
command -v systemd-analyze >/dev/null 2>&1 || need="$need systemd"
# shellcheck disable=SC2086
if [ -n "$need" ]; then apt_install $need; fi
# mosquitto's Debian package starts a broker on 1883; tests start their own on free ports.
$SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
for tool in mosquitto mosquitto_pub mosquitto_sub mosquitto_rr mbpoll ssh ssh-keygen openssl node npm \
        systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not on PATH after the install"
done

# --- node-opcua, pinned ----------------------------------------------------------------------
# The exact version and its whole dependency tree are in the lock file; `npm ci` installs exactly
# that (and fails rather than resolve anything anew).
NODE_DIR=.interop/nodeopcua
pin=$(sed -n 's/.*"node-opcua-client": *"\([0-9.]*\)".*/\1/p' scripts/nodeopcua/package.json)
have=""
if [ -f "$NODE_DIR/node_modules/node-opcua-client/package.json" ]; then
    have=$(sed -n 's/^  "version": *"\([^"]*\)".*/\1/p' "$NODE_DIR/node_modules/node-opcua-client/package.json")
fi
if [ "$have" != "$pin" ]; then
    mkdir -p "$NODE_DIR"
    cp scripts/nodeopcua/package.json scripts/nodeopcua/package-lock.json "$NODE_DIR/"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
        || die "npm ci of node-opcua-client $pin failed"
fi

# --- the virtual environment -----------------------------------------------------------------
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || apt_install python3
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$PY" --version 2>&1) is too old: iotserver needs Python 3.11 or newer"
# A .venv left without pip (a venv attempt before python3-venv was installed) is made anew.
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv >/dev/null 2>&1; then
        # Debian and Ubuntu ship venv's ensurepip in a separate package.
        rm -rf .venv
        apt_install python3-venv
        "$PY" -m venv .venv || die "cannot create .venv with $PY"
    fi
fi
VPY=.venv/bin/python
# editable_mode=compat: the default editable install uses an import hook that Twisted's plugin
# scan does not see, and `twistd --help` would not list iotserver.
$VPY -m pip install -q --disable-pip-version-check -c scripts/constraints.txt \
    -e '.[test]' --config-settings editable_mode=compat || die "pip install into .venv failed"
# Write twisted's dropin.cache now so the first twistd run does not have to.
$VPY -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
# (the help text is read whole: `| grep -q` would close the pipe early and fail under pipefail)
twistd_help=$(.venv/bin/twistd --help) || die "twistd in .venv does not start"
grep -q iotserver <<<"$twistd_help" || die "twistd in .venv does not list the iotserver plugin"
echo "bootstrap: done ($($VPY --version) in .venv)"
