"""vfio-user transport: serve a pcidev device to QEMU's ``vfio-user-pci`` client.

:mod:`.protocol` holds the wire formats, :mod:`.server` the server (one client per
socket, the device behind a :class:`~pcidev.transport.endpoint.DeviceEndpoint`).
See ``../shared/reference/vfio-user.md`` for the protocol and QEMU's behaviour.
"""

from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.server import VfioUserServer, listen_vfio_user, serve_device

__all__ = ["VfioUserError", "VfioUserServer", "listen_vfio_user", "serve_device"]
