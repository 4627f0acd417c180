"""Transports: how a device in one process is driven from another.

* :mod:`pcidev.transport.endpoint` — the device side, independent of any wire
  protocol (accesses, guest memory, eventfds, quiesce, migration);
* :mod:`pcidev.transport.link` — the device link, a small protocol over a UNIX
  socket (``protocol``, ``server``), the host-side proxy
  :class:`~pcidev.transport.link.remote.RemoteDevice` (``remote``) and a device in
  its own process (``process``);
* :mod:`pcidev.transport.vfio_user` — the vfio-user server QEMU's
  ``vfio-user-pci`` connects to (``pcidev serve``);
* :mod:`pcidev.transport.fdpass` and :mod:`pcidev.transport.address` — passing file
  descriptors and parsing socket addresses.
"""
