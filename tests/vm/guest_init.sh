#!/bin/busybox sh
# /init of the VM tier's initramfs.  The host passes the shell snippet to run as the kernel
# argument guest_cmd (base64, so any characters survive) and parses the markers below.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /var/run
for m in nvme-auth nvme-core nvme virtio_blk virtio-rng; do [ -e /mods/$m.ko ] && insmod /mods/$m.ko; done
echo "@@PCIDEV-START@@"
echo "$guest_cmd" | base64 -d > /tmp/cmd.sh
sh -x /tmp/cmd.sh 2>&1
rc=$?
echo "@@PCIDEV-RC=$rc@@"
echo "@@PCIDEV-END@@"
sync
poweroff -f
