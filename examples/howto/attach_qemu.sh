#!/bin/sh
# Attach an NVMe controller served by pcidev to a QEMU guest: docs/howto/qemu.md.
# Needs QEMU 10.1 or newer (the vfio-user-pci client); run from the repository's root after
# the set-up of docs/getting-started.md. The guest here is the host's own kernel and
# initramfs (Debian's paths); use your guest's.
set -e

# [serve]
.venv/bin/pcidev serve --once --vfio-user /tmp/pcidev-nvme0.sock nvme,ns=mem:size=64M &
while [ ! -S /tmp/pcidev-nvme0.sock ]; do sleep 0.1; done   # QEMU connects once, at start-up
# [end serve]

# [qemu]
qemu-system-x86_64 -accel tcg -smp 1 -m 1024M -nographic -no-reboot \
  -object memory-backend-memfd,id=mem,size=1024M,share=on \
  -machine q35,memory-backend=mem \
  -kernel /boot/vmlinuz-$(uname -r) -initrd /boot/initrd.img-$(uname -r) \
  -append "console=ttyS0 panic=-1" \
  -device '{"driver":"vfio-user-pci","id":"dev0","x-msg-timeout":30000,"socket":{"path":"/tmp/pcidev-nvme0.sock","type":"unix"}}'
# [end qemu]
wait   # pcidev serve exits when QEMU has gone (quit QEMU with Ctrl-a x)
