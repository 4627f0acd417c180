"""NbdBackend.__init__: a size= that check_size refuses (or min_block > 4096 etc. after it)
leaves the first connection open: its dispatcher thread, socket and wake pipe leak."""
import os, subprocess, tempfile, threading, time
from pcidev.errors import ConfigError
from pcidev_nvme.backends import nbd as nb
d = tempfile.mkdtemp(); sock = os.path.join(d, "s")
srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", "size=64M"], stderr=subprocess.DEVNULL)
while not os.path.exists(sock): time.sleep(0.05)
fds = len(os.listdir("/proc/self/fd"))
for _ in range(5):
    try:
        nb.NbdBackend(f"nbd+unix:///?socket={sock}", size=1000)
    except ConfigError as e:
        err = e
print("refused:", err)
time.sleep(1.5)
print("nbd-dispatch threads left:", sum(t.name == "nbd-dispatch" for t in threading.enumerate()),
      "| fds leaked:", len(os.listdir("/proc/self/fd")) - fds)
srv.terminate()
