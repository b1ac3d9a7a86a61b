#!/usr/bin/env bash
# Installs what guardd's make targets need on a fresh Debian 12 machine (run as root).
#   bootstrap.sh uv DIR   install uv into DIR (a venv) when it is not on PATH
#   bootstrap.sh system   Debian packages the test suite drives for real
#   bootstrap.sh demo     the Debian packages the demo uses (nginx), when root
set -euo pipefail

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "guardd: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
        return 1
    fi
    echo "guardd: installing ${missing[*]}" >&2
    apt-get update -qq
    # policy-rc.d keeps package scripts from starting system services (nginx, prometheus).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

case "${1:-}" in
uv)
    dir="$2"
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check uv
    ;;
system)
    apt_install nginx-light systemd-container debootstrap zstd prometheus etcd-server ca-certificates curl tmux \
        dpkg-dev help2man lintian
    ;;
demo)
    if ! command -v nginx >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        apt_install nginx-light || echo "guardd: no nginx; the demo will use the state-file switcher" >&2
    fi
    ;;
*)
    echo "usage: bootstrap.sh uv DIR | system | demo" >&2
    exit 2
    ;;
esac
