"""A command in flight on a connection that another thread closes (after an ESHUTDOWN
answer) is never completed by libnbd; it waits for its whole timeout and then kick()s a
closed (possibly reused) pipe fd.  Needs nbdkit (memory plugin, delay + error filters)."""
import os, subprocess, sys, tempfile, threading, time, logging
logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)6d %(threadName)s %(message)s")
from pcidev_nvme.backends import nbd as nb

d = tempfile.mkdtemp()
sock = os.path.join(d, "s")
srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=error", "--filter=delay",
                        "memory", "size=1M", "delay-read=3",
                        "error-pwrite=ESHUTDOWN", "error-pwrite-rate=100%"],
                       stderr=subprocess.DEVNULL)
while not os.path.exists(sock):
    time.sleep(0.05)

orig_kick = nb._Connection.kick
def kick(self):
    try:
        target = os.readlink(f"/proc/self/fd/{self._wake_w}")
    except OSError as e:
        target = f"<{e.strerror}>"
    if getattr(self, "_fds_gone", False):
        print(f"{time.monotonic()-t0:6.2f}s kick() on a CLOSED connection: fd {self._wake_w} -> {target}", flush=True)
    return orig_kick(self)
nb._Connection.kick = kick
orig_close = nb._Connection.close
def close(self):
    orig_close(self)
    self._fds_gone = True
nb._Connection.close = close

b = nb.NbdBackend(f"nbd+unix:///?socket={sock}", timeout=6, reconnect_timeout=2)
t0 = time.monotonic()
res = {}
def reader():
    buf = bytearray(4096)
    try:
        b.readv([memoryview(buf)], 0)
        res["read"] = "ok"
    except Exception as e:
        res["read"] = repr(e)
    res["read_t"] = time.monotonic() - t0
def writer():
    try:
        b.writev([memoryview(b"x" * 4096)], 8192)
        res["write"] = "ok"
    except Exception as e:
        res["write"] = repr(e)
    res["write_t"] = time.monotonic() - t0
ta = threading.Thread(target=reader, name="A-read"); ta.start()
time.sleep(0.5)
tb = threading.Thread(target=writer, name="B-write"); tb.start()
ta.join(30); tb.join(30)
print("read (server answers after 3 s):", res.get("read"), "after %.2f s" % res.get("read_t", -1),
      "alive" if ta.is_alive() else "")
print("write:", res.get("write"), "after %.2f s" % res.get("write_t", -1))
print("reconnections made while the server kept answering ESHUTDOWN:", b.reconnects)
print("dispatcher threads alive:", sum(t.name == "nbd-dispatch" for t in threading.enumerate()))
b.close(); srv.terminate()
