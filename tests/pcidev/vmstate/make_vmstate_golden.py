"""Write the golden streams of tests/pcidev/vmstate/data (run by hand, never by pytest).

Only a *missing* file is written: a golden stream is the record of a released
description version and must not change afterwards.  When a sample description
gets a new version, add a new ``sample-vN.pcvm`` entry here and to the golden tests.

    .venv/bin/python tests/pcidev/vmstate/make_vmstate_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vmstate_descriptions_v1 import DEVICE_TYPE, FINGERPRINT, SAMPLE_V1  # noqa: E402
from vmstate_golden import SAMPLE_V2  # noqa: E402

from pcidev.vmstate import save  # noqa: E402

GOLDEN = {
    "sample-v1.pcvm": lambda: save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, SAMPLE_V1)]),
    "sample-v2.pcvm": lambda: save(DEVICE_TYPE, FINGERPRINT, [("test/ctrl", 0, SAMPLE_V2)]),
}


def main() -> None:
    """Write missing golden streams."""
    for name, make in GOLDEN.items():
        path = HERE / "data" / name
        if path.exists():
            print(f"keep  {path}")
            continue
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(make())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
