#!/bin/busybox sh
# /init of the VM tier's initramfs.  The host passes the shell snippet to run as the kernel
# argument guest_cmd (base64, so any characters survive) and parses the markers below.
# nvme_args (a kernel argument the kernel does not use, so it reaches /init in the environment)
# holds parameters for insmod nvme.ko, comma-separated: nvme_args=io_queue_depth=2,poll_queues=1.
# Kernel command line module parameters (nvme.x=y) do not reach insmod.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /var/run
for m in nvme-keyring nvme-auth nvme-core nvme virtio_blk virtio-rng; do
    args=""
    [ "$m" = nvme ] && args=$(echo "${nvme_args:-}" | tr , ' ')
    # shellcheck disable=SC2086  # one word per parameter
    [ -e /mods/$m.ko ] && insmod /mods/$m.ko $args
done
echo "@@PCIDEV-START@@"
echo "$guest_cmd" | base64 -d > /tmp/cmd.sh
sh -x /tmp/cmd.sh 2>&1
rc=$?
echo "@@PCIDEV-RC=$rc@@"
echo "@@PCIDEV-END@@"
sync
poweroff -f
