"""vfio-user transport: serve a pcidev device to QEMU's ``vfio-user-pci`` client, and
drive a served device from Python.

:mod:`.protocol` holds the wire formats; :mod:`.reader` reads messages, :mod:`.loop`
runs one connection, :mod:`.server` answers its messages (the device behind a
:class:`~pcidev.transport.endpoint.DeviceEndpoint`), :mod:`.conn` holds the
connection's own state and :mod:`.serving` runs a device on a socket;
:mod:`.migration` the migration state machine of a served device;
:mod:`.client` the client (:class:`VfioUserClient`), :mod:`.migration_client` its
migration requests and :mod:`.remote` the software host's view of a served device
(:class:`VfioUserDevice`, for :meth:`pcidev.host.Machine.plug`).
The protocol is QEMU's ``docs/interop/vfio-user.rst``.
"""

from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev.transport.vfio_user.server import VfioUserServer
from pcidev.transport.vfio_user.serving import listen_vfio_user, serve_device

__all__ = ["VfioUserClient", "VfioUserDevice", "VfioUserError", "VfioUserServer", "listen_vfio_user",
           "serve_device"]
