"""A misbehaving migration destination, run as its own process by the tests.

    python fake_destination.py MODE unix:PATH

MODE: ``kill`` (reads the offer, then SIGKILLs itself), ``garbage`` (reads the whole
stream, then answers garbage), ``close`` (reads the stream and closes without an
answer), ``refuse`` (a real destination whose edu is configured differently: it
refuses in the pre-flight). The first three let the pre-flight pass (a VERDICT ``ok``).
"""

from __future__ import annotations

import os
import signal
import sys

from pcidev.devices.edu import EduDevice
from pcidev.errors import PcidevError
from pcidev.migration import migrate_in
from pcidev.migration.frames import CHECK, VERDICT, recv_frame, send_meta
from pcidev.transport.address import listen
from pcidev.transport.fdpass import close_fds, recv_exact


class OtherEdu(EduDevice):
    def device_fingerprint(self):
        return {"edu.max_transfer": 4096}


def main(mode: str, address: str) -> int:
    listener = listen(address, backlog=1)
    print("listening", flush=True)
    conn, _ = listener.sock.accept()
    if mode == "refuse":
        try:
            migrate_in(OtherEdu(), conn)
        except PcidevError as exc:
            print(f"refused: {exc}", flush=True)
            return 0
        return 1
    kind, _body, fds = recv_frame(conn, max_fds=253)
    close_fds(fds)
    if kind == CHECK:
        send_meta(conn, VERDICT, {"protocol": 3, "ok": True, "reasons": [], "features": [], "boot_id": ""})
    head, fds = recv_exact(conn, 16, max_fds=253)
    close_fds(fds)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    n = int.from_bytes(head[12:16], "little")
    recv_exact(conn, n)
    head, _ = recv_exact(conn, 16)
    recv_exact(conn, int.from_bytes(head[12:16], "little"))
    if mode == "garbage":
        conn.sendall(b"\xde\xad\xbe\xef" * 8)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
