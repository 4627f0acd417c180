"""A device moved between two "hosts" -- network namespaces joined by a veth pair -- over
TCP, its namespace on an NBD export served by qemu-nbd on host A's address: the software
host's verified workload runs across the move, zero mismatches. A namespace the other host
cannot reach (a local image) blocks the move before anything stops."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _moves import NetnsDeviceProcess, refused_while_the_source_runs

import pcidev.testing.migration as runner
from pcidev.testing import migrate_under_load
from pcidev_nvme.testing.workload import VerifiedIo

MiB = 1 << 20
ADDR_A, ADDR_B = "10.231.7.1", "10.231.7.2"
PORT = 10809
PROPS = "serial=CROSSHOST,max_ioqpairs=2,msix_vectors=3"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts(nbd_tools: None) -> Iterator[tuple[str, str]]:
    """Two network namespaces ("hosts" A and B, unique names) joined by a veth pair,
    ``ADDR_A`` and ``ADDR_B`` on it; deleted at the end."""
    if os.geteuid() != 0:
        pytest.skip("the cross-host move test creates network namespaces: it needs root")
    if shutil.which("ip") is None:
        pytest.skip("the cross-host move test needs ip (iproute2)")
    tag = uuid.uuid4().hex[:8]
    a, b = f"pcidev-a-{tag}", f"pcidev-b-{tag}"
    made: list[str] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name", f"vb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va{tag}", ADDR_A), (b, f"vb{tag}", ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in made:  # (the veth pair goes with its namespaces)
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30, check=False)


@pytest.fixture
def export_on_a(hosts: tuple[str, str], tmp_path: Path) -> Iterator[str]:
    """qemu-nbd in host A on ``ADDR_A:PORT``, export ``exp`` (a 4 MiB image): its URI."""
    image, pidfile = tmp_path / "export.img", tmp_path / "qemu-nbd.pid"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    subprocess.run(["ip", "netns", "exec", hosts[0], "qemu-nbd", "--fork", f"--pid-file={pidfile}", "-t",
                    "--shared=8", "-b", ADDR_A, "-p", str(PORT), "-f", "raw", "-x", "exp", "--cache=writeback",
                    str(image)], check=True, capture_output=True, timeout=60)  # (--fork: once it listens)
    pid = int(pidfile.read_text())
    try:
        yield f"nbd://{ADDR_A}:{PORT}/exp"
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _in_hosts(a: str, b: str, dest_wrap: tuple[str, ...] = ()) -> Any:
    """A stand-in for the runner's DeviceProcess: the source in host A, every destination
    in host B listening on ``ADDR_B`` (the runner asks for ``tcp:127.0.0.1:0``)."""
    def start(device: str, link: str, *, options: Any = None, incoming: str | None = None,
              plugin_specs: Any = (), save_incoming: Any = None) -> NetnsDeviceProcess:
        if incoming is None:
            return NetnsDeviceProcess(a, device, link, options=str(options))
        return NetnsDeviceProcess(b, device, link, options=str(options), wrap=dest_wrap,
                                  incoming=incoming.replace("127.0.0.1", ADDR_B))
    return start


def test_a_device_moves_to_another_host_with_its_nbd_namespace(hosts, export_on_a, monkeypatch):
    """Host A runs the device, host B the destinations; two moves (A -> B -> B) over TCP
    while the verified workload runs (every block read checks its CRC-32C). A ``mem``
    namespace moves too: over TCP its contents travel in the stream (pre-copy)."""
    a, b = hosts
    work = VerifiedIo(qd=8, queues=2, seed=22, properties=f"{PROPS},ns=nbd:uri={export_on_a},ns=mem:size=1M")
    monkeypatch.setattr(runner, "DeviceProcess", _in_hosts(a, b))
    result = migrate_under_load("nvme", work, count=2, every=2, transport="tcp", probe=False,
                                migration_timeout=60, start_timeout=60)
    assert len(result.migrations) == 2
    assert all(m.fds == 0 for m in result.migrations)
    report = work.report()
    assert report["mismatches"] == 0 and report["lost_completions"] == 0 and report["duplicate_completions"] == 0
    assert report["blocks_written"] > 0 and report["blocks_checked"] > 4 * MiB // 4096


def test_a_local_image_blocks_the_move_to_another_host(hosts, export_on_a, tmp_path):
    """The source (host A) also has a ``file`` namespace on its own disk; host B has its own
    disk at the same path (a mount namespace with a tmpfs there, where its configuration
    creates an image of the same size): the pre-flight refuses the move naming that
    namespace and its image, before anything stops, and the source runs on."""
    a, b = hosts
    disk = tmp_path / "disk"
    disk.mkdir()
    image = disk / "local.img"
    with open(image, "wb") as f:
        f.truncate(1 * MiB)
    props = f"{PROPS},ns=nbd:uri={export_on_a},ns=file:path={image},size=1M"
    own_disk = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{disk}" && exec "$0" "$@"')
    work = VerifiedIo(qd=8, queues=2, seed=23, properties=props)
    source = NetnsDeviceProcess(a, "nvme", f"unix:{tmp_path}/src.sock", options=props)
    dest = NetnsDeviceProcess(b, "nvme", f"unix:{tmp_path}/dst.sock", options=props, wrap=own_disk,
                              incoming=f"tcp:{ADDR_B}:0")
    try:
        refused_while_the_source_runs(source, dest, work,
                                      match=rf"migration blocked: .*namespace 2: image {image}")
    finally:
        source.stop()
        dest.stop()


EXAMPLE = Path(__file__).parents[4] / "examples" / "move_between_hosts.py"


def test_the_move_between_hosts_example_moves_a_device_there_and_back(hosts, export_on_a, tmp_path):
    """``examples/move_between_hosts.py`` as the how-to in docs/nbd.md runs it: the device
    processes started by hand (host A the source, host B and then host A again waiting on
    their own addresses), the script in the root namespace reaching their UNIX sockets: two
    moves (A -> B -> A) under the verified workload, zero mismatches, exit status 0."""
    import json
    import sys

    a, b = hosts
    props = f"{PROPS},ns=nbd:uri={export_on_a}"
    source = NetnsDeviceProcess(a, "nvme", f"unix:{tmp_path}/a.sock", options=props)
    there = NetnsDeviceProcess(b, "nvme", f"unix:{tmp_path}/b.sock", options=props, incoming=f"tcp:{ADDR_B}:7000")
    back = NetnsDeviceProcess(a, "nvme", f"unix:{tmp_path}/a2.sock", options=props, incoming=f"tcp:{ADDR_A}:7000")
    try:
        source.wait_event("ready", timeout=60)
        to = [str(p.wait_event("listening", timeout=60)["incoming"]) for p in (there, back)]
        assert to == [f"tcp:{ADDR_B}:7000", f"tcp:{ADDR_A}:7000"]
        run = subprocess.run([sys.executable, str(EXAMPLE), "--link", source.link, "--to", to[0], "--to", to[1],
                              "--props", props, "--steps", "3", "--seed", "7", "--json"],
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout)
        assert [m["to"] for m in result["moves"]] == to
        assert [m["link"] for m in result["moves"]] == [there.link, back.link]
        assert all(m["fds"] == 0 for m in result["moves"])
        report = result["workload"]
        assert report["mismatches"] == 0 and report["lost_completions"] == 0
        assert report["duplicate_completions"] == 0 and report["blocks_checked"] > 0
        assert result["steps"] >= 9
    finally:
        for p in (source, there, back):
            p.stop()


def test_the_move_between_hosts_example_refuses_a_tcp_link_in_one_line(tmp_path):
    import sys

    run = subprocess.run([sys.executable, str(EXAMPLE), "--link", "tcp:10.0.0.1:7001", "--to", "tcp:10.0.0.2:7000",
                          "--props", "serial=X"], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert run.stderr.strip() == ("move_between_hosts: --link must be a unix:PATH address (the device link shares "
                                  "guest RAM), not tcp:10.0.0.1:7001")
