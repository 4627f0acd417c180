"""A server advertising a tiny maximum block size splits every transfer into that many
requests (no lower bound on max_request)."""
import os, subprocess, tempfile, time
from pcidev_nvme.backends import nbd as nb
d = tempfile.mkdtemp(); sock = os.path.join(d, "s")
srv = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=blocksize-policy", "memory", "size=64M",
                        "blocksize-minimum=1", "blocksize-preferred=512", "blocksize-maximum=512"], stderr=subprocess.PIPE, text=True)
while not os.path.exists(sock):
    if srv.poll() is not None: print(srv.stderr.read()); raise SystemExit
    time.sleep(0.05)
b = nb.NbdBackend(f"nbd+unix:///?socket={sock}")
print("min_block", b.min_block, "max_request", b.max_request)
calls = 0
orig = b._run
def run(issue):
    global calls; calls += 1; return orig(issue)
b._run = run
t = time.monotonic(); b.readv([memoryview(bytearray(2 << 20))], 0)
print(f"one 2 MiB read: {calls} NBD requests, {time.monotonic()-t:.2f} s")
b.close(); srv.terminate()
