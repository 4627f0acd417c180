"""The VM tier's harness (vm_guest) without a guest: console markers, the ``during`` host
view, and server CPU time that follows the serving PID. These run in the normal suite; the
real-guest runs in test_guest_nvme.py exercise the same code under QEMU."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import vm_guest

SLEEPER = "import time; time.sleep(60)"
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {secs}: pass\nprint('done', flush=True)\n"


def _burner(secs: float) -> subprocess.Popen[str]:
    """A child that spends ``secs`` of CPU, says so, then exits (left unreaped: a zombie)."""
    return subprocess.Popen([sys.executable, "-c", BURN.format(secs=secs)], stdout=subprocess.PIPE, text=True)


def test_marker_lines_become_marks_and_call_back_trace_lines_do_not():
    host = vm_guest.Host([])
    seen = []
    console = vm_guest.Console(host, {"FIO-START": seen.append, "FIO-END": None})
    for line in (b"+ echo FIO-START\r\n", b"FIO-START\r\n", b"noise FIO-END\r\n", b"FIO-END\r\n", b"FIO-END\n"):
        console.feed(line)
    assert [m.name for m in host.marks] == ["FIO-START", "FIO-END", "FIO-END"]
    assert seen == host.marks[:1]
    assert host.marks[0].t <= host.marks[1].t
    assert console.text().splitlines()[0] == "+ echo FIO-START"
    assert host.wait_mark("FIO-END", 0) is host.marks[1]
    assert host.seen("FIO-START") and not host.seen("OTHER")


def test_a_failing_marker_callback_is_kept_and_the_console_goes_on():
    def boom(mark):
        raise RuntimeError("callback failed")

    console = vm_guest.Console(vm_guest.Host([]), {"A": boom})
    console.feed(b"A\n")
    console.feed(b"after\n")
    assert isinstance(console.error, RuntimeError)
    assert console.text() == "A\nafter\n"


def test_wait_mark_wakes_on_a_mark_from_another_thread_and_returns_none_when_qemu_ends():
    host = vm_guest.Host([])
    console = vm_guest.Console(host, {"GO": None})
    threading.Timer(0.1, console.feed, args=(b"GO\n",)).start()
    t0 = time.monotonic()
    assert host.wait_mark("GO", 10).name == "GO"
    assert time.monotonic() - t0 < 5
    threading.Timer(0.1, host.done.set).start()
    assert host.wait_mark("NEVER", 10) is None


def test_server_cpu_follows_a_new_pid_and_keeps_the_old_ones_time():
    first, second = _burner(0.3), _burner(0.2)
    try:
        assert first.stdout.readline() == "done\n" and second.stdout.readline() == "done\n"
        deadline = time.monotonic() + 10
        while vm_guest._alive(first.pid) and time.monotonic() < deadline:  # exited, not yet reaped
            time.sleep(0.01)
        dev = vm_guest.ServedDevice(Path("/nonexistent.sock"), first.pid)
        before = dev.cpu()
        assert before is not None and before >= 0.25  # a zombie still reports its CPU time
        host = vm_guest.Host([dev])
        host.set_pid(0, second.pid)
        host.set_pid(0, second.pid)  # the same PID again changes nothing
        assert host.pid(0) == second.pid and dev.pids == [first.pid, second.pid]
        after = host.cpu()[0]
        assert after is not None and after >= before + 0.15
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
    assert vm_guest.process_cpu(first.pid) is None  # reaped: gone
    assert dev.cpu() is None


def test_a_server_left_by_its_parent_is_found_by_socket_killed_and_reaped(tmp_path):
    sock = tmp_path / "dev0.sock"
    with vm_guest.subreaper():
        child = f"import subprocess as s, sys; print(s.Popen([sys.executable, '-c', {SLEEPER!r}, {str(sock)!r}], " \
                "stdout=s.DEVNULL, stderr=s.DEVNULL).pid)"
        parent = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
        orphan = int(parent.stdout)
        assert vm_guest._alive(orphan)  # its parent exited: it is ours now (subreaper)
        assert vm_guest._adopted_servers([sock]) == [orphan]
        assert vm_guest._adopted_servers([tmp_path / "other.sock"]) == []
        vm_guest._kill_pids([orphan])
    assert vm_guest.process_cpu(orphan) is None  # ended and reaped


def test_a_server_deaf_to_sigterm_is_killed():
    deaf = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                             " print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert deaf.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    vm_guest._kill_pids([deaf.pid], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert vm_guest.process_cpu(deaf.pid) is None  # killed and reaped
    deaf.stdout.close()
