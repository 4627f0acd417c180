"""Write the device golden streams of tests/pcidev/vmstate/device_data (run by hand, never by
pytest).

Only a *missing* file is written: a golden stream records a released description
version (framework section ``pcidev/function`` and the device's own section) and
must not change afterwards. When edu's or the framework's description gets a new
version, add a new ``edu-vN.pcvm`` entry here and to test_device_vmstate.py.

    .venv/bin/python tests/pcidev/vmstate/make_device_golden.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from device_golden import build_edu  # noqa: E402

from pcidev.migration import save_device_stream  # noqa: E402
from pcidev.transport.fdpass import close_fds  # noqa: E402


def _edu_v1() -> bytes:
    dev, mem, memfd, efds = build_edu()
    try:
        return save_device_stream(dev)[0]
    finally:
        mem.close()
        close_fds([memfd, *efds])


def _nvme_v1() -> bytes:
    from nvme_golden import build_nvme

    ctrl, machine = build_nvme()
    try:
        return save_device_stream(ctrl)[0]
    finally:
        ctrl.close()
        machine.close()


GOLDEN = {"edu-v1.pcvm": _edu_v1, "nvme-v1.pcvm": _nvme_v1}


def main() -> None:
    """Write missing golden streams."""
    for name, make in GOLDEN.items():
        path = HERE / "device_data" / name
        if path.exists():
            print(f"keep  {path}")
            continue
        path.write_bytes(make())
        print(f"wrote {path}")


if __name__ == "__main__":
    os.umask(0o022)
    main()
