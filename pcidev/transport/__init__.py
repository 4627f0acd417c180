"""Transports: how a device in one process is driven from another.

* :mod:`pcidev.transport.endpoint` — the device side, independent of any wire
  protocol (accesses, guest memory, eventfds, quiesce, migration);
* :mod:`pcidev.transport.link` — the device link, a small protocol over a UNIX
  socket, with the host-side proxy :class:`~pcidev.transport.link.RemoteDevice`;
* :mod:`pcidev.transport.serve` — run a device in its own process;
* :mod:`pcidev.transport.fdpass` and :mod:`pcidev.transport.address` — passing file
  descriptors and parsing socket addresses.
"""
