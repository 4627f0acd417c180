"""A vfio-user server that keeps serving after its client leaves, for the reconnect tests.

Usage::

    python persistent_server.py SOCKET DEVICE[,PROPS]

It is :func:`pcidev.transport.vfio_user.serving.serve_device` with ``once=False``
(``pcidev serve`` exits after its first client), in a process of its own because
``serve_device`` installs signal handlers (main thread only).
"""

from __future__ import annotations

import sys

from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.transport.vfio_user.serving import listen_vfio_user, serve_device


def main() -> int:
    path, spec = sys.argv[1], sys.argv[2]
    type_name, _, props = spec.partition(",")
    pm = make_plugin_manager()
    listener = listen_vfio_user(path)
    device = load_registry(pm).create(type_name, props)
    return serve_device(device, path, pm=pm, once=False, listener=listener)


if __name__ == "__main__":
    sys.exit(main())
