#!/bin/sh
# Install what the NBD backend's tests need (Debian 12 packages): libnbd's Python bindings
# (python3-libnbd, the module `nbd` for the system python3), nbdkit (with its memory plugin
# and its error, delay and log filters), qemu-nbd (qemu-utils), qemu-storage-daemon
# (qemu-system-common) and psktool (gnutls-bin, TLS pre-shared keys). Idempotent: installs only what is missing.
# Usage: setup_nbd.sh   Needs root (the session fixture of tests/plugins/nvme/backends runs it).
set -eu
[ "$(id -u)" = 0 ] || { echo "setup_nbd.sh: must run as root" >&2; exit 2; }

missing=""
[ -f /usr/lib/python3/dist-packages/nbd.py ] || missing="$missing python3-libnbd"
command -v nbdkit >/dev/null 2>&1 || missing="$missing nbdkit"
command -v qemu-nbd >/dev/null 2>&1 || missing="$missing qemu-utils"
command -v qemu-storage-daemon >/dev/null 2>&1 || missing="$missing qemu-system-common"
command -v psktool >/dev/null 2>&1 || missing="$missing gnutls-bin"
if [ -n "$missing" ]; then
    apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
ls /usr/lib/python3/dist-packages/nbd.py
nbdkit --version
qemu-nbd --version | head -1
qemu-storage-daemon --version | head -1
psktool --version | head -1
