"""examples/howto/shared_page.py and read_mailbox.py (docs/howto/sparse-mmap.md): a RAM
BAR with one sparse-mmap area, mapped by a vfio-user client from ``pcidev serve``."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcidev.host import Machine
from pcidev.testing import plugged, roundtrip

ROOT = Path(__file__).resolve().parents[3]
HOWTO = ROOT / "examples" / "howto"
if str(HOWTO) not in sys.path:
    sys.path.insert(0, str(HOWTO))
shared_page = importlib.import_module("shared_page")
read_mailbox = importlib.import_module("read_mailbox")

PCIDEV = [sys.executable, "-m", "pcidev"]


@pytest.fixture
def served(tmp_path: Path, wait_listening: Callable[..., None]) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """``PYTHONPATH=examples/howto pcidev -p shared_page serve --once --vfio-user SOCK howto-mailbox``."""
    sock = tmp_path / "mailbox.sock"
    env = dict(os.environ, PYTHONPATH=str(HOWTO))
    proc = subprocess.Popen([*PCIDEV, "-p", "shared_page", "serve", "--once", "--vfio-user", str(sock),
                             "howto-mailbox"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(sock, proc)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


# [test]
def test_a_client_reads_the_mailbox_from_its_own_mapping(served: tuple[Path, subprocess.Popen[str]]) -> None:
    sock, proc = served
    assert read_mailbox.read_mailbox(str(sock), 0xC0FFEE) == (1, 0xC0FFEE)
    assert proc.wait(10) == 0  # the server exits when its client leaves
# [end test]


def test_the_script_prints_the_message(served: tuple[Path, subprocess.Popen[str]]) -> None:
    sock, _proc = served
    out = subprocess.run([sys.executable, str(HOWTO / "read_mailbox.py"), str(sock)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out == "message 1: 0xc0ffee\n"


def test_trapped_accesses_see_the_same_memory_and_the_state_migrates() -> None:
    with Machine(ram_size=16 << 20) as machine:
        pdev = plugged(machine, shared_page.MailboxDevice())
        pdev.iowrite32(0, 0x04, 7)
        assert (pdev.ioread32(2, 0x1000), pdev.ioread32(2, 0x1004)) == (1, 7)
        pdev.iowrite32(2, 0x0010, 0xABCD)  # page 0 is plain RAM too
        roundtrip(pdev)
        assert (pdev.ioread32(0, 0x00), pdev.ioread32(2, 0x1004), pdev.ioread32(2, 0x10)) == (1, 7, 0xABCD)
