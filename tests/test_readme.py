"""README examples run as written (file paths redirected to a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_nvme_example_runs(tmp_path) -> None:
    [block] = [b for b in python_blocks() if "NvmeDriver" in b]
    code = block.replace("/tmp/disk.img", str(tmp_path / "disk.img"))
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "disk.img").exists()
