"""``pcidev vmstate dump`` on inputs that never end or never fit: it reads no more
than the stream's prefix announces, so an endless or huge input is one error line,
not a hang or an out-of-memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pcidev.cli import main as cli_main

PCIDEV = Path(sys.executable).parent / "pcidev"
GOLDEN = Path(__file__).resolve().parent / "device_data" / "edu-v1.pcvm"


def _one_error_line(args: list[str], **kw) -> str:
    proc = subprocess.run([str(PCIDEV), *args], capture_output=True, timeout=30, **kw)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == b""
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], proc.stderr
    return lines[0]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_endless_input_is_one_line(device: str) -> None:
    assert "bad magic" in _one_error_line(["-p", "no:nvme", "vmstate", "dump", device])


def test_endless_input_after_a_valid_stream(tmp_path: Path) -> None:
    """A valid stream followed by endless bytes on standard input."""
    script = ("import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())\n"
              "while True: sys.stdout.buffer.write(bytes(1 << 16))")
    feeder = subprocess.Popen([sys.executable, "-c", script, str(GOLDEN)], stdout=subprocess.PIPE)
    try:
        line = _one_error_line(["-p", "no:nvme", "vmstate", "dump", "-"], stdin=feeder.stdout)
    finally:
        feeder.kill()
        feeder.wait()
        feeder.stdout.close()
    assert "trailing bytes" in line


def test_small_garbage_and_trailing_bytes_keep_their_messages(tmp_path: Path, capsys) -> None:
    for data, words in ((b"PCID", "truncated: 4 bytes"), (b"", "truncated: 0 bytes"),
                        (GOLDEN.read_bytes()[:100], "announces"),
                        (GOLDEN.read_bytes() + b"xyz", "3 trailing bytes")):
        f = tmp_path / "s.pcvm"
        f.write_bytes(data)
        assert cli_main(["-p", "no:nvme", "vmstate", "dump", str(f)]) == 1
        assert words in capsys.readouterr().err
    f.write_bytes(GOLDEN.read_bytes())
    assert cli_main(["-p", "no:nvme", "vmstate", "dump", str(f)]) == 0
    assert '"size": 4841' in capsys.readouterr().out
