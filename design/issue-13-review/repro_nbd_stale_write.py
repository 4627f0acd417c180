"""A write that times out is failed to the host, but the server still applies it later:
it overwrites a later write to the same blocks that completed successfully."""
import os, subprocess, tempfile, time
from pcidev_nvme.backends import nbd as nb
d = tempfile.mkdtemp(); sock = os.path.join(d, "s"); disk = os.path.join(d, "disk"); flag = os.path.join(d, "slow")
with open(disk, "wb") as f: f.truncate(1 << 20)
open(flag, "w").close()
srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "eval",
    "thread_model=echo parallel", f"get_size=echo {1 << 20}", "can_write=exit 0", "can_flush=exit 0", "flush=exit 0",
    f"pread=dd if={disk} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
    f"pwrite=if [ -e {flag} ]; then rm -f {flag}; sleep 3; fi; dd of={disk} seek=$4 oflag=seek_bytes conv=notrunc status=none"],
    stderr=subprocess.DEVNULL)
while not os.path.exists(sock): time.sleep(0.05)
b = nb.NbdBackend(f"nbd+unix:///?socket={sock}", timeout=1, reconnect_timeout=5)
try:
    b.writev([memoryview(b"A" * 4096)], 0)
    print("W1 completed")
except OSError as e:
    print("W1 (A) failed to the host:", e)
b.writev([memoryview(b"B" * 4096)], 0, fua=True)
buf = bytearray(4096); b.readv([memoryview(buf)], 0)
print("W2 (B, FUA) completed; read now:", bytes(buf[:4]))
time.sleep(3.5)
b.readv([memoryview(buf)], 0)
print("read 3.5 s later:", bytes(buf[:4]), "<- the failed W1 overwrote the completed W2" if buf[:1] == b"A" else "")
b.close(); srv.terminate()
