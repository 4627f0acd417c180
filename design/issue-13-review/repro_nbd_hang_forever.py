"""One ESHUTDOWN answer while a read is in flight on the same connection: the writer's
_live() closes the connection under the read; libnbd never completes the read; after its
timeout the reader kick()s the closed pipe fd, whose number the reconnection reused, and then
waits for ever (waiter.wait(None))."""
import os, subprocess, sys, tempfile, threading, time
from pcidev_nvme.backends import nbd as nb

d = tempfile.mkdtemp(); sock = os.path.join(d, "s"); flag = os.path.join(d, "err")
open(flag, "w").close()
srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=error", "--filter=delay", "memory", "size=1M",
                        "delay-read=3", "error-pwrite=ESHUTDOWN", "error-pwrite-rate=100%", f"error-file={flag}"], stderr=subprocess.DEVNULL)
while not os.path.exists(sock): time.sleep(0.05)
writes = []
orig_kick = nb._Connection.kick
def kick(self):
    if getattr(self, "_fds_gone", False):
        try: target = os.readlink(f"/proc/self/fd/{self._wake_w}")
        except OSError as e: target = f"<{e.strerror}>"
        writes.append((self._wake_w, target))
    return orig_kick(self)
nb._Connection.kick = kick
orig_close = nb._Connection.close
def close(self):
    orig_close(self); self._fds_gone = True
nb._Connection.close = close

# timeout=0 (argv[1] = 0): the reader waits forever instead of until its timeout
b = nb.NbdBackend(f"nbd+unix:///?socket={sock}", timeout=float(sys.argv[1]) if len(sys.argv) > 1 else 5,
                  reconnect_timeout=2)
t0 = time.monotonic(); res = {}
def reader():
    try: b.readv([memoryview(bytearray(4096))], 0); res["read"] = "ok"
    except Exception as e: res["read"] = repr(e)
    res["t"] = time.monotonic() - t0
ta = threading.Thread(target=reader, daemon=True); ta.start()
time.sleep(0.5)
def unflag(): time.sleep(0.3); os.unlink(flag)
threading.Thread(target=unflag).start()
try: b.writev([memoryview(b"x" * 4096)], 8192); print("write ok after reconnect(s):", b.reconnects)
except Exception as e: print("write", repr(e))
ta.join(15)
print("kick() after close wrote to:", writes)
print("reader:", res or "STILL WAITING after %.0f s (reply was due at 3 s, timeout=5)" % (time.monotonic() - t0))
srv.terminate()
os._exit(0)
