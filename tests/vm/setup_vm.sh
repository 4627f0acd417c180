#!/bin/sh
# Build (or reuse) the VM tier's pieces: a Debian trixie chroot with QEMU >= 10.1 from
# trixie-backports, the guest kernel and a busybox initramfs with nvme-cli, fio, lspci, the
# nvme modules and the virtio_blk and virtio-rng modules (see ../shared/reference/real-guest.md).
# Idempotent: reuses what is present.
# Usage: setup_vm.sh [ROOT]   (default /var/cache/pcidev-vm).  Needs root.  Prints ROOT at the end.
set -eu
ROOT=${1:-${PCIDEV_VM_ROOT:-/var/cache/pcidev-vm}}
HERE=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" = 0 ] || { echo "setup_vm.sh: must run as root" >&2; exit 2; }

MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb / && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian

cleanup() {
    for m in "$ROOT/proc" "$ROOT/dev"; do
        if mountpoint -q "$m" 2>/dev/null; then umount "$m" || umount -l "$m"; fi
    done
}
trap cleanup EXIT INT TERM

need_host() {
    missing=""
    for p in "$@"; do command -v "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap cpio xz-utils gzip
    fi
}
need_host debootstrap cpio xz gzip

if [ ! -x "$ROOT/usr/sbin/chroot" ] && [ ! -x "$ROOT/usr/bin/apt-get" ]; then
    # A half-built tree from an interrupted run: unmount and start over.
    cleanup
    if [ -d "$ROOT" ]; then rm -rf --one-file-system "$ROOT"; fi
    mkdir -p "$ROOT"
    debootstrap --variant=minbase trixie "$ROOT" "$MIRROR"
fi
echo "deb $MIRROR trixie-backports main" > "$ROOT/etc/apt/sources.list.d/backports.list"

mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
mountpoint -q "$ROOT/proc" || mount --bind /proc "$ROOT/proc"

if ! chroot "$ROOT" sh -c 'qemu-system-x86_64 -device help 2>/dev/null | grep -q vfio-user-pci' \
   || ! ls "$ROOT"/boot/vmlinuz-* >/dev/null 2>&1 \
   || [ ! -x "$ROOT/usr/bin/fio" ] || [ ! -x "$ROOT/usr/sbin/nvme" ] || [ ! -x "$ROOT/usr/bin/busybox" ]; then
    chroot "$ROOT" apt-get update -q
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t trixie-backports \
        --no-install-recommends qemu-system-x86
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        linux-image-amd64 fio nvme-cli busybox-static pciutils
fi
chroot "$ROOT" qemu-system-x86_64 --version | head -1

KVER=$(ls "$ROOT/lib/modules" | sort | tail -1)
mkdir -p "$ROOT/vm"

