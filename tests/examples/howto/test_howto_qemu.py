"""examples/howto/attach_qemu.sh (docs/howto/qemu.md): the published QEMU command line is
the VM tier's (tests/vm/vm_guest.py) and the published ``pcidev serve`` line serves a
client that connects the way QEMU's ``vfio-user-pci`` does.

No QEMU runs here (the VM tier boots a real guest with ``PCIDEV_VM=1``): the script runs
with a stand-in ``qemu-system-x86_64`` first on ``PATH`` that records its arguments and
connects to the socket named in its ``-device`` option with pcidev's vfio-user client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "howto" / "attach_qemu.sh"
PUBLISHED_SOCKET = "/tmp/pcidev-nvme0.sock"

FAKE_QEMU = f"""#!{sys.executable}
import json, os, sys, time
from pcidev.dma import alloc_memfd
from pcidev.errors import TransportError
from pcidev.transport.vfio_user.client import VfioUserClient
args = sys.argv[1:]
dev = json.loads(args[args.index("-device") + 1])
# The socket file exists from bind(), a moment before listen(): QEMU connects once and would
# fail in that gap; the stand-in retries, so that this test checks the commands, not the gap.
for attempt in range(50):
    try:
        client = VfioUserClient.connect(dev["socket"]["path"])
        break
    except (OSError, TransportError):
        time.sleep(0.05)
with client:
    vendor = client.config_read(0x00, 2)
    ram = alloc_memfd(1 << 20, "guest-ram")            # a (small) shared memfd, as share=on gives
    client.dma_map(0, 1 << 20, ram)
    os.close(ram)
with open(os.environ["FAKE_QEMU_OUT"], "w") as out:
    json.dump({{"argv": args, "vendor": vendor}}, out)
"""


def _vm_guest(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("vm_guest_for_howto", ROOT / "tests" / "vm" / "vm_guest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


class _Proc:
    """A stand-in for the processes vm_guest.run_guest starts."""

    def __init__(self, args: list[str], captured: list[list[str]], **_kw: Any) -> None:
        self.args, self.pid, self.returncode = args, -1, 0
        self.stdout = io.BytesIO(b"@@PCIDEV-START@@@@PCIDEV-RC=0@@")  # the console, read line by line
        if args[0] == "chroot":
            captured.append(args)
        else:  # pcidev serve: "listen" at once
            Path(args[args.index("--vfio-user") + 1]).touch()

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def vm_tier_qemu_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The QEMU argument list vm_guest.run_guest builds for one pcidev device (no chroot prefix)."""
    vm_guest = _vm_guest(monkeypatch)
    captured: list[list[str]] = []
    monkeypatch.setattr(vm_guest.subprocess, "Popen", lambda args, **kw: _Proc(args, captured, **kw))
    monkeypatch.setattr(vm_guest, "mounted", lambda root=None: contextlib.nullcontext())
    (tmp_path / "vm").mkdir()
    run = vm_guest.run_guest("true", ["nvme,ns=mem:size=64M"], root=tmp_path)
    assert run.ok and len(captured) == 1
    args = captured[0]
    assert args[:3] == ["chroot", str(tmp_path), "qemu-system-x86_64"]
    return args[3:]  # after "chroot ROOT qemu-system-x86_64"


def _shape(argv: list[str]) -> list[Any]:
    """The arguments with the guest's files, kernel command line and socket path left out."""
    out: list[Any] = []
    for prev, arg in zip(["", *argv], argv, strict=False):
        if prev in ("-kernel", "-initrd", "-append"):
            out.append(f"<{prev[1:]}>")
        elif prev == "-device":
            dev = json.loads(arg)
            dev["socket"]["path"] = "<socket>"
            out.append(dev)
        else:
            out.append(arg)
    return out


def published_qemu_argv() -> list[str]:
    """The qemu-system-x86_64 command of the script, as the shell splits it."""
    text = SCRIPT.read_text(encoding="utf-8").replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("qemu-system-x86_64 ")]
    return shlex.split(line.replace("$(uname -r)", "VERSION"))[1:]


def test_the_published_qemu_command_is_the_vm_tiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _shape(published_qemu_argv()) == _shape(vm_tier_qemu_args(tmp_path, monkeypatch))


def test_the_script_serves_a_client_connecting_like_qemu(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qemu-system-x86_64"
    fake.write_text(FAKE_QEMU, encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    sock = tmp_path / "nvme0.sock"
    script = tmp_path / "attach_qemu.sh"
    pcidev = Path(sys.executable).with_name("pcidev")  # the script's .venv/bin/pcidev
    text = SCRIPT.read_text(encoding="utf-8")
    assert text.count(".venv/bin/pcidev serve ") == 1
    script.write_text(text.replace(PUBLISHED_SOCKET, str(sock)).replace(".venv/bin/pcidev", str(pcidev)),
                      encoding="utf-8")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
               FAKE_QEMU_OUT=str(tmp_path / "qemu.json"))
    proc = subprocess.run(["sh", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads((tmp_path / "qemu.json").read_text(encoding="utf-8"))
    assert seen["vendor"] == 0x1B36  # the NVMe controller answered config space
    assert _shape(seen["argv"]) == _shape(published_qemu_argv())
