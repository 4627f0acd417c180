"""The device link: a small protocol that lets a device live in another process
than the host driving it.

* :mod:`pcidev.transport.link.protocol` — the wire format: header, message
  kinds, bodies, error replies;
* :mod:`pcidev.transport.link.server` — :class:`LinkServer`, in the device's
  process, serving a :class:`~pcidev.transport.endpoint.DeviceEndpoint`;
* :mod:`pcidev.transport.link.remote` — :class:`RemoteDevice`, the host-side
  proxy that ``Machine.plug_remote`` plugs like a local device, and
  :class:`LinkClient`, one request/reply connection;
* :mod:`pcidev.transport.link.process` — a device in its own process
  (``python -m pcidev.transport.link.process``, :func:`~pcidev.transport.link.process.spawn`,
  :class:`~pcidev.transport.link.process.DeviceProcess`). It builds devices
  through a plugin manager of its own, selected by the same ``-p`` options as
  the command line's (``plugin_specs=``), so it is imported by name and not
  re-exported here: the host-side proxy does not pull it in.
"""

from __future__ import annotations

from pcidev.transport.link.protocol import LINK_MAX_FDS, MAX_BODY, MSI_ROUTE_ADDRESS, error_from_reply
from pcidev.transport.link.remote import LinkClient, RemoteDevice
from pcidev.transport.link.server import LinkServer

__all__ = ["LinkServer", "LinkClient", "RemoteDevice", "MSI_ROUTE_ADDRESS", "MAX_BODY", "LINK_MAX_FDS",
           "error_from_reply"]