# build_initrd MODULES_DIR OUT: the busybox initramfs (tools from the chroot, nvme and virtio
# modules from MODULES_DIR) at OUT.
build_initrd() {
    MODDIR=$1
    OUT=$2
    STAGE=$(mktemp -d /tmp/pcidev-vm-stage.XXXXXX)
    mkdir -p "$STAGE/bin" "$STAGE/proc" "$STAGE/sys" "$STAGE/dev" "$STAGE/tmp" "$STAGE/mods" \
             "$STAGE/lib64" "$STAGE/lib/x86_64-linux-gnu" "$STAGE/usr/lib/x86_64-linux-gnu" \
             "$STAGE/usr/share/misc" "$STAGE/tests"
    cp "$ROOT/usr/bin/busybox" "$STAGE/bin/busybox"
    for b in /usr/bin/fio /usr/sbin/nvme /usr/bin/lspci /usr/bin/setpci; do
        [ -e "$ROOT$b" ] || continue
        cp "$ROOT$b" "$STAGE/bin/"
        chroot "$ROOT" ldd "$b" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
            [ -n "$lib" ] && [ -e "$ROOT$lib" ] || continue
            real=$(readlink -f "$ROOT$lib")
            mkdir -p "$STAGE$(dirname "$lib")"
            cp "$real" "$STAGE$lib"
        done
    done
    cp "$(readlink -f "$ROOT/lib64/ld-linux-x86-64.so.2")" "$STAGE/lib64/ld-linux-x86-64.so.2"
    [ -e "$ROOT/usr/share/misc/pci.ids" ] && cp "$ROOT/usr/share/misc/pci.ids" "$STAGE/usr/share/misc/"
    # nvme (its modules; nvme-keyring only where nvme-core needs it), and the virtio drivers
    # the kernel does not build in (CONFIG_VIRTIO_PCI=y; virtio_blk and virtio-rng are
    # modules without dependencies). guest_init.sh loads them in this order.
    for m in nvme/common/nvme-keyring nvme/common/nvme-auth nvme/host/nvme-core nvme/host/nvme \
             block/virtio_blk char/hw_random/virtio-rng; do
        f="$MODDIR/kernel/drivers/$m.ko.xz"
        [ -e "$f" ] && xz -dc "$f" > "$STAGE/mods/$(basename "$m").ko"
    done
    cp "$HERE/guest_init.sh" "$STAGE/init"
    chmod +x "$STAGE/init"
    (cd "$STAGE" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
    rm -rf --one-file-system "$STAGE"
}

# The initramfs is rebuilt when the init script or this script changed (cheap: a few seconds).
STAMP=$(cat "$HERE/guest_init.sh" "$HERE/setup_vm.sh" | sha256sum | cut -c1-16)-$KVER
if [ -f "$ROOT/vm/initrd.gz" ] && [ "$(cat "$ROOT/vm/initrd.stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "initramfs up to date"
else
    build_initrd "$ROOT/lib/modules/$KVER" "$ROOT/vm/initrd.gz"
    cp "$ROOT/boot/vmlinuz-$KVER" "$ROOT/vm/vmlinuz"
    echo "$STAMP" > "$ROOT/vm/initrd.stamp"
fi

# A second guest kernel, trixie-backports' newest, for what Debian's 6.12 lacks:
# CONFIG_PCI_P2PDMA, without which Linux's nvme driver never puts its submission queues in a
# Controller Memory Buffer. Unpacked (not installed) under vm/p2p; run_guest(kernel="p2p").
P2P="$ROOT/vm/p2p"
BPK=$(chroot "$ROOT" apt-cache depends -t trixie-backports linux-image-amd64 2>/dev/null \
      | sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | head -1)
[ -n "$BPK" ] || { echo "setup_vm.sh: no kernel in trixie-backports" >&2; exit 1; }
P2PSTAMP=$STAMP-$BPK
if [ -f "$P2P/initrd.gz" ] && [ "$(cat "$P2P/stamp" 2>/dev/null)" = "$P2PSTAMP" ]; then
    echo "p2p kernel $BPK up to date"
else
    rm -rf --one-file-system "$P2P"
    mkdir -p "$P2P/dl" "$P2P/root"
    if ! chroot "$ROOT" sh -c "cd /vm/p2p/dl && apt-get download -q linux-binary-$BPK linux-modules-$BPK" \
        >/dev/null 2>&1; then
        chroot "$ROOT" apt-get update -q
        chroot "$ROOT" sh -c "cd /vm/p2p/dl && apt-get download -q linux-binary-$BPK linux-modules-$BPK"
    fi
    for d in "$P2P"/dl/*.deb; do dpkg-deb -x "$d" "$P2P/root"; done
    MODDIR=$(ls -d "$P2P"/root/usr/lib/modules/* "$P2P"/root/lib/modules/* 2>/dev/null | head -1)
    [ -n "$MODDIR" ] || { echo "setup_vm.sh: $BPK has no modules" >&2; exit 1; }
    build_initrd "$MODDIR" "$P2P/initrd.gz"
    if [ -e "$MODDIR/vmlinuz" ]; then cp "$MODDIR/vmlinuz" "$P2P/vmlinuz"
    else cp "$P2P"/root/boot/vmlinuz-* "$P2P/vmlinuz"; fi
    rm -rf --one-file-system "$P2P/dl" "$P2P/root"
    echo "$P2PSTAMP" > "$P2P/stamp"
fi
echo "$ROOT"
