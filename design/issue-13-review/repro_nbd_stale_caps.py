"""After a reconnection the backend keeps the first connection's capabilities (FUA, flush,
read-only, multi-conn, block sizes): a server that comes back without FUA, or read-only,
fails every FUA write / write with a generic error (NVMe Internal Error), for ever."""
import os, subprocess, tempfile, time, errno
from pcidev_nvme.backends import nbd as nb
from pcidev_nvme.io import _os_status
d = tempfile.mkdtemp(); sock = os.path.join(d, "s"); disk = os.path.join(d, "disk")
with open(disk, "wb") as f: f.truncate(1 << 20)
def start(*extra):
    if os.path.exists(sock): os.unlink(sock)
    flags = [e for e in extra if e.startswith("-")]; params = [e for e in extra if not e.startswith("-")]
    p = subprocess.Popen(["nbdkit", "-f", "-U", sock, *flags, "file", disk, *params], stderr=subprocess.DEVNULL)
    while not os.path.exists(sock): time.sleep(0.05)
    return p
srv = start()
b = nb.NbdBackend(f"nbd+unix:///?socket={sock}", reconnect_timeout=5)
print("at start: can_fua", b.can_fua, "read_only", b.read_only)
for extra, what in ((("-r",), "read-only"),):
    srv.kill(); srv.wait(); srv = start(*extra)
    try:
        b.writev([memoryview(b"x" * 4096)], 0, fua=True)
        print(f"server back with {what}: FUA write ok")
    except OSError as e:
        print(f"server back with {what}: FUA write -> {errno.errorcode.get(e.errno)} {e} -> NVMe status {_os_status(e, write=True):#x}")
print("backend still believes can_fua", b.can_fua, "read_only", b.read_only)
b.close(); srv.kill()
