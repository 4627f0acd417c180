"""Identify Namespace's NUSE (allocated_bytes -> BLOCK_STATUS over the whole namespace) waits
for a server that stopped answering (SIGSTOP) for the whole command timeout (default 120 s;
3 s here), unlike a lost connection, which it skips."""
import os, signal, subprocess, tempfile, time
from pcidev_nvme.backends import nbd as nb
from pcidev_nvme.namespace import make_namespace
d = tempfile.mkdtemp(); sock = os.path.join(d, "s")
srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", "size=64M"], stderr=subprocess.DEVNULL)
while not os.path.exists(sock): time.sleep(0.05)
ns = make_namespace(1, f"nbd:uri=nbd+unix:///?socket={sock},timeout=3")
os.kill(srv.pid, signal.SIGSTOP)
t = time.monotonic(); ident = ns.identify()
print(f"Identify Namespace took {time.monotonic()-t:.2f} s (timeout=3; default 120)")
os.kill(srv.pid, signal.SIGCONT); ns.backend.close(); srv.terminate()
